// libFuzzer target: weights.pt (loadWeights), a pickle read by LibTorch's unpickler into a fixed small model.
// The contract: the weights load (every name, shape, dtype and value checked) or a modscope::Error, never
// another exception or a crash. LibTorch itself is not instrumented: ASan sees our code and the heap.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "checkpoint/checkpoint.h"
#include "fuzz_checkpoint_config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const modscope::ModelConfig config = modscope::fuzz::checkpointSeedConfig();
    static modscope::nn::ModTransformer net(config);
    // Model::open reads at most this much; inputs beyond it never reach the loader.
    if (size > modscope::maxWeightsFileBytes(config)) return 0;
    try {
        modscope::loadWeights(*net, std::string(reinterpret_cast<const char*>(data), size), "weights.pt");
    } catch (const modscope::Error&) {
    }
    return 0;
}
