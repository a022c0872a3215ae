// The whole model (transformer.h): forward passes for training, tracing and generation (docs/MODEL.md).
#include "nn/transformer.h"

#include <torch/nn/init.h>

#include <chrono>
#include <cmath>
#include <limits>

namespace modscope::nn {

namespace {

void checkCancel(const std::atomic<bool>* cancel) {
    if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) throw Cancelled();
}

// A top-k layer's selection under forced decisions (forcedTopk) from its router logits [1, T] and top k
// topk_idx [1, k]: ascending positions [1, n] on the logits' device.
torch::Tensor forcedTopkIndices(const torch::Tensor& router_logits, const torch::Tensor& topk_idx, std::int64_t k,
                                const ForcedDecisions& forced, bool keep_capacity) {
    TORCH_CHECK(static_cast<std::int64_t>(forced.size()) == router_logits.size(1), "forced decisions for ",
                forced.size(), " tokens");
    const auto chosen = forcedTopk(router_logits, topk_idx, k, forced.data(), keep_capacity);
    auto row = torch::empty({1, static_cast<std::int64_t>(chosen.size())}, torch::kLong);
    std::copy(chosen.begin(), chosen.end(), row.data_ptr<std::int64_t>());
    return row.to(router_logits.device());
}

}  // namespace

// ---------------------------------------------------------------------------------------------- model
ModTransformerImpl::ModTransformerImpl(const ModelConfig& config_) : config(config_) {
    config.validate();
    tok_emb = register_module("tok_emb", torch::nn::Embedding(config.vocab_size, config.d_model));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < config.n_layers; ++i) {
        blocks.push_back(Block(config, i));
        layers->push_back(blocks.back());
    }
    norm_f = register_module("norm_f", RmsNorm(config.d_model, config.norm_eps));

    // Buffers move with the module to its device; checkpoints hold parameters only, so these are rebuilt.
    positions = PositionTables(config.max_seq_len, config.headDim(), config.rope_theta);
    positions.rope = register_buffer("rope_factors", positions.rope);
    positions.causal_bias = register_buffer("causal_bias", positions.causal_bias);
}

void ModTransformerImpl::initWeights(std::uint64_t seed) {
    torch::NoGradGuard no_grad;
    torch::manual_seed(seed);
    const double std = 0.02;
    // Residual outputs scaled down with depth (GPT-2) so the stream's variance does not grow per layer.
    const double resid_std = std / std::sqrt(2.0 * config.n_layers);
    for (auto& p : named_parameters()) {
        const auto& name = p.key();
        auto& t = p.value();
        if (name.find("norm") != std::string::npos) {
            t.fill_(1.0);
        } else if (name.find("predictor") != std::string::npos) {
            if (name.find("bias") != std::string::npos)
                t.zero_();
            else
                t.normal_(0.0, 1.0 / std::sqrt(double(t.size(1))));
        } else if (name.find("proj.weight") != std::string::npos ||
                   name.find("down.weight") != std::string::npos ||
                   (name.size() >= 9 && name.compare(name.size() - 9, 9, ".mlp.down") == 0)) {
            t.normal_(0.0, resid_std);
        } else {
            t.normal_(0.0, std);
        }
    }
}

torch::Tensor ModTransformerImpl::hidden(const torch::Tensor& ids, const ForwardOptions& options,
                                         std::vector<LayerRouting>* routing) {
    const auto B = ids.size(0), T = ids.size(1);
    TORCH_CHECK(T >= 1 && T <= config.max_seq_len, "sequence length ", T, " outside 1..", config.max_seq_len);
    const auto pos = torch::arange(T, ids.options().dtype(torch::kLong)).unsqueeze(0).expand({B, T});
    if (options.kv != nullptr) {
        TORCH_CHECK(B == 1, "KV capture needs batch 1");
        options.kv->assign(blocks.size(), LayerKV{});
    }
    if (routing != nullptr) routing->assign(blocks.size(), LayerRouting{});

    auto x = embed(ids);  // [B, T, d]
    if (options.residuals != nullptr) options.residuals->assign(1, x);
    // Nothing but this loop holds x unless residuals are kept, so inference updates it in place.
    const bool in_place = !torch::GradMode::is_enabled() && options.residuals == nullptr && x.is_contiguous();
    using Clock = std::chrono::steady_clock;
    Clock::time_point layer_start;
    const auto layerDone = [&] {  // the layer before: from its start (or the previous layer's end) to now
        const auto now = Clock::now();
        options.layer_ms->push_back(std::chrono::duration<double, std::milli>(now - layer_start).count());
        layer_start = now;
    };
    if (options.layer_ms != nullptr) {
        options.layer_ms->clear();
        layer_start = Clock::now();
    }
    const bool collect = routing != nullptr && options.collect;
    const bool measure = collect && options.measure_update;
    for (std::size_t li = 0; li < blocks.size(); ++li) {
        if (options.layer_ms != nullptr && li > 0) layerDone();
        checkCancel(options.cancel);
        if (options.residuals != nullptr && li > 0) options.residuals->push_back(x);
        auto& block = *blocks[li];
        LayerKV* kv = options.kv != nullptr ? &(*options.kv)[li] : nullptr;
        // A mixture's report is cheap beside its experts, and a run's FLOPs need its expert count.
        MixtureRouting* mixture = routing != nullptr && block.moe ? &(*routing)[li].mixture : nullptr;
        if (!block.routed) {
            if (in_place)
                block.addDeltaInPlace(x, pos, positions, kv, mixture);
            else
                x = x + block.delta(x, pos, positions, kv, mixture);
            if (collect) {
                auto& r = (*routing)[li];
                r.k = T;
                r.selected_mask = torch::ones({B, T}, ids.options().dtype(torch::kBool));
            }
            continue;
        }
        const auto k = capacityToK(options.capacityOf(li), static_cast<int>(T));
        const auto router_logits = block.routerLogits(x);  // [B, T]
        if (kv != nullptr &&
            options.predictor_prefix_topk) {  // generation steps rank their token against these
            const auto r = router_logits[0].to(torch::kCPU, torch::kFloat32).contiguous();
            kv->router_logits.assign(r.data_ptr<float>(), r.data_ptr<float>() + T);
        }
        const bool need_topk = options.mode == RoutingMode::TopK || options.collect;
        torch::Tensor topk_idx;
        if (need_topk) topk_idx = topkIndices(router_logits, k);  // [B, k]
        const ForcedDecisions* forced = options.forcedAt(li);
        TORCH_CHECK(forced == nullptr || B == 1, "forced decisions apply to one row");
        torch::Tensor predictor_logits;  // [B, T], every token's: a trace shows them all
        std::int64_t predictor_rows = 0;
        // A forced token may be one the prefix top-k would not let the predictor read: all of them are read.
        if (options.collect || (forced != nullptr && options.mode == RoutingMode::Causal)) {
            predictor_logits = block.predictor(x.detach());
            predictor_rows = B * T;
        }

        torch::Tensor selected_mask;
        torch::Tensor update_ratio;            // [B, T] with measure
        std::vector<torch::Tensor> row_ratios;  // causal mode: [1, T] per row
        if (options.mode == RoutingMode::TopK) {
            auto idx = topk_idx;
            if (forced != nullptr) {
                idx = forcedTopkIndices(router_logits, topk_idx, k, *forced, options.keep_capacity);
                selected_mask = torch::zeros({B, T}, ids.options().dtype(torch::kBool)).scatter(1, idx, true);
            }
            x = processSelected(block, x, router_logits, idx, positions, kv, in_place,
                                measure ? &update_ratio : nullptr, mixture);
        } else {
            // Each token decides from its own block input, which depends on earlier tokens only, and from the
            // layer's decisions on earlier tokens.
            std::vector<torch::Tensor> chosen;  // [1, n_b] per row, ascending
            selected_mask =
                predictor_logits.defined()
                    ? causalSelection(predictor_logits, router_logits, options.causalRule(li), &chosen,
                                      forced != nullptr ? forced->data() : nullptr)
                    : causalRouting(block, x, router_logits, options.causalRule(li), &predictor_rows, &chosen);
            std::vector<torch::Tensor> rows;      // each row's own selection; in place, rows of x itself
            std::vector<MixtureRouting> row_mixtures;
            for (std::int64_t b = 0; b < B; ++b)  // one row: x itself, no views
                rows.push_back(
                    B == 1 ? processSelected(block, x, router_logits, chosen[b], positions, kv, in_place,
                                             measure ? &row_ratios.emplace_back() : nullptr,
                                             mixture != nullptr ? &row_mixtures.emplace_back() : nullptr)
                           : processSelected(block, x.narrow(0, b, 1), router_logits.narrow(0, b, 1),
                                             chosen[b], positions, kv, in_place,
                                             measure ? &row_ratios.emplace_back() : nullptr,
                                             mixture != nullptr ? &row_mixtures.emplace_back() : nullptr));
            if (!in_place) x = B == 1 ? rows[0] : torch::cat(rows, 0);
            if (mixture != nullptr) *mixture = B == 1 ? row_mixtures[0] : catMixture(row_mixtures);
        }
        if (routing != nullptr) {
            auto& r = (*routing)[li];
            r.k = k;
            r.router_logits = router_logits;
            r.predictor_logits = predictor_logits;
            r.predictor_rows = predictor_rows;
            if (topk_idx.defined() && options.collect)  // without collect, top-k mode's selection is its k
                r.topk_mask =
                    torch::zeros({B, T}, ids.options().dtype(torch::kBool)).scatter(1, topk_idx, true);
            r.selected_mask = selected_mask.defined() ? selected_mask : r.topk_mask;
            if (measure) r.update_ratio = row_ratios.empty() ? update_ratio : torch::cat(row_ratios, 0);
        }
    }
    if (options.layer_ms != nullptr && !blocks.empty()) layerDone();
    if (options.residuals != nullptr) options.residuals->push_back(x);
    return norm_f(x);
}

torch::Tensor ModTransformerImpl::embed(const torch::Tensor& ids) {
    return backend::current().embed(tok_emb->weight, ids);
}

torch::Tensor ModTransformerImpl::logits(const torch::Tensor& h) {
    return backend::current().linear(h, tok_emb->weight, {}, head_t);
}

void ModTransformerImpl::logitsInto(const torch::Tensor& h, torch::Tensor& out) {
    TORCH_CHECK(!torch::GradMode::is_enabled() && h.dim() == 2, "logitsInto: [N, d] without autograd");
    backend::current().headInto(h, tok_emb->weight, head_t, out);
}

torch::Tensor ModTransformerImpl::step(std::int64_t token, std::int64_t position, std::vector<LayerKV>& kv,
                                       const CausalRule& rule, std::vector<std::uint8_t>* processed,
                                       std::vector<float>* prob, std::vector<MixtureRouting>* mixture) {
    TORCH_CHECK(position >= 0 && position < config.max_seq_len, "position ", position, " beyond max_seq_len");
    TORCH_CHECK(kv.size() == blocks.size(), "KV cache has ", kv.size(), " layers");
    const auto opts = torch::TensorOptions().device(tok_emb->weight.device()).dtype(torch::kLong);
    const auto pos = torch::full({1, 1}, position, opts);
    auto x = embed(torch::full({1, 1}, token, opts));  // [1, 1, d]
    if (processed) processed->assign(blocks.size(), 1);
    if (prob) prob->assign(blocks.size(), std::numeric_limits<float>::quiet_NaN());
    if (mixture) mixture->assign(blocks.size(), MixtureRouting{});
    for (std::size_t li = 0; li < blocks.size(); ++li) {
        auto& block = *blocks[li];
        if (!block.routed) {
            x = x + block.delta(x, pos, positions, &kv[li], mixture != nullptr ? &(*mixture)[li] : nullptr);
            continue;
        }
        const float logit = block.predictor(x).item<float>();
        if (prob) (*prob)[li] = 1.0f / (1.0f + std::exp(-logit));
        // The router runs for a skipped token only when the prefix top-k must rank it.
        torch::Tensor router_logit;  // [1, 1]
        std::int64_t higher = 0;
        if (rule.prefix_topk) {
            router_logit = block.routerLogits(x);
            const float r = router_logit.item<float>();
            higher = countAbove(kv[li].router_logits, r);
            kv[li].router_logits.push_back(r);
        }
        if (!rule.decide(logit, position, kv[li].length(), higher)) {
            if (processed) (*processed)[li] = 0;
            continue;
        }
        if (!router_logit.defined()) router_logit = block.routerLogits(x);
        x = x + torch::sigmoid(router_logit).unsqueeze(-1) *
                    block.delta(x, pos, positions, &kv[li], mixture != nullptr ? &(*mixture)[li] : nullptr);
    }
    return logits(norm_f(x)).view({-1});
}

}  // namespace modscope::nn
