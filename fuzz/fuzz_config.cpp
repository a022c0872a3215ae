// libFuzzer target: config.json (ModelConfig::fromJson), the first file of a checkpoint that is read.
// The contract: any bytes give a validated config or a modscope::Error, never another exception, a crash or
// an allocation beyond the input's size; a config that is accepted writes out and reads back the same.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "modscope/engine.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    modscope::ModelConfig config;
    try {
        config = modscope::ModelConfig::fromJson(text);
    } catch (const modscope::Error&) {
        return 0;
    }
    // Accepted: its sizes are within the bounds validate() promises, and it round-trips.
    const std::string json = config.toJson();
    if (modscope::ModelConfig::fromJson(json).toJson() != json) std::abort();
    if (config.parameterCount() <= 0 || config.parameterCount() > (std::int64_t{1} << 32)) std::abort();
    return 0;
}
