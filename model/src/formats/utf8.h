// UTF-8 checks shared by the trace readers and writers: a trace's text comes from untrusted files and
// must be valid UTF-8 before it is shown or written.
#pragma once

#include <cstddef>
#include <string>

namespace modscope {

// The length of the valid UTF-8 sequence at s[i] (1 to 4), or 0 where the bytes there are not one
// (overlong forms, surrogates and code points past U+10FFFF included).
std::size_t utf8SequenceLength(const std::string& s, std::size_t i);

// Text from an untrusted file made safe to put in a one-line message: valid UTF-8, no control characters,
// at most max_chars bytes (then "...").
std::string printable(const std::string& s, std::size_t max_chars = 60);

}  // namespace modscope
