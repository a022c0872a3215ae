// The whole model: embedding, layers, head; a forward with its routing, and a generation step (internal to
// model/; docs/MODEL.md).
#pragma once

#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "nn/modules.h"
#include "nn/routing.h"

namespace modscope::nn {

struct ForwardOptions {
    RoutingMode mode = RoutingMode::TopK;
    double capacity = 0.125;
    double predictor_threshold = 0.5;
    double predictor_budget_gain = 0.0;
    bool predictor_prefix_topk = false;
    bool collect = false;                             // fill LayerRouting for every layer
    // With collect: each routed layer's update_ratio too (a traced run; training has no use for it).
    bool measure_update = false;
    std::vector<LayerKV>* kv = nullptr;               // when set: filled with each layer's K/V (B must be 1)
    std::vector<torch::Tensor>* residuals = nullptr;  // when set: [0] embeddings, [i+1] after layer i
    // When set: each layer's wall-clock ms, in order, a clock read between layers (profiling.h); the
    // embedding and the final norm are not in them. On the CPU only: a device's work is asynchronous.
    std::vector<double>* layer_ms = nullptr;
    const std::atomic<bool>* cancel = nullptr;
    // Per layer index: that layer's capacity in place of capacity (< 0 or absent: capacity).
    std::vector<double> layer_capacity;
    // Per layer index: its forced decisions (resolveOverrides; empty or absent: none), for B = 1.
    const std::vector<ForcedDecisions>* forced = nullptr;
    bool keep_capacity = false;  // RunOptions::keep_capacity

    const ForcedDecisions* forcedAt(std::size_t layer) const {
        return forced != nullptr && layer < forced->size() && !(*forced)[layer].empty() ? &(*forced)[layer]
                                                                                        : nullptr;
    }

    double capacityOf(std::size_t layer) const {
        return layer < layer_capacity.size() && layer_capacity[layer] >= 0 ? std::min(layer_capacity[layer], 1.0)
                                                                            : capacity;
    }
    CausalRule causalRule() const {
        return {predictor_threshold, capacity, predictor_budget_gain, predictor_prefix_topk};
    }
    CausalRule causalRule(std::size_t layer) const {
        return {predictor_threshold, capacityOf(layer), predictor_budget_gain, predictor_prefix_topk};
    }
    // The config's causal rule (threshold, budget gain, prefix top-k); the capacity stays the run's own.
    void setCausalRule(const ModelConfig& config) {
        predictor_threshold = config.predictor_threshold;
        predictor_budget_gain = config.predictor_budget_gain;
        predictor_prefix_topk = config.predictor_prefix_topk;
    }
};

struct ModTransformerImpl : torch::nn::Module {
    explicit ModTransformerImpl(const ModelConfig& config);

    // ids [B, T] int64 -> final hidden states [B, T, d] after norm_f
    torch::Tensor hidden(const torch::Tensor& ids, const ForwardOptions& options,
                         std::vector<LayerRouting>* routing = nullptr);
    // ids [B, T] int64 -> token embeddings [B, T, d]
    torch::Tensor embed(const torch::Tensor& ids);
    // hidden [.., d] -> logits [.., V] through the tied embedding
    torch::Tensor logits(const torch::Tensor& hidden);
    // The same for hidden [N, d] on the CPU without autograd, written into out, a row-major float32 [N, V]
    // (the caller's memory: a trace's vector, so the logits are not copied again).
    void logitsInto(const torch::Tensor& hidden, torch::Tensor& out);

    // One generation step in causal mode: token id at position pos, kv holds every layer's cache (a routed
    // layer's cache holds the tokens it processed, which is the rule's n_t). Returns logits [V];
    // processed/prob (size n_layers) report each layer's decision and predictor probability.
    // mixture (size n_layers): what each mixture layer did with the token (left empty where it skipped).
    torch::Tensor step(std::int64_t token, std::int64_t pos, std::vector<LayerKV>& kv, const CausalRule& rule,
                       std::vector<std::uint8_t>* processed, std::vector<float>* prob,
                       std::vector<MixtureRouting>* mixture = nullptr);

    void initWeights(std::uint64_t seed);

    ModelConfig config;
    torch::nn::Embedding tok_emb{nullptr};  // weight [V, d], tied with the output head
    torch::nn::ModuleList layers{nullptr};
    RmsNorm norm_f{nullptr};
    std::vector<Block> blocks;  // typed handles into layers
    PositionTables positions;   // buffers, not parameters: rebuilt from the config
    TransposedWeight head_t;    // the tied output head, tok_emb's weight as [d, V]
};
TORCH_MODULE(ModTransformer);

}  // namespace modscope::nn
