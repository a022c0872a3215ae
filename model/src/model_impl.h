// Model::Impl, visible to the trainer and tests inside this project (torch types).
#pragma once

#include <memory>
#include <string>

#include "mod_transformer.h"
#include "modscope/engine.h"

namespace modscope {

struct Model::Impl {
    ModelConfig config;
    torch::Device device{torch::kCPU};
    nn::ModTransformer net{nullptr};
    std::string directory;
    std::string weights_sha256;
    std::unique_ptr<Tokenizer> tokenizer;

    // ids -> [1, T] int64 on the model's device, after checking every id and the length.
    torch::Tensor idsTensor(const std::vector<int>& ids) const;
};

}  // namespace modscope
