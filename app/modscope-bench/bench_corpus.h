// Plain English text for the sections that need some: the training corpus and the app's prompts.
#pragma once

#include <cstddef>
#include <string>

namespace modscope::bench {

// About `bytes` of text: the fortune files when the system has them (ASCII only, so the text is valid
// UTF-8 whatever their encoding), else generated words. source says which.
std::string corpusText(std::size_t bytes, std::string* source = nullptr);

}  // namespace modscope::bench
