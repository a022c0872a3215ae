// The transformer's layers (modules.h), each forward written once against the backend's operations.
#include "nn/modules.h"

#include <torch/nn/functional/activation.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "nn/attention_blocks.h"

namespace modscope::nn {

using backend::needsGrad;

// ---------------------------------------------------------------------------------------------- RMSNorm
RmsNormImpl::RmsNormImpl(std::int64_t dim, double eps_) : eps(eps_) {
    weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RmsNormImpl::forward(const torch::Tensor& x, const torch::Tensor& plus) {
    return backend::current().rmsNorm(x, weight, eps, plus);
}

// ---------------------------------------------------------------------------------------------- positions
PositionTables::PositionTables(std::int64_t max_seq_len, std::int64_t head_dim, double theta) {
    const auto inv_freq =
        1.0 / torch::pow(theta, torch::arange(0, head_dim, 2, torch::kFloat32) / double(head_dim));
    const auto angles =
        torch::outer(torch::arange(max_seq_len, torch::kFloat32), inv_freq.to(torch::kFloat32));
    const auto c = angles.cos(), s = angles.sin();                                   // [L, hd/2]
    const auto cos_row = torch::cat({c, c}, -1), sin_row = torch::cat({-s, s}, -1);  // [L, hd]
    const double scale = 1.0 / std::sqrt(double(head_dim));
    // [L, 2 (cos, sin), 2 (q, k), 1, hd]; q's factors carry the attention scale, which then costs nothing.
    rope = torch::stack(
               {torch::stack({cos_row * scale, cos_row}, 1), torch::stack({sin_row * scale, sin_row}, 1)}, 1)
               .unsqueeze(3)
               .contiguous();
    // [kBlock, L + kBlock]: entry (i, c) is -inf when c - L > i. Query block [s, s + n) after `prior` cached
    // keys reads columns [L - prior - s, L + n): zero up to its own diagonal, -inf after it.
    const auto rows = torch::arange(kAttentionQueryBlock, torch::kLong).unsqueeze(1);
    const auto cols =
        torch::arange(max_seq_len + kAttentionQueryBlock, torch::kLong).unsqueeze(0) - max_seq_len;
    causal_bias = torch::zeros({kAttentionQueryBlock, max_seq_len + kAttentionQueryBlock})
                      .masked_fill(cols > rows, -std::numeric_limits<float>::infinity());
}

torch::Tensor PositionTables::causalBias(std::int64_t prior, std::int64_t start, std::int64_t n) const {
    const auto L = causal_bias.size(1) - kAttentionQueryBlock;
    return causal_bias.narrow(0, 0, n).narrow(1, L - prior - start, prior + start + n);
}

// ---------------------------------------------------------------------------------------------- KV cache
void LayerKV::append(const torch::Tensor& k_new, const torch::Tensor& v_new) {
    const auto n = length(), S = k_new.size(2);
    if (!k_store.defined() || n + S > k_store.size(2)) {
        const std::int64_t capacity =
            std::max<std::int64_t>({n + S, k_store.defined() ? 2 * k_store.size(2) : 0, 64});
        auto sizes = k_new.sizes().vec();
        sizes[2] = capacity;
        auto k_grown = torch::empty(sizes, k_new.options()), v_grown = torch::empty(sizes, v_new.options());
        if (n > 0) {
            k_grown.narrow(2, 0, n).copy_(k);
            v_grown.narrow(2, 0, n).copy_(v);
        }
        k_store = k_grown;
        v_store = v_grown;
    }
    k_store.narrow(2, n, S).copy_(k_new);
    v_store.narrow(2, n, S).copy_(v_new);
    k = k_store.narrow(2, 0, n + S);
    v = v_store.narrow(2, 0, n + S);
}

// ---------------------------------------------------------------------------------------------- Attention
AttentionImpl::AttentionImpl(const ModelConfig& config)
    : n_heads(config.n_heads), head_dim(config.headDim()) {
    qkv = register_module(
        "qkv", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, 3 * config.d_model).bias(false)));
    proj = register_module(
        "proj", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, config.d_model).bias(false)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& pos,
                                     const PositionTables& positions, LayerKV* kv) {
    const auto& be = backend::current();
    const auto B = x.size(0), S = x.size(1);
    const auto qkv_out = be.linear(x, qkv->weight, {}, qkv_t).view({B, S, 3, n_heads, head_dim});
    return be.linear(be.selfAttention(qkv_out, pos, positions, kv), proj->weight, {}, proj_t);
}

// ---------------------------------------------------------------------------------------------- SwiGLU
SwiGluImpl::SwiGluImpl(std::int64_t d_model, std::int64_t d_ff) {
    gate_up = register_module("gate_up",
                              torch::nn::Linear(torch::nn::LinearOptions(d_model, 2 * d_ff).bias(false)));
    down = register_module("down", torch::nn::Linear(torch::nn::LinearOptions(d_ff, d_model).bias(false)));
}

torch::Tensor SwiGluImpl::forward(const torch::Tensor& x) {
    const auto& be = backend::current();
    return be.linear(be.swiGlu(be.linear(x, gate_up->weight, {}, gate_up_t)), down->weight, {}, down_t);
}

// ---------------------------------------------------------------------------------------------- mixture
MixtureMlpImpl::MixtureMlpImpl(const ModelConfig& config)
    : n_experts(config.n_experts),
      noop_experts(config.noop_experts),
      capacity_factor(config.expert_capacity_factor) {
    router = register_module(
        "router", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, config.routerChoices()).bias(false)));
    gate_up = register_parameter("gate_up", torch::zeros({n_experts, 2 * config.d_ff, config.d_model}));
    down = register_parameter("down", torch::zeros({n_experts, config.d_model, config.d_ff}));
    for (std::int64_t e = 0; e < n_experts; ++e) {
        gate_up_t.push_back(std::make_unique<TransposedWeight>());
        down_t.push_back(std::make_unique<TransposedWeight>());
    }
}

torch::Tensor MixtureMlpImpl::forward(const torch::Tensor& x, MixtureState* state, MixtureRouting* out) {
    const auto& be = backend::current();
    const auto B = x.size(0), S = x.size(1), d = x.size(2);
    const auto choices = n_experts + noop_experts;
    const auto probs = torch::softmax(be.linear(x, router->weight, {}, router_t), -1);  // [B, S, choices]
    const auto top = probs.topk(std::min<std::int64_t>(2, choices), -1);
    const auto choice = std::get<1>(top).select(-1, 0);  // [B, S]
    const auto prob = std::get<0>(top).select(-1, 0);    // [B, S]

    // Capacity, token by token in sequence order: a token's fate depends on the tokens before it only.
    TORCH_CHECK(state == nullptr || B == 1, "a mixture state continues one row");
    const auto choice_host = choice.to(torch::kCPU).contiguous();
    const auto* c = choice_host.data_ptr<std::int64_t>();
    auto expert_host = torch::full({B, S}, std::int64_t{-1}, torch::kLong);
    auto* ex = expert_host.data_ptr<std::int64_t>();
    std::vector<std::vector<std::int64_t>> rows(static_cast<std::size_t>(n_experts));  // flat rows per expert
    for (std::int64_t b = 0; b < B; ++b) {
        std::vector<std::int64_t> taken = state != nullptr && !state->taken.empty()
                                              ? state->taken
                                              : std::vector<std::int64_t>(static_cast<std::size_t>(n_experts), 0);
        const std::int64_t before = state != nullptr ? state->tokens : 0;
        for (std::int64_t j = 0; j < S; ++j) {
            const auto e = c[b * S + j];
            if (e >= n_experts) continue;  // a no-op
            const auto cap = expertCapacity(capacity_factor, static_cast<int>(n_experts), static_cast<int>(before + j + 1));
            if (taken[e] >= cap) continue;  // overflow
            ++taken[e];
            ex[b * S + j] = e;
            rows[e].push_back(b * S + j);
        }
        if (state != nullptr) {
            state->taken = taken;
            state->tokens = before + S;
        }
    }

    const auto xf = x.reshape({B * S, d});
    const auto pf = prob.reshape({B * S});
    const bool grad = torch::GradMode::is_enabled() &&
                      (x.requires_grad() || gate_up.requires_grad() || router->weight.requires_grad());
    auto m = torch::zeros({B * S, d}, x.options());
    std::int64_t expert_rows = 0;
    for (std::int64_t e = 0; e < n_experts; ++e) {
        if (rows[e].empty()) continue;
        expert_rows += static_cast<std::int64_t>(rows[e].size());
        const auto idx = torch::tensor(rows[e], torch::kLong).to(x.device());
        const auto xe = xf.index_select(0, idx);  // [n_e, d]
        const auto h = be.swiGlu(be.linear(xe, gate_up[e], {}, *gate_up_t[e]));
        const auto ye = be.linear(h, down[e], {}, *down_t[e]) * pf.index_select(0, idx).unsqueeze(1);
        m = grad ? m.index_add(0, idx, ye) : m.index_add_(0, idx, ye);
    }
    if (out != nullptr) {
        out->choice = choice;
        out->prob = prob;
        if (choices > 1) {
            out->second = std::get<1>(top).select(-1, 1);
            out->second_prob = std::get<0>(top).select(-1, 1);
        } else {
            out->second = torch::full({B, S}, std::int64_t{-1}, choice.options());
            out->second_prob = torch::full({B, S}, std::numeric_limits<float>::quiet_NaN(), prob.options());
        }
        out->expert = expert_host.to(x.device());
        out->expert_rows = expert_rows;
        out->tokens = B * S;
        if (grad) {
            const auto f = torch::one_hot(choice.reshape(-1), choices).to(probs.scalar_type()).mean(0);  // [choices]
            out->balance_loss = double(choices) * (f * probs.reshape({B * S, choices}).mean(0)).sum();
        }
    }
    return m.view({B, S, d});
}

// ---------------------------------------------------------------------------------------------- Predictor
PredictorImpl::PredictorImpl(std::int64_t d_model, std::int64_t hidden) {
    fc1 = register_module("fc1", torch::nn::Linear(torch::nn::LinearOptions(d_model, hidden)));
    fc2 = register_module("fc2", torch::nn::Linear(torch::nn::LinearOptions(hidden, 1)));
}

torch::Tensor PredictorImpl::forward(const torch::Tensor& x) {
    return backend::current().predictorLogits(weights(), x);
}

torch::Tensor PredictorImpl::atRows(const torch::Tensor& x2d, const torch::Tensor& rows) {
    return backend::current().predictorLogits(weights(), x2d, rows);
}

// ---------------------------------------------------------------------------------------------- Block
BlockImpl::BlockImpl(const ModelConfig& config, int index_)
    : index(index_), routed(config.isRouted(index_)), moe(config.isMoe(index_)) {
    attn_norm = register_module("attn_norm", RmsNorm(config.d_model, config.norm_eps));
    attn = register_module("attn", Attention(config));
    mlp_norm = register_module("mlp_norm", RmsNorm(config.d_model, config.norm_eps));
    if (moe)
        mixture = register_module("mlp", MixtureMlp(config));
    else
        mlp = register_module("mlp", SwiGlu(config.d_model, config.d_ff));
    if (routed) {
        router = register_module("router",
                                 torch::nn::Linear(torch::nn::LinearOptions(config.d_model, 1).bias(false)));
        predictor = register_module("predictor", Predictor(config.d_model, config.predictor_hidden));
    }
}

torch::Tensor BlockImpl::routerLogits(const torch::Tensor& x) {
    return backend::current().routerLogits(x, router->weight);
}

void BlockImpl::addDeltaInPlace(torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                                LayerKV* kv, MixtureRouting* mixture_out) {
    // The fused blocks know the dense MLP only.
    if (kv == nullptr && !moe && backend::current().fusedAddBlock(*this, x, pos, positions)) return;
    x.add_(delta(x, pos, positions, kv, mixture_out));
}

torch::Tensor BlockImpl::delta(const torch::Tensor& x, const torch::Tensor& pos,
                               const PositionTables& positions, LayerKV* kv, MixtureRouting* mixture_out) {
    const auto& be = backend::current();
    if (kv == nullptr && !moe) {
        if (auto fused = be.fusedBlockDelta(*this, x, pos, positions); fused.defined()) return fused;
    }
    const auto a = attn(attn_norm(x), pos, positions, kv);
    // The norm reads x + a (the sum is not kept); without autograd the MLP's fresh output takes a in place.
    auto m = moe ? mixture(mlp_norm(x, a), kv != nullptr ? &kv->mixture : nullptr, mixture_out)
                 : mlp(mlp_norm(x, a));
    if (needsGrad(x, mlp_norm->weight) || a.requires_grad() || m.requires_grad()) return a + m;
    return m.add_(a);
}

}  // namespace modscope::nn
