// The kernel backend (backend/backend.h): fused x86-64 float32 loops and oneDNN's sgemm where they take the
// arguments, the operator backend's version everywhere else. Built only with MODSCOPE_CPU_KERNELS.
#include <torch/autograd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>

#include "backend/backend.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_matmul.h"
#include "cpu/cpu_training.h"
#include "nn/attention_blocks.h"
#include "nn/modules.h"
#include "nn/prefix_topk.h"

namespace modscope::backend {

namespace {

using cpu::appliesTo;

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

// A float's rank as an unsigned key, for topkIndices: larger floats give larger keys, -0 and 0 the same one,
// and every NaN the largest.
std::uint32_t rankBits(float v) {
    if (std::isnan(v)) return std::numeric_limits<std::uint32_t>::max();
    if (v == 0.0f) v = 0.0f;
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The block's weights as the fused CPU blocks read them; the transposed copies are made (and cached) here.
cpu::BlockWeights cpuWeights(nn::BlockImpl& b) {
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

// Whether cpu::gatherRows and cpu::addGatedRows take idx [B, k] as it is.
bool cpuRows(const torch::Tensor& idx) {
    return idx.device().is_cpu() && idx.scalar_type() == torch::kLong && idx.is_contiguous();
}

}  // namespace

class CpuKernelsBackend final : public OpsBackend {
public:
    const char* name() const override { return "cpu-kernels"; }

    torch::Tensor rmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                          const torch::Tensor& plus) const override {
        if (!appliesTo(x) || !appliesTo(weight) || (plus.defined() && !appliesTo(plus)))
            return OpsBackend::rmsNorm(x, weight, eps, plus);
        if (needsGrad(x, weight) || (plus.defined() && plus.requires_grad() && torch::GradMode::is_enabled()))
            return RmsNormFunction::apply(plus.defined() ? x + plus : x, weight, eps);
        // The norm of x + plus reads both without storing their sum.
        return cpu::rmsNorm(x, weight, eps, plus);
    }

    torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         TransposedWeight& cache) const override {
        if (!cpu::applies(x) || !cpu::applies(weight)) return OpsBackend::linear(x, weight, bias, cache);
        const bool grad = needsGrad(x, weight) || (bias.defined() && needsGrad(bias, bias));
        auto shape = x.sizes().vec();
        shape.back() = weight.size(0);
        // With autograd the product reads W through a transposed view, so its gradient reaches the parameter;
        // without, it reads the cached [in, out] copy: sgemm runs 1.2-6x faster on it for few rows.
        auto y = cpu::mm(x.reshape({-1, x.size(-1)}), grad ? weight.t() : cache.of(weight)).view(shape);
        if (!bias.defined()) return y;
        return grad ? y + bias : y.add_(bias);
    }

    torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b,
                      const torch::Tensor& add) const override {
        if (cpu::applies(a) && cpu::applies(b)) return cpu::bmm(a, b, add);
        return OpsBackend::bmm(a, b, add);
    }

    void headInto(const torch::Tensor& hidden, const torch::Tensor& weight, TransposedWeight& cache,
                  torch::Tensor& out) const override {
        if (!cpu::applies(hidden) || !cpu::applies(weight) || !cpu::applies(out) || !out.is_contiguous())
            return OpsBackend::headInto(hidden, weight, cache, out);
        cpu::gemmInto(hidden, cache.of(weight), out, 0.f);
    }

    torch::Tensor rotateQK(const torch::Tensor& qk, const torch::Tensor& pos,
                           const torch::Tensor& rope) const override {
        if (!needsGrad(qk, rope) && appliesTo(qk) && appliesTo(rope)) return cpu::rotateQK(qk, pos, rope);
        return OpsBackend::rotateQK(qk, pos, rope);
    }

    torch::Tensor selfAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                const nn::PositionTables& positions, nn::LayerKV* kv) const override {
        const auto B = qkv.size(0), S = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
        // Training: one autograd function (cpu_training.h), where the operators cost a dozen dispatches and
        // zero-filled gradients of the whole qkv output each way.
        if (kv == nullptr && needsGrad(qkv, qkv) && appliesTo(qkv) && appliesTo(positions.rope))
            return nn::causalSelfAttention(qkv, pos, positions.rope);
        if (B != 1 || !cpu::applies(qkv) || torch::GradMode::is_enabled() || !appliesTo(positions.rope))
            return OpsBackend::selfAttention(qkv, pos, positions, kv);
        const auto h = heads(rotateQK(qkv.narrow(2, 0, 2), pos, positions.rope), qkv, kv);
        // Heads write side by side into the [S, H * hd] rows the projection reads: no transposing copy.
        auto merged = torch::empty({S, H, hd}, qkv.options());
        auto into = merged.transpose(0, 1);  // [H, S, hd]
        if (S <= kSmallAttentionQueries || cpu::wideAttentionFits(S, h.prior, hd)) {
            cpu::smallCausalAttention(h.q, h.k, h.v, h.prior, into);
            return merged.view({1, S, H * hd});
        }
        // Each query's probabilities over its own key and the earlier ones, zeros after, in place (the bias
        // the operator path adds costs a copy of every score).
        for (std::int64_t s = 0; s < S; s += kAttentionQueryBlock) {
            const auto n = std::min(kAttentionQueryBlock, S - s), visible = h.prior + s + n;
            auto scores = cpu::bmm(h.q.narrow(1, s, n), h.k.narrow(1, 0, visible).transpose(1, 2));
            cpu::causalSoftmax(scores, h.prior + s);
            auto target = into.narrow(1, s, n);
            cpu::bmmInto(scores, h.v.narrow(1, 0, visible), target);
        }
        return merged.view({1, S, H * hd});
    }

    torch::Tensor swiGlu(const torch::Tensor& gate_up) const override {
        if (!appliesTo(gate_up)) return OpsBackend::swiGlu(gate_up);
        if (!needsGrad(gate_up, gate_up)) return cpu::swiGlu(gate_up);
        return SwiGluActivation::apply(gate_up);
    }

    torch::Tensor embed(const torch::Tensor& table, const torch::Tensor& ids) const override {
        // Without autograd, a copy per token's row (cpu::gatherRows checks the ids as the module does): the
        // module's index_select took 30-55 us of a 128-token forward where its rows alone take 4 us from
        // cache.
        if (!needsGrad(table, table) && appliesTo(table) && ids.device().is_cpu() && ids.dim() == 2)
            return cpu::gatherRows(table, ids.to(torch::kLong).contiguous().view({-1}))
                .view({ids.size(0), ids.size(1), table.size(1)});
        return OpsBackend::embed(table, ids);
    }

    torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& idx) const override {
        if (!needsGrad(x, x) && appliesTo(x) && cpuRows(idx)) return cpu::gatherRows(x, idx);
        return OpsBackend::gatherRows(x, idx);
    }

    void addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                      const torch::Tensor& delta) const override {
        TORCH_CHECK(x.is_contiguous() && !torch::GradMode::is_enabled(),
                    "addGatedRows: in place, inference only");
        if (appliesTo(x) && cpuRows(idx) && cpu::applies(router_logits) && router_logits.is_contiguous() &&
            cpu::applies(delta) && delta.is_contiguous()) {
            cpu::addGatedRows(x, idx, router_logits, delta);
            return;
        }
        OpsBackend::addGatedRows(x, idx, router_logits, delta);
    }

    torch::Tensor routerLogits(const torch::Tensor& x, const torch::Tensor& weight) const override {
        if (!needsGrad(x, weight) && appliesTo(x) && cpu::applies(weight)) return cpu::rowDot(x, weight);
        return OpsBackend::routerLogits(x, weight);
    }

    torch::Tensor predictorLogits(const PredictorWeights& p, const torch::Tensor& x,
                                  const torch::Tensor& rows) const override {
        if (needsGrad(x, p.fc1_weight) || !appliesTo(x) || !cpu::applies(p.fc1_weight))
            return OpsBackend::predictorLogits(p, x, rows);
        if (rows.defined()) {
            if (!rows.device().is_cpu()) return OpsBackend::predictorLogits(p, x, rows);
            return cpu::predictorLogits(x, p.fc1_t.of(p.fc1_weight), p.fc1_bias, p.fc2_weight, p.fc2_bias,
                                        rows.contiguous());
        }
        auto sizes = x.sizes().vec();
        sizes.pop_back();
        return cpu::predictorLogits(x.reshape({-1, x.size(-1)}), p.fc1_t.of(p.fc1_weight), p.fc1_bias,
                                    p.fc2_weight, p.fc2_bias)
            .view(sizes);
    }

    torch::Tensor topkIndices(const torch::Tensor& router_logits, std::int64_t k) const override {
        if (!router_logits.device().is_cpu() || router_logits.scalar_type() != torch::kFloat32 ||
            router_logits.dim() != 2 || k < 0 || k > router_logits.size(1))
            return OpsBackend::topkIndices(router_logits, k);
        // On the CPU a partial selection per row: the k-th largest of 32-bit keys, then one pass in position
        // order (already ascending). At T = 512 timed alone (Zen 5): 1.4 us, where a selection over (value,
        // position) pairs took 2.2 and topk then sort 8.4 (an older machine); inside the forward 3.9-4.8
        // against 5.3-6.6. Order as torch::topk's: NaN above everything; equal values (-0 and 0 among them)
        // by position, the earlier first.
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
            auto ties =
                k - std::count_if(keys.begin(), keys.end(), [last](std::uint32_t v) { return v > last; });
            std::int64_t* o = out.data_ptr<std::int64_t>() + b * k;
            for (std::int64_t t = 0; t < T; ++t)
                if (keys[t] > last || (keys[t] == last && ties-- > 0)) *o++ = t;
        }
        return out;
    }

    void prefixCandidateLogits(const PredictorWeights& p, const torch::Tensor& x, std::int64_t b,
                               const float* router_row, double capacity, std::vector<std::int64_t>& positions,
                               std::vector<float>& logits) const override {
        cpu::PredictorParams params;
        if (x.dim() != 3 || !x.is_contiguous() || !readsInPlace(p, x, params))
            return OpsBackend::prefixCandidateLogits(p, x, b, router_row, capacity, positions, logits);
        // The predictor reads each candidate as the walk finds it, on the team's other thread; the walk's
        // thread joins it when the row is walked (cpu::predictorLogitsFed), and no tensor is made on the way.
        const auto T = x.size(1), d = x.size(2);
        cpu::RowFeed feed(T);
        const auto walk = [&] {
            nn::walkPrefixTopk(router_row, T, capacity, [&feed](std::int64_t t) { feed.push(t); });
        };
        logits.resize(static_cast<std::size_t>(T));
        // By reference: a std::function holding the lambda itself would allocate it (four captures).
        cpu::predictorLogitsFed(params, x.data_ptr<float>() + b * T * d, d, feed, std::cref(walk),
                                logits.data());
        const auto n = static_cast<std::size_t>(feed.size());
        positions.assign(feed.rows(), feed.rows() + n);
        logits.resize(n);
    }

    torch::Tensor crossEntropy(const torch::Tensor& logits, const torch::Tensor& targets) const override {
        if (!appliesTo(logits) || logits.dim() != 2 || !targets.device().is_cpu())
            return OpsBackend::crossEntropy(logits, targets);
        return nn::crossEntropyLoss(logits, targets);
    }

    torch::Tensor fusedBlockDelta(nn::BlockImpl& block, const torch::Tensor& x, const torch::Tensor& pos,
                                  const nn::PositionTables& positions) const override {
        if (x.dim() == 3 && x.size(0) == 1 && !torch::GradMode::is_enabled() && appliesTo(x) &&
            x.is_contiguous() && appliesTo(positions.rope) &&
            cpu::smallBlockFits(x.size(1), block.attn->head_dim)) {
            // A routed layer's few tokens: the same kernels without a tensor per stage
            // (cpu::smallBlockDelta).
            return cpu::smallBlockDelta(x[0], pos, positions.rope, cpuWeights(block)).unsqueeze(0);
        }
        return {};
    }

    bool fusedAddBlock(nn::BlockImpl& block, torch::Tensor& x, const torch::Tensor& pos,
                       const nn::PositionTables& positions) const override {
        if (x.dim() == 3 && x.size(0) == 1 && !torch::GradMode::is_enabled() && appliesTo(x) &&
            x.is_contiguous() && appliesTo(positions.rope) &&
            cpu::teamBlockFits(x.size(1), block.attn->head_dim)) {
            auto rows = x[0];
            cpu::addBlockInPlace(rows, pos, positions.rope, cpuWeights(block));
            return true;
        }
        return false;
    }

private:
    // Whether the predictor can read x's rows in place; if so, params holds its parameters (the transposed
    // fc1 is the cache's, valid until the weight changes).
    static bool readsInPlace(const PredictorWeights& p, const torch::Tensor& x,
                             cpu::PredictorParams& params) {
        if (needsGrad(x, p.fc1_weight) || !appliesTo(x) || !cpu::applies(p.fc1_weight) ||
            !cpu::applies(p.fc1_bias) || !p.fc1_bias.is_contiguous() || !cpu::applies(p.fc2_weight) ||
            !p.fc2_weight.is_contiguous() || !cpu::applies(p.fc2_bias))
            return false;
        const auto w1 = p.fc1_t.of(p.fc1_weight);  // [d, h], contiguous
        params.fc1_t = w1.data_ptr<float>();
        params.b1 = p.fc1_bias.data_ptr<float>();
        params.w2 = p.fc2_weight.data_ptr<float>();
        params.b2 = *p.fc2_bias.data_ptr<float>();
        params.d = w1.size(0);
        params.h = w1.size(1);
        return true;
    }
};

const OpsBackend& cpuKernelsBackend() {
    static const CpuKernelsBackend backend;
    return backend;
}

}  // namespace modscope::backend
