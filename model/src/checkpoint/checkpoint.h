// weights.pt: a pickled dict {parameter name: float32 or float16 tensor}, readable by Python's torch.load.
#pragma once

#include <string>

#include "nn/transformer.h"

namespace modscope {

// Serialises every parameter of net (moved to the CPU) into the pickle bytes of weights.pt, as float16 when
// half (half the size; the model still runs in float32).
std::string serializeWeights(nn::ModTransformerImpl& net, bool half = false);

// Parses pickle bytes and copies them into net after checking every name, shape, dtype and value;
// Error names the first problem (source names the file in messages).
void loadWeights(nn::ModTransformerImpl& net, const std::string& bytes, const std::string& source);

// The largest weights.pt a config can plausibly have: parameters * 4 bytes plus pickle overhead.
std::uint64_t maxWeightsFileBytes(const ModelConfig& config);
// The smallest: the parameters' float16 bytes (pickle stores every tensor's data uncompressed).
std::uint64_t minWeightsFileBytes(const ModelConfig& config);

}  // namespace modscope
