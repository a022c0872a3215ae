// Bounded reads and atomic writes: every file the engine reads is untrusted, every file it writes must
// survive a crash or a full disk without leaving a half-written file behind.
#pragma once

#include <cstdint>
#include <string>

namespace modscope {

// Reads at most max_bytes; a larger file raises Error naming it (the caller states what is plausible).
std::string readFileBounded(const std::string& path, std::uint64_t max_bytes);

}  // namespace modscope
