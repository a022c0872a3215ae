// libFuzzer target: corpus statistics files (statsFromJson), untrusted files the app's Corpus window opens.
// The contract: statistics or a modscope::Error; statistics that are accepted can be written again and the text
// written reads back to the same text.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "modscope/corpus_stats.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        const std::string json = modscope::statsToJson(modscope::statsFromJson(text));
        if (modscope::statsToJson(modscope::statsFromJson(json)) != json) std::abort();
    } catch (const modscope::Error&) {
    }
    return 0;
}
