// libFuzzer target: weights.pt (loadWeights), a pickle read by LibTorch's unpickler into a fixed small model.
// The contract: the weights load (every name, shape, dtype and value checked) or a modscope::Error, never
// another exception or a crash. LibTorch itself is not instrumented: ASan sees our code and the heap.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "checkpoint.h"

namespace {

// The config the seeds in fuzz/corpus/checkpoint were written for (fuzz/make_checkpoint_seeds.py).
modscope::ModelConfig fuzzConfig() {
    modscope::ModelConfig c;
    c.name = "fuzz";
    c.vocab_size = 16;
    c.d_model = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 16;
    c.max_seq_len = 16;
    c.routed_layers = {1};
    c.predictor_hidden = 4;
    c.validate();
    return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const modscope::ModelConfig config = fuzzConfig();
    static modscope::nn::ModTransformer net(config);
    // Model::open reads at most this much; inputs beyond it never reach the loader.
    if (size > modscope::maxWeightsFileBytes(config)) return 0;
    try {
        modscope::loadWeights(*net, std::string(reinterpret_cast<const char*>(data), size), "weights.pt");
    } catch (const modscope::Error&) {
    }
    return 0;
}
