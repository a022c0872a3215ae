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
BlockImpl::BlockImpl(const ModelConfig& config, int index_) : index(index_), routed(config.isRouted(index_)) {
    attn_norm = register_module("attn_norm", RmsNorm(config.d_model, config.norm_eps));
    attn = register_module("attn", Attention(config));
    mlp_norm = register_module("mlp_norm", RmsNorm(config.d_model, config.norm_eps));
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
                                LayerKV* kv) {
    if (kv == nullptr && backend::current().fusedAddBlock(*this, x, pos, positions)) return;
    x.add_(delta(x, pos, positions, kv));
}

torch::Tensor BlockImpl::delta(const torch::Tensor& x, const torch::Tensor& pos,
                               const PositionTables& positions, LayerKV* kv) {
    const auto& be = backend::current();
    if (kv == nullptr) {
        if (auto fused = be.fusedBlockDelta(*this, x, pos, positions); fused.defined()) return fused;
    }
    const auto a = attn(attn_norm(x), pos, positions, kv);
    // The norm reads x + a (the sum is not kept); without autograd the MLP's fresh output takes a in place.
    auto m = mlp(mlp_norm(x, a));
    if (needsGrad(x, mlp_norm->weight) || a.requires_grad() || m.requires_grad()) return a + m;
    return m.add_(a);
}

}  // namespace modscope::nn
