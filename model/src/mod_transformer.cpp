// Mixture-of-Depths transformer: forward passes for training, tracing and generation (docs/MODEL.md).
#include "mod_transformer.h"

#include <torch/autograd.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "attention_blocks.h"
#include "cpu_kernels.h"
#include "cpu_matmul.h"
#include "cpu_training.h"

namespace modscope::nn {

namespace F = torch::nn::functional;
using torch::indexing::Slice;

using cpu::needsGrad;

// ---------------------------------------------------------------------------------------------- RMSNorm
RmsNormImpl::RmsNormImpl(std::int64_t dim, double eps_) : eps(eps_) {
    weight = register_parameter("weight", torch::ones({dim}));
}

namespace {

// RMSNorm with its gradient as one kernel each way (cpu::rmsNorm, cpu::rmsNormBackward), for training on the
// CPU. Not twice differentiable.
struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                 const torch::Tensor& weight, double eps) {
        ctx->save_for_backward({x, weight});
        ctx->saved_data["eps"] = eps;
        return cpu::rmsNorm(x, weight, eps);
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        auto [dx, dw] = cpu::rmsNormBackward(saved[0], saved[1], ctx->saved_data["eps"].toDouble(), grads[0]);
        return {dx, dw, torch::Tensor()};
    }
};

}  // namespace

torch::Tensor RmsNormImpl::forward(const torch::Tensor& x) {
    if (cpu::appliesTo(x) && cpu::appliesTo(weight))
        return needsGrad(x, weight) ? RmsNormFunction::apply(x, weight, eps) : cpu::rmsNorm(x, weight, eps);
    return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight;
}

// ---------------------------------------------------------------------------------------------- linear
torch::Tensor TransposedWeight::of(const torch::Tensor& weight) {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::int64_t version = weight.is_inference() ? 0 : weight._version();
    if (!transposed_.defined() || data_ != weight.data_ptr() || version != version_) {
        transposed_ = weight.detach().t().contiguous();
        data_ = weight.data_ptr();
        version_ = version;
    }
    return transposed_;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                     TransposedWeight& cache) {
    if (!cpu::applies(x) || !cpu::applies(weight)) return F::linear(x, weight, bias);
    const bool grad = needsGrad(x, weight) || (bias.defined() && needsGrad(bias, bias));
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    // With autograd the product reads W through a transposed view, so its gradient reaches the parameter;
    // without, it reads the cached [in, out] copy: sgemm runs 1.2-6x faster on it for few rows.
    auto y = cpu::mm(x.reshape({-1, x.size(-1)}), grad ? weight.t() : cache.of(weight)).view(shape);
    if (!bias.defined()) return y;
    return grad ? y + bias : y.add_(bias);
}

// ---------------------------------------------------------------------------------------------- positions
PositionTables::PositionTables(std::int64_t max_seq_len, std::int64_t head_dim, double theta) {
    const auto inv_freq = 1.0 / torch::pow(theta, torch::arange(0, head_dim, 2, torch::kFloat32) / double(head_dim));
    const auto angles = torch::outer(torch::arange(max_seq_len, torch::kFloat32), inv_freq.to(torch::kFloat32));
    const auto c = angles.cos(), s = angles.sin();                                   // [L, hd/2]
    const auto cos_row = torch::cat({c, c}, -1), sin_row = torch::cat({-s, s}, -1);  // [L, hd]
    const double scale = 1.0 / std::sqrt(double(head_dim));
    // [L, 2 (cos, sin), 2 (q, k), 1, hd]; q's factors carry the attention scale, which then costs nothing.
    rope = torch::stack({torch::stack({cos_row * scale, cos_row}, 1), torch::stack({sin_row * scale, sin_row}, 1)}, 1)
               .unsqueeze(3)
               .contiguous();
    // [kBlock, L + kBlock]: entry (i, c) is -inf when c - L > i. Query block [s, s + n) after `prior` cached
    // keys reads columns [L - prior - s, L + n): zero up to its own diagonal, -inf after it.
    const auto rows = torch::arange(kAttentionQueryBlock, torch::kLong).unsqueeze(1);
    const auto cols = torch::arange(max_seq_len + kAttentionQueryBlock, torch::kLong).unsqueeze(0) - max_seq_len;
    causal_bias = torch::zeros({kAttentionQueryBlock, max_seq_len + kAttentionQueryBlock})
                      .masked_fill(cols > rows, -std::numeric_limits<float>::infinity());
}

torch::Tensor PositionTables::rotateQK(const torch::Tensor& qk, const torch::Tensor& pos) const {
    if (!needsGrad(qk, rope) && cpu::appliesTo(qk)) return cpu::rotateQK(qk, pos, rope);
    const auto B = qk.size(0), S = qk.size(1), hd = qk.size(-1), half = hd / 2;
    const auto f = rope.index_select(0, pos.reshape(-1)).view({B, S, 2, 2, 1, hd});
    // Rotating (x1, x2) by the angle is x * (c, c) + (x2, x1) * (-s, s): two products over both halves.
    const auto swapped = torch::cat({qk.narrow(-1, half, half), qk.narrow(-1, 0, half)}, -1);
    return torch::addcmul(qk * f.select(2, 0), swapped, f.select(2, 1));
}

torch::Tensor PositionTables::causalBias(std::int64_t prior, std::int64_t start, std::int64_t n) const {
    const auto L = causal_bias.size(1) - kAttentionQueryBlock;
    return causal_bias.narrow(0, 0, n).narrow(1, L - prior - start, prior + start + n);
}

// ---------------------------------------------------------------------------------------------- Attention
namespace {

// a @ b (+ add, broadcast over the batch) for [N, M, K] @ [N, K, P]: oneDNN's sgemm on the CPU (cpu_matmul.h),
// torch's bmm elsewhere.
torch::Tensor batchedProduct(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& add = {}) {
    if (cpu::applies(a) && cpu::applies(b)) return cpu::bmm(a, b, add);
    return add.defined() ? torch::baddbmm(add, a, b) : torch::bmm(a, b);
}

}  // namespace

torch::Tensor causalAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              std::int64_t prior, const PositionTables& positions, const torch::Tensor& into) {
    const auto S = q.size(1);
    const bool write_into = into.defined();
    TORCH_CHECK(!write_into || (cpu::applies(q) && !needsGrad(q, k) && !v.requires_grad()),
                "causalAttention: `into` is for CPU forwards without autograd");
    // Query block [s, e) needs keys [0, prior + e) only: the keys after it would be masked anyway, so the
    // upper triangle of the score matrix is never computed, and each block's scores stay cache-sized.
    // The mask is an additive bias, 0 or -inf, that the score product starts from (beta = 1); every query
    // sees its own key, so no row is all -inf (no NaN).
    if (write_into && (S <= kSmallAttentionQueries || cpu::wideAttentionFits(S, prior, q.size(2)))) {
        auto target = into;
        cpu::smallCausalAttention(q, k, v, prior, target);
        return into;
    }
    constexpr std::int64_t kBlock = kAttentionQueryBlock;
    std::vector<torch::Tensor> blocks;
    for (std::int64_t s = 0; s < S; s += kBlock) {
        const auto n = std::min(kBlock, S - s), visible = prior + s + n;
        const auto kt = k.narrow(1, 0, visible).transpose(1, 2);
        const auto vs = v.narrow(1, 0, visible);
        if (write_into) {
            // Each query's probabilities over its own key and the earlier ones, zeros after, in place (the
            // bias the operator path adds costs a copy of every score). One query (S = 1) sees every key.
            auto scores = cpu::bmm(S == 1 ? q : q.narrow(1, s, n), kt);
            cpu::causalSoftmax(scores, prior + s);
            auto target = into.narrow(1, s, n);
            cpu::bmmInto(scores, vs, target);
            continue;
        }
        const auto scores = S == 1 ? batchedProduct(q, kt)
                                   : batchedProduct(q.narrow(1, s, n), kt, positions.causalBias(prior, s, n));
        blocks.push_back(batchedProduct(torch::softmax(scores, -1), vs));  // [N, n, hd]
    }
    if (write_into) return into;
    return blocks.size() == 1 ? blocks[0] : torch::cat(blocks, 1);
}

AttentionImpl::AttentionImpl(const ModelConfig& config)
    : n_heads(config.n_heads), head_dim(config.headDim()) {
    qkv = register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, 3 * config.d_model).bias(false)));
    proj = register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, config.d_model).bias(false)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                                     LayerKV* kv) {
    const auto B = x.size(0), S = x.size(1), d = x.size(2);
    const auto H = n_heads, hd = head_dim;
    const auto qkv_out = linear(x, qkv->weight, {}, qkv_t).view({B, S, 3, H, hd});
    // Training on the CPU: the fused function (cpu_training.h), where the operators below cost a dozen
    // dispatches and zero-filled gradients of the whole qkv output each way.
    if (kv == nullptr && needsGrad(x, qkv->weight) && cpu::appliesTo(qkv_out) && cpu::appliesTo(positions.rope))
        return linear(causalSelfAttention(qkv_out, pos, positions.rope), proj->weight, {}, proj_t);
    const auto qk = positions.rotateQK(qkv_out.narrow(2, 0, 2), pos);  // [B, S, 2, H, hd], q scaled
    // Head-major views [B, H, S, hd]; with B = 1 the reshapes below stay views (bmm takes row strides).
    const auto q = qk.select(2, 0).transpose(1, 2);
    auto k = qk.select(2, 1).transpose(1, 2);
    auto v = qkv_out.select(2, 2).transpose(1, 2);
    std::int64_t prior = 0;
    if (kv != nullptr) {
        prior = kv->length();
        kv->append(k, v);
        k = kv->k;
        v = kv->v;
    }
    const auto q3 = q.reshape({B * H, S, hd}), k3 = k.reshape({B * H, prior + S, hd});
    const auto v3 = v.reshape({B * H, prior + S, hd});
    if (B == 1 && cpu::applies(x) && !torch::GradMode::is_enabled()) {
        // Heads write side by side into the [S, H * hd] rows the projection reads: no transposing copy.
        auto merged = torch::empty({S, H, hd}, x.options());
        causalAttention(q3, k3, v3, prior, positions, merged.transpose(0, 1));
        return linear(merged.view({1, S, d}), proj->weight, {}, proj_t);
    }
    const auto out = causalAttention(q3, k3, v3, prior, positions).view({B, H, S, hd});
    return linear(out.transpose(1, 2).reshape({B, S, d}), proj->weight, {}, proj_t);
}

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

// ---------------------------------------------------------------------------------------------- SwiGLU
SwiGluImpl::SwiGluImpl(std::int64_t d_model, std::int64_t d_ff) {
    gate_up = register_module("gate_up", torch::nn::Linear(torch::nn::LinearOptions(d_model, 2 * d_ff).bias(false)));
    down = register_module("down", torch::nn::Linear(torch::nn::LinearOptions(d_ff, d_model).bias(false)));
}

namespace {

// silu(gate) * up with its gradient as one kernel each way (cpu::swiGlu, cpu::swiGluBackward), for training
// on the CPU. Not twice differentiable.
struct SwiGluActivation : torch::autograd::Function<SwiGluActivation> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate_up) {
        ctx->save_for_backward({gate_up});
        return cpu::swiGlu(gate_up);
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        return {cpu::swiGluBackward(ctx->get_saved_variables()[0], grads[0])};
    }
};

}  // namespace

torch::Tensor SwiGluImpl::forward(const torch::Tensor& x) {
    const auto gate_up_out = linear(x, gate_up->weight, {}, gate_up_t);
    if (!cpu::appliesTo(gate_up_out)) {
        const auto gu = gate_up_out.chunk(2, -1);
        return linear(F::silu(gu[0]) * gu[1], down->weight, {}, down_t);
    }
    if (!needsGrad(x, gate_up->weight)) return linear(cpu::swiGlu(gate_up_out), down->weight, {}, down_t);
    return linear(SwiGluActivation::apply(gate_up_out), down->weight, {}, down_t);
}

// ---------------------------------------------------------------------------------------------- Predictor
PredictorImpl::PredictorImpl(std::int64_t d_model, std::int64_t hidden) {
    fc1 = register_module("fc1", torch::nn::Linear(torch::nn::LinearOptions(d_model, hidden)));
    fc2 = register_module("fc2", torch::nn::Linear(torch::nn::LinearOptions(hidden, 1)));
}

torch::Tensor PredictorImpl::forward(const torch::Tensor& x) {
    if (!needsGrad(x, fc1->weight) && cpu::appliesTo(x)) {
        auto sizes = x.sizes().vec();
        sizes.pop_back();
        return cpu::predictorLogits(x.reshape({-1, x.size(-1)}), fc1_t.of(fc1->weight), fc1->bias,
                                    fc2->weight, fc2->bias)
            .view(sizes);
    }
    // One output: a matrix-vector product (gemv), where fc2(...) would be a matrix product with one column.
    return torch::matmul(F::silu(linear(x, fc1->weight, fc1->bias, fc1_t)), fc2->weight.view(-1)) + fc2->bias;
}

torch::Tensor PredictorImpl::atRows(const torch::Tensor& x2d, const torch::Tensor& rows) {
    if (!needsGrad(x2d, fc1->weight) && cpu::appliesTo(x2d) && rows.device().is_cpu())
        return cpu::predictorLogits(x2d, fc1_t.of(fc1->weight), fc1->bias, fc2->weight, fc2->bias,
                                    rows.contiguous());
    return forward(x2d.index_select(0, rows.to(x2d.device())));
}

bool PredictorImpl::readsInPlace(const torch::Tensor& x, cpu::PredictorParams& params) {
    const auto& b1 = fc1->bias;
    const auto& w2 = fc2->weight;
    const auto& b2 = fc2->bias;
    if (needsGrad(x, fc1->weight) || !cpu::appliesTo(x) || !cpu::applies(fc1->weight) || !cpu::applies(b1) ||
        !b1.is_contiguous() || !cpu::applies(w2) || !w2.is_contiguous() || !cpu::applies(b2))
        return false;
    const auto w1 = fc1_t.of(fc1->weight);  // [d, h], contiguous
    params.fc1_t = w1.data_ptr<float>();
    params.b1 = b1.data_ptr<float>();
    params.w2 = w2.data_ptr<float>();
    params.b2 = *b2.data_ptr<float>();
    params.d = w1.size(0);
    params.h = w1.size(1);
    return true;
}

// ---------------------------------------------------------------------------------------------- Block
BlockImpl::BlockImpl(const ModelConfig& config, int index_) : index(index_), routed(config.isRouted(index_)) {
    attn_norm = register_module("attn_norm", RmsNorm(config.d_model, config.norm_eps));
    attn = register_module("attn", Attention(config));
    mlp_norm = register_module("mlp_norm", RmsNorm(config.d_model, config.norm_eps));
    mlp = register_module("mlp", SwiGlu(config.d_model, config.d_ff));
    if (routed) {
        router = register_module("router", torch::nn::Linear(torch::nn::LinearOptions(config.d_model, 1).bias(false)));
        predictor = register_module("predictor", Predictor(config.d_model, config.predictor_hidden));
    }
}

torch::Tensor BlockImpl::routerLogits(const torch::Tensor& x) {
    if (!needsGrad(x, router->weight) && cpu::appliesTo(x)) return cpu::rowDot(x, router->weight);
    return torch::matmul(x, router->weight.view(-1));  // a matrix-vector product, as in PredictorImpl::forward
}

namespace {

// The block's weights as the fused CPU blocks read them; the transposed copies are made (and cached) here.
cpu::BlockWeights cpuWeights(BlockImpl& b) {
    return {b.attn_norm->weight.data_ptr<float>(),
            b.attn->qkv_t.of(b.attn->qkv->weight).data_ptr<float>(),
            b.attn->proj_t.of(b.attn->proj->weight).data_ptr<float>(),
            b.mlp_norm->weight.data_ptr<float>(),
            b.mlp->gate_up_t.of(b.mlp->gate_up->weight).data_ptr<float>(),
            b.mlp->down_t.of(b.mlp->down->weight).data_ptr<float>(),
            static_cast<float>(b.attn_norm->eps),
            static_cast<float>(b.mlp_norm->eps),
            b.attn_norm->weight.size(0),
            b.attn->n_heads,
            b.attn->head_dim,
            b.mlp->down->weight.size(1)};
}

}  // namespace

void BlockImpl::addDeltaInPlace(torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                                LayerKV* kv) {
    if (kv == nullptr && x.dim() == 3 && x.size(0) == 1 && !torch::GradMode::is_enabled() &&
        cpu::appliesTo(x) && x.is_contiguous() && cpu::appliesTo(positions.rope) &&
        cpu::teamBlockFits(x.size(1), attn->head_dim)) {
        auto rows = x[0];
        cpu::addBlockInPlace(rows, pos, positions.rope, cpuWeights(*this));
        return;
    }
    x.add_(delta(x, pos, positions, kv));
}

torch::Tensor BlockImpl::delta(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions, LayerKV* kv) {
    if (kv == nullptr && x.dim() == 3 && x.size(0) == 1 && !torch::GradMode::is_enabled() && cpu::appliesTo(x) &&
        x.is_contiguous() && cpu::appliesTo(positions.rope) && cpu::smallBlockFits(x.size(1), attn->head_dim)) {
        // A routed layer's few tokens: the same kernels without a tensor per stage (cpu::smallBlockDelta). In one
        // process, alternating with the path below (d 192): 48.8-49.9 us against 60.4-61.7 at 16 tokens,
        // 159.8-161.1 against 171.5-172.4 at 64; the MoD forward at T = 128 took 1370-1394 us against 1411-1431.
        return cpu::smallBlockDelta(x[0], pos, positions.rope, cpuWeights(*this)).unsqueeze(0);
    }
    const auto a = attn(attn_norm(x), pos, positions, kv);
    if (!needsGrad(x, mlp_norm->weight) && !a.requires_grad() && cpu::appliesTo(x) && cpu::appliesTo(a)) {
        // The norm reads x + a without storing it, and the MLP's fresh output takes a in place.
        auto m = mlp(cpu::rmsNorm(x, mlp_norm->weight, mlp_norm->eps, a));
        return m.add_(a);
    }
    const auto m = mlp(mlp_norm(x + a));
    return a + m;
}

// ---------------------------------------------------------------------------------------------- routing
namespace {

// A float's rank as an unsigned key, for topkIndices: larger floats give larger keys, -0 and 0 the same one,
// and every NaN the largest.
std::uint32_t rankBits(float v) {
    if (std::isnan(v)) return std::numeric_limits<std::uint32_t>::max();
    if (v == 0.0f) v = 0.0f;
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace

torch::Tensor topkIndices(const torch::Tensor& router_logits, std::int64_t k) {
    if (!router_logits.device().is_cpu() || router_logits.scalar_type() != torch::kFloat32 || router_logits.dim() != 2 ||
        k < 0 || k > router_logits.size(1)) {
        const auto idx = std::get<1>(router_logits.topk(k, /*dim=*/1, /*largest=*/true, /*sorted=*/false));
        return std::get<0>(idx.sort(1));
    }
    // On the CPU a partial selection per row: the k-th largest of 32-bit keys, then one pass in position
    // order (already ascending). At T = 512 timed alone (Zen 5): 1.4 us, where a selection over (value,
    // position) pairs took 2.2 and topk then sort 8.4 (an older machine); inside the forward 3.9-4.8
    // against 5.3-6.6. Order as torch::topk's: NaN above everything; equal values (-0 and 0 among them) by
    // position, the earlier first.
    const auto logits = router_logits.detach().contiguous();
    const auto B = logits.size(0), T = logits.size(1);
    auto out = torch::empty({B, k}, torch::TensorOptions().dtype(torch::kLong));
    if (k == 0) return out;
    std::vector<std::uint32_t> keys(T), kth(T);
    for (std::int64_t b = 0; b < B; ++b) {
        const float* r = logits.data_ptr<float>() + b * T;
        for (std::int64_t t = 0; t < T; ++t) keys[t] = rankBits(r[t]);
        std::copy(keys.begin(), keys.end(), kth.begin());
        std::nth_element(kth.begin(), kth.begin() + (k - 1), kth.end(), std::greater<std::uint32_t>());
        const std::uint32_t last = kth[k - 1];  // the k-th largest key: all above it are taken
        auto ties = k - std::count_if(keys.begin(), keys.end(), [last](std::uint32_t v) { return v > last; });
        std::int64_t* o = out.data_ptr<std::int64_t>() + b * k;
        for (std::int64_t t = 0; t < T; ++t)
            if (keys[t] > last || (keys[t] == last && ties-- > 0)) *o++ = t;
    }
    return out;
}

namespace {

// Rows of x2d [N, d] at rows [k]: a memcpy per row on the CPU when autograd need not see it, index_select
// otherwise.
torch::Tensor selectRows(const torch::Tensor& x2d, const torch::Tensor& rows) {
    if (!needsGrad(x2d, x2d) && cpu::appliesTo(x2d) && rows.device().is_cpu()) return cpu::gatherRows(x2d, rows.contiguous());
    return x2d.index_select(0, rows);
}

// idx [B, k] into T -> row numbers [B*k] into x viewed as [B*T, d].
torch::Tensor flatRows(const torch::Tensor& idx, std::int64_t T) {
    if (idx.size(0) == 1) return idx.reshape(-1);
    return (idx + torch::arange(idx.size(0), idx.options()).unsqueeze(1) * T).reshape(-1);
}

// Whether cpu::gatherRows and cpu::addGatedRows take idx [B, k] as it is.
bool cpuRows(const torch::Tensor& idx) {
    return idx.device().is_cpu() && idx.scalar_type() == torch::kLong && idx.is_contiguous();
}

}  // namespace

torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& idx) {
    // Batched and without the flattened views: in the bench's sequence at T = 512 (64 rows), 3.2 us against
    // 4.0 through x.reshape and the flat rows.
    if (!needsGrad(x, x) && cpu::appliesTo(x) && cpuRows(idx)) return cpu::gatherRows(x, idx);
    // Whole rows copied as rows: a gather with the index expanded over d looks up every element.
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    return selectRows(x.reshape({B * T, d}), flatRows(idx, T)).view({B, idx.size(1), d});
}

torch::Tensor scatterRows(const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& rows) {
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    return x.reshape({B * T, d}).index_copy(0, flatRows(idx, T), rows.reshape({-1, d})).view({B, T, d});
}

void addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                  const torch::Tensor& delta) {
    TORCH_CHECK(x.is_contiguous() && !torch::GradMode::is_enabled(),
                "addGatedRows: in place, inference only");
    if (cpu::appliesTo(x) && cpuRows(idx) && cpu::applies(router_logits) && router_logits.is_contiguous() &&
        cpu::applies(delta) && delta.is_contiguous()) {
        // Batched, without the flattened views: 3.1 us against 4.5 at T = 512 (64 rows) in the bench's
        // sequence, where the rows come back from L3 after the block.
        cpu::addGatedRows(x, idx, router_logits, delta);
        return;
    }
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    const auto flat = flatRows(idx, T);
    auto flat_x = x.view({B * T, d});
    const auto gate = torch::sigmoid(router_logits.reshape(-1).index_select(0, flat)).unsqueeze(-1);
    flat_x.index_add_(0, flat, gate * delta.reshape({-1, d}));
}

torch::Tensor processSelected(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                              const torch::Tensor& idx, const PositionTables& positions, LayerKV* kv,
                              bool in_place) {
    if (idx.size(1) == 0) {
        if (kv != nullptr) {
            const auto B = x.size(0);
            const auto H = block.attn->n_heads, hd = block.attn->head_dim;
            kv->k = torch::zeros({B, H, 0, hd}, x.options());
            kv->v = torch::zeros({B, H, 0, hd}, x.options());
        }
        return x;
    }
    const auto xs = gatherRows(x, idx);  // [B, k, d]
    // A token keeps its own position: the selected positions are the indices themselves.
    const auto delta = block.delta(xs, idx, positions, kv);
    if (in_place) {
        auto target = x;  // a handle to x's storage, which addGatedRows writes (it checks the conditions)
        addGatedRows(target, idx, router_logits, delta);
        return x;
    }
    const auto gate = torch::sigmoid(router_logits.gather(1, idx)).unsqueeze(-1);  // [B, k, 1]
    // Without autograd xs is this call's own copy and nothing reads it after delta(): update it in place.
    const auto updated = torch::GradMode::is_enabled() ? xs + gate * delta : xs.addcmul_(gate, delta);
    return scatterRows(x, idx, updated);
}

bool CausalRule::decide(double predictor_logit, std::int64_t position, std::int64_t processed_before,
                        std::int64_t higher_before) const {
    if (prefix_topk && !inPrefixTopk(capacity, position, higher_before)) return false;
    return passes(predictor_logit, position, processed_before);
}

bool CausalRule::passes(double predictor_logit, std::int64_t position, std::int64_t processed_before) const {
    const double shortfall = capacity * double(position + 1) - double(processed_before);
    return 1.0 / (1.0 + std::exp(-(predictor_logit + budget_gain * shortfall))) > threshold;
}

namespace {

// NaN (weights that overflowed) ranks lowest, as nothing is above it.
float rankKey(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

}  // namespace

std::int64_t countAbove(const std::vector<float>& history, float value) {
    // NaN counts as -inf, as in prefixTopkCandidates, so a generation step ranks a token as the full forward
    // does.
    const float at = rankKey(value);
    return std::count_if(history.begin(), history.end(), [&](float h) { return rankKey(h) > at; });
}

namespace {

// k(n) = capacityToK(capacity, n) for n = 1 .. T at table[n - 1], kept per thread for the last capacity
// asked: the forward's routed layers share it, and the ceil per token took 40% of the walk below (perf).
const std::vector<int>& prefixK(double capacity, std::int64_t T) {
    thread_local double table_capacity = -1.0;
    thread_local std::vector<int> table;
    if (!(capacity == table_capacity)) {  // NaN never matches: recomputed each time
        table.clear();
        table_capacity = capacity;
    }
    for (auto n = static_cast<std::int64_t>(table.size()); n < T; ++n)
        table.push_back(capacityToK(capacity, static_cast<int>(n + 1)));
    return table;
}

}  // namespace

namespace {

// emit(t) for each position t of a row of T router logits that passes the prefix top-k, in order.
template <typename Emit>
void walkPrefixTopk(const float* logits, std::int64_t T, double capacity, Emit&& emit) {
    // t passes when fewer than k = k(t + 1) earlier logits are above its own, that is when it is at least the
    // k-th largest earlier logit. k never exceeds K = k(T), so only the K largest earlier logits can ever be
    // the k-th: they are kept sorted ascending in `best`, where the k-th largest is best[n - k] whatever k is.
    // A logit at or below best's smallest once K are held is never needed and costs one comparison; one above
    // it is placed by a branch-free binary search and the smallest drops out. At T = 512 and capacity 0.125,
    // on normal logits alone, 3.0 us against 4.2 for the sorted k largest with the rest in a max-heap.
    if (T <= 0) return;
    const auto& ks = prefixK(capacity, T);
    const auto K = static_cast<std::size_t>(ks[T - 1]);  // k(n) grows with n
    thread_local std::vector<float> store;
    store.resize(K);
    float* best = store.data();
    std::size_t n = 0;
    for (std::int64_t t = 0; t < T; ++t) {
        const auto k = static_cast<std::size_t>(ks[t]);
        const float v = rankKey(logits[t]);
        if (n < k || v >= best[n - k]) emit(t);
        if (n == K && !(v > best[0])) continue;
        const float* first = best;  // the first of best[0, n) above v
        for (std::size_t len = n; len > 0;) {
            const std::size_t half = len / 2;
            const bool above = first[half] <= v;
            first = above ? first + half + 1 : first;
            len = above ? len - half - 1 : half;
        }
        const auto at = static_cast<std::size_t>(first - best);
        if (n < K) {
            std::memmove(best + at + 1, best + at, (n - at) * sizeof(float));
            best[at] = v;
            ++n;
        } else {  // at >= 1: v is above best[0], which leaves
            std::memmove(best, best + 1, (at - 1) * sizeof(float));
            best[at - 1] = v;
        }
    }
}

}  // namespace

std::vector<std::int64_t> prefixTopkCandidates(const float* logits, std::int64_t T, double capacity) {
    std::vector<std::int64_t> out;
    out.reserve(static_cast<std::size_t>(T));
    walkPrefixTopk(logits, T, capacity, [&out](std::int64_t t) { out.push_back(t); });
    return out;
}

namespace {

torch::Tensor cpuFloat(const torch::Tensor& t) {
    if (t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && !t.requires_grad())
        return t;  // already what the loops below read: three dispatches saved per routed layer
    return t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
}

// t on device, where it was made on the CPU.
torch::Tensor onDevice(const torch::Tensor& t, const torch::Device& device) {
    return device.is_cpu() ? t : t.to(device);
}

// rule.passes() for a token that the prefix top-k lets through. sigmoid(v) > threshold is
// v > log(threshold / (1 - threshold)): one comparison per token where passes() takes an exp. Within 1e-6 of
// that point passes() itself decides, so the decisions stay a generation step's, whose rule.decide() calls it.
class RulePasses {
public:
    explicit RulePasses(const CausalRule& rule)
        : rule_(rule),
          inside_(rule.threshold > 0.0 && rule.threshold < 1.0),
          point_(inside_ ? std::log(rule.threshold / (1.0 - rule.threshold)) : 0.0),
          near_(1e-6 * (1.0 + std::abs(point_))) {}
    // Token t with predictor logit l after n processed tokens.
    bool operator()(double l, std::int64_t t, std::int64_t n) const {
        const double v = l + rule_.budget_gain * (rule_.capacity * double(t + 1) - double(n));
        return inside_ && std::abs(v - point_) > near_ ? v > point_ : rule_.passes(l, t, n);
    }

private:
    const CausalRule& rule_;
    bool inside_;
    double point_, near_;
};

// The rule along one row of T tokens, in order: each decision depends on the ones before it, the same
// arithmetic as a generation step's. candidates[0, n_candidates): the prefix top-k's, ascending (unused
// without it); logit(): the predictor logit of the next token that can be processed, asked once per such
// token, in order.
template <typename Logit>
void decideRow(const CausalRule& rule, std::int64_t T, const std::int64_t* candidates, std::size_t n_candidates,
               Logit&& logit, bool* sel) {
    const RulePasses passes(rule);
    std::int64_t n = 0;
    std::size_t next = 0;
    for (std::int64_t t = 0; t < T; ++t) {
        bool open = true;
        if (rule.prefix_topk) {
            open = next < n_candidates && candidates[next] == t;
            next += open ? 1 : 0;
        }
        sel[t] = open && passes(logit(t), t, n);
        n += sel[t] ? 1 : 0;
    }
}

// decideRow with the prefix top-k, visiting its candidates only: every other token is skipped and leaves the
// count of processed tokens as it is, so each candidate's decision is decideRow's. sel [T] is written whole;
// the processed positions go to chosen (room for n_candidates), ascending; returns how many.
template <typename Logit>
std::int64_t decideCandidates(const CausalRule& rule, std::int64_t T, const std::int64_t* candidates,
                              std::size_t n_candidates, Logit&& logit, bool* sel, std::int64_t* chosen) {
    const RulePasses passes(rule);
    std::fill(sel, sel + T, false);
    std::int64_t n = 0;
    for (std::size_t i = 0; i < n_candidates; ++i) {
        const auto t = candidates[i];
        sel[t] = passes(logit(t), t, n);
        if (sel[t]) chosen[n++] = t;
    }
    return n;
}

// Positions [n] as a [1, n] int64 row on device: a row's selection as the forward takes it.
torch::Tensor positionsRow(const std::int64_t* positions, std::int64_t n, const torch::Device& device) {
    auto row = torch::empty({1, n}, torch::kLong);
    std::copy(positions, positions + n, row.data_ptr<std::int64_t>());
    return onDevice(row, device);
}

// Each row's selected positions (ascending) as [1, n_b] int64 on device.
void selectedRows(const torch::Tensor& mask, const torch::Device& device, std::vector<torch::Tensor>* out) {
    if (out == nullptr) return;
    const auto B = mask.size(0), T = mask.size(1);
    out->clear();
    const bool* m = mask.data_ptr<bool>();
    std::vector<std::int64_t> rows;
    for (std::int64_t b = 0; b < B; ++b) {
        rows.clear();
        for (std::int64_t t = 0; t < T; ++t)
            if (m[b * T + t]) rows.push_back(t);
        out->push_back(positionsRow(rows.data(), static_cast<std::int64_t>(rows.size()), device));
    }
}

}  // namespace

torch::Tensor causalSelection(const torch::Tensor& predictor_logits, const torch::Tensor& router_logits,
                              const CausalRule& rule, std::vector<torch::Tensor>* selected) {
    const auto logits = cpuFloat(predictor_logits);
    const auto router = cpuFloat(router_logits);
    const auto B = logits.size(0), T = logits.size(1);
    auto out = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBool));
    std::vector<std::int64_t> candidates;
    for (std::int64_t b = 0; b < B; ++b) {
        if (rule.prefix_topk)
            candidates = prefixTopkCandidates(router.data_ptr<float>() + b * T, T, rule.capacity);
        const float* row = logits.data_ptr<float>() + b * T;
        const auto logit = [row](std::int64_t t) { return double(row[t]); };
        decideRow(rule, T, candidates.data(), candidates.size(), logit, out.data_ptr<bool>() + b * T);
    }
    selectedRows(out, predictor_logits.device(), selected);
    return onDevice(out, predictor_logits.device());
}

torch::Tensor causalRouting(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                            const CausalRule& rule, std::int64_t* predictor_rows,
                            std::vector<torch::Tensor>* selected) {
    if (!rule.prefix_topk) {
        if (predictor_rows != nullptr) *predictor_rows = x.size(0) * x.size(1);
        return causalSelection(block.predictor(x.detach()), router_logits, rule, selected);
    }
    // A token outside the router's top k of the tokens so far is skipped whatever the predictor says, so the
    // predictor reads only the others: about capacity x T rows instead of T.
    const auto router = cpuFloat(router_logits);
    const auto B = router.size(0), T = router.size(1), d = x.size(2);
    cpu::PredictorParams params;
    if (x.dim() == 3 && x.is_contiguous() && block.predictor->readsInPlace(x, params)) {
        // The predictor reads each candidate as the walk finds it, on the team's other thread; the walk's
        // thread joins it when the row is walked (cpu::predictorLogitsFed), and no tensor is made on the way.
        // Bundled model, in alternating processes: 8.0-8.2 us against 10.1-10.3 at T = 512 (walk, then the
        // predictor on both threads), 3.5-3.6 against 5.7-5.8 at T = 128.
        auto out = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBool));
        thread_local std::vector<float> logits;
        thread_local std::vector<std::int64_t> chosen;
        logits.resize(static_cast<std::size_t>(T));
        chosen.resize(static_cast<std::size_t>(T));
        if (selected != nullptr) selected->clear();
        std::int64_t read = 0;
        for (std::int64_t b = 0; b < B; ++b) {
            cpu::RowFeed feed(T);
            const float* r = router.data_ptr<float>() + b * T;
            const auto walk = [&] {
                walkPrefixTopk(r, T, rule.capacity, [&feed](std::int64_t t) { feed.push(t); });
            };
            // By reference: a std::function holding the lambda itself would allocate it (four captures).
            cpu::predictorLogitsFed(params, x.data_ptr<float>() + b * T * d, d, feed, std::cref(walk),
                                    logits.data());
            const float* logit = logits.data();
            const auto next_logit = [&logit](std::int64_t) { return double(*logit++); };
            const auto n = decideCandidates(rule, T, feed.rows(), static_cast<std::size_t>(feed.size()),
                                            next_logit, out.data_ptr<bool>() + b * T, chosen.data());
            read += feed.size();
            if (selected != nullptr) selected->push_back(positionsRow(chosen.data(), n, router_logits.device()));
        }
        if (predictor_rows != nullptr) *predictor_rows = read;
        return onDevice(out, router_logits.device());
    }
    std::vector<std::vector<std::int64_t>> candidates(B);
    std::vector<std::int64_t> rows;  // the candidates as rows of x viewed [B * T, d]
    for (std::int64_t b = 0; b < B; ++b) {
        candidates[b] = prefixTopkCandidates(router.data_ptr<float>() + b * T, T, rule.capacity);
        for (const auto t : candidates[b]) rows.push_back(b * T + t);
    }
    if (predictor_rows != nullptr) *predictor_rows = static_cast<std::int64_t>(rows.size());
    torch::Tensor logits;  // [rows], in the candidates' order
    if (!rows.empty()) {
        // A view of rows, read before it goes out of scope.
        const auto idx =
            torch::from_blob(rows.data(), {static_cast<std::int64_t>(rows.size())}, torch::kLong);
        const auto x2d = (x.requires_grad() ? x.detach() : x).reshape({B * T, d});
        logits = cpuFloat(block.predictor->atRows(x2d, idx));
    }
    auto out = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBool));
    const float* logit = logits.defined() ? logits.data_ptr<float>() : nullptr;
    const auto next_logit = [&logit](std::int64_t) { return double(*logit++); };
    for (std::int64_t b = 0; b < B; ++b)
        decideRow(rule, T, candidates[b].data(), candidates[b].size(), next_logit, out.data_ptr<bool>() + b * T);
    selectedRows(out, router_logits.device(), selected);
    return onDevice(out, router_logits.device());
}

namespace {

void checkCancel(const std::atomic<bool>* cancel) {
    if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) throw Cancelled();
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
            if (name.find("bias") != std::string::npos) t.zero_();
            else t.normal_(0.0, 1.0 / std::sqrt(double(t.size(1))));
        } else if (name.find("proj.weight") != std::string::npos || name.find("down.weight") != std::string::npos) {
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
    for (std::size_t li = 0; li < blocks.size(); ++li) {
        if (options.layer_ms != nullptr && li > 0) layerDone();
        checkCancel(options.cancel);
        if (options.residuals != nullptr && li > 0) options.residuals->push_back(x);
        auto& block = *blocks[li];
        LayerKV* kv = options.kv != nullptr ? &(*options.kv)[li] : nullptr;
        if (!block.routed) {
            if (in_place)
                block.addDeltaInPlace(x, pos, positions, kv);
            else
                x = x + block.delta(x, pos, positions, kv);
            if (routing != nullptr && options.collect) {
                auto& r = (*routing)[li];
                r.k = T;
                r.selected_mask = torch::ones({B, T}, ids.options().dtype(torch::kBool));
            }
            continue;
        }
        const auto k = capacityToK(options.capacity, static_cast<int>(T));
        const auto router_logits = block.routerLogits(x);  // [B, T]
        if (kv != nullptr && options.predictor_prefix_topk) {  // generation steps rank their token against these
            const auto r = router_logits[0].to(torch::kCPU, torch::kFloat32).contiguous();
            kv->router_logits.assign(r.data_ptr<float>(), r.data_ptr<float>() + T);
        }
        const bool need_topk = options.mode == RoutingMode::TopK || options.collect;
        torch::Tensor topk_idx;
        if (need_topk) topk_idx = topkIndices(router_logits, k);  // [B, k]
        torch::Tensor predictor_logits;  // [B, T], every token's: a trace shows them all
        std::int64_t predictor_rows = 0;
        if (options.collect) {
            predictor_logits = block.predictor(x.detach());
            predictor_rows = B * T;
        }

        torch::Tensor selected_mask;
        if (options.mode == RoutingMode::TopK) {
            x = processSelected(block, x, router_logits, topk_idx, positions, kv, in_place);
        } else {
            // Each token decides from its own block input, which depends on earlier tokens only, and from the
            // layer's decisions on earlier tokens.
            std::vector<torch::Tensor> chosen;  // [1, n_b] per row, ascending
            selected_mask =
                predictor_logits.defined()
                    ? causalSelection(predictor_logits, router_logits, options.causalRule(), &chosen)
                    : causalRouting(block, x, router_logits, options.causalRule(), &predictor_rows, &chosen);
            std::vector<torch::Tensor> rows;  // each row's own selection; in place, rows of x itself
            for (std::int64_t b = 0; b < B; ++b)  // one row: x itself, no views
                rows.push_back(B == 1 ? processSelected(block, x, router_logits, chosen[b], positions, kv, in_place)
                                      : processSelected(block, x.narrow(0, b, 1), router_logits.narrow(0, b, 1),
                                                        chosen[b], positions, kv, in_place));
            if (!in_place) x = B == 1 ? rows[0] : torch::cat(rows, 0);
        }
        if (routing != nullptr) {
            auto& r = (*routing)[li];
            r.k = k;
            r.router_logits = router_logits;
            r.predictor_logits = predictor_logits;
            r.predictor_rows = predictor_rows;
            if (topk_idx.defined() && options.collect)  // without collect, top-k mode's selection is its k
                r.topk_mask = torch::zeros({B, T}, ids.options().dtype(torch::kBool)).scatter(1, topk_idx, true);
            r.selected_mask = options.mode == RoutingMode::TopK ? r.topk_mask : selected_mask;
        }
    }
    if (options.layer_ms != nullptr && !blocks.empty()) layerDone();
    if (options.residuals != nullptr) options.residuals->push_back(x);
    return norm_f(x);
}

torch::Tensor ModTransformerImpl::embed(const torch::Tensor& ids) {
    const auto& w = tok_emb->weight;
    // Without autograd, a copy per token's row (cpu::gatherRows checks the ids as the module does): the
    // module's index_select took 30-55 us of a 128-token forward where its rows alone take 4 us from cache.
    if (!needsGrad(w, w) && cpu::appliesTo(w) && ids.device().is_cpu() && ids.dim() == 2)
        return cpu::gatherRows(w, ids.to(torch::kLong).contiguous().view({-1}))
            .view({ids.size(0), ids.size(1), w.size(1)});
    return tok_emb(ids);
}

torch::Tensor ModTransformerImpl::logits(const torch::Tensor& h) { return linear(h, tok_emb->weight, {}, head_t); }

void ModTransformerImpl::logitsInto(const torch::Tensor& h, torch::Tensor& out) {
    TORCH_CHECK(!torch::GradMode::is_enabled() && cpu::applies(h) && h.dim() == 2, "logitsInto: CPU [N, d] without autograd");
    cpu::gemmInto(h, head_t.of(tok_emb->weight), out, 0.f);
}

torch::Tensor ModTransformerImpl::step(std::int64_t token, std::int64_t position, std::vector<LayerKV>& kv,
                                       const CausalRule& rule, std::vector<std::uint8_t>* processed,
                                       std::vector<float>* prob) {
    TORCH_CHECK(position >= 0 && position < config.max_seq_len, "position ", position, " beyond max_seq_len");
    TORCH_CHECK(kv.size() == blocks.size(), "KV cache has ", kv.size(), " layers");
    const auto opts = torch::TensorOptions().device(tok_emb->weight.device()).dtype(torch::kLong);
    const auto pos = torch::full({1, 1}, position, opts);
    auto x = embed(torch::full({1, 1}, token, opts));  // [1, 1, d]
    if (processed) processed->assign(blocks.size(), 1);
    if (prob) prob->assign(blocks.size(), std::numeric_limits<float>::quiet_NaN());
    for (std::size_t li = 0; li < blocks.size(); ++li) {
        auto& block = *blocks[li];
        if (!block.routed) {
            x = x + block.delta(x, pos, positions, &kv[li]);
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
        x = x + torch::sigmoid(router_logit).unsqueeze(-1) * block.delta(x, pos, positions, &kv[li]);
    }
    return logits(norm_f(x)).view({-1});
}

}  // namespace modscope::nn
