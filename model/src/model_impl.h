// Model::Impl, visible to the trainer and tests inside this project (torch types).
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"
#include "modscope/engine.h"
#include "nn/transformer.h"

namespace modscope {

struct Model::Impl {
    ModelConfig config;
    torch::Device device{torch::kCPU};
    const backend::OpsBackend* backend = &backend::ops();  // chosen once, at open or create
    nn::ModTransformer net{nullptr};
    std::string directory;
    std::string weights_sha256;
    std::unique_ptr<Tokenizer> tokenizer;

    // ids -> [1, T] int64 on the model's device, after checking every id and the length.
    torch::Tensor idsTensor(const std::vector<int>& ids) const;
};

struct ModelInternals {
    static Model::Impl& of(const Model& model) { return *model.impl_; }
};

// The model's internals: its modules, device and backend. Run its modules inside a backend::Use of
// internals(model).backend, as Model::run does.
inline Model::Impl& internals(const Model& model) {
    return ModelInternals::of(model);
}

}  // namespace modscope
