// The training step's fused operations (cpu_training.h). Built with OpenMP, as cpu_kernels.cpp: the row loops
// split over LibTorch's threads from kParallelRows rows. Every row's arithmetic is the same on one thread as
// on two (no sums across rows, but the loss's, which is summed in row order), so a resumed run repeats its
// losses whichever thread count cpu::adaptThreads picked.
#include "cpu/cpu_training.h"

#include <torch/autograd.h>
#include <torch/nn/functional/loss.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "nn/attention_blocks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_loops.h"
#include "cpu/cpu_matmul.h"

namespace modscope::cpu {

namespace {

// The transpose of rotateHead, for its gradient: rotateHead reads x[i + half] into y[i] with s[i] and x[i]
// into y[i + half] with s[i + half], so dx[i] takes dy[i + half] with s[i + half] and dx[i + half] takes
// dy[i] with s[i].
template <Isa kIsa>
inline __attribute__((always_inline)) void rotateHeadBackBody(const float* dy, const float* c, const float* s,
                                                              float* dx, std::int64_t hd) {
    const std::int64_t half = hd / 2;
    for (std::int64_t i = 0; i < half; ++i) dx[i] = dy[i] * c[i] + dy[i + half] * s[i + half];
    for (std::int64_t i = half; i < hd; ++i) dx[i] = dy[i] * c[i] + dy[i - half] * s[i - half];
}
MODSCOPE_ISA_BUILDS(void, rotateHeadBack, "avx2",
                    (const float* dy, const float* c, const float* s, float* dx, std::int64_t hd),
                    (dy, c, s, dx, hd))

// Strides of a token-major [B, S, 3, H, hd] layout (the last dimension contiguous): batch, token, part, head.
struct TokenStrides {
    std::int64_t b, s, part, head;
};

// The head split's two layouts, moved one way. Token-major: part `which` (q, k, v) of head h of token (b, s)
// at tokens + b * st.b + s * st.s + which * st.part + h * st.head. Head-major [3, B * H, S, hd], contiguous.
// Forward (kBack false) reads tokens into heads, rotating q and k; backward reads heads into tokens through
// the rotation's transpose. v moves as it is.
template <bool kBack>
void moveHeads(std::conditional_t<kBack, float*, const float*> tokens, TokenStrides st,
               std::conditional_t<kBack, const float*, float*> heads, std::int64_t B, std::int64_t S,
               std::int64_t H, std::int64_t hd, const Rotary& r) {
    const auto N = B * H;
    forRowShares(B * S, [&](std::int64_t t0, std::int64_t t1) {
        for (auto t = t0; t < t1; ++t) {
            const auto b = t / S, s = t % S;
            for (std::int64_t which = 0; which < 3; ++which)
                for (std::int64_t h = 0; h < H; ++h) {
                    const auto tok = tokens + b * st.b + s * st.s + which * st.part + h * st.head;
                    const auto head = heads + ((which * N + b * H + h) * S + s) * hd;
                    if constexpr (kBack) {
                        if (which == 2)
                            std::memcpy(tok, head, sizeof(float) * hd);
                        else
                            rotateHeadBack(head, r.cos(t, which, hd), r.sin(t, which, hd), tok, hd);
                    } else {
                        if (which == 2)
                            std::memcpy(head, tok, sizeof(float) * hd);
                        else
                            rotateHead(tok, r.cos(t, which, hd), r.sin(t, which, hd), head, hd);
                    }
                }
        }
    });
}

// The gradient of a softmax row over its first `visible` entries, in place in g; entries after them 0.
template <Isa kIsa>
inline __attribute__((always_inline)) void softmaxGradRowBody(const float* p, float* g, std::int64_t visible,
                                                              std::int64_t n) {
    Float8 acc = {};
    std::int64_t j = 0;
    for (; j + 8 <= visible; j += 8) acc += MODSCOPE_LOAD8(p + j) * MODSCOPE_LOAD8(g + j);
    float dot = MODSCOPE_SUM8(acc);
    for (; j < visible; ++j) dot += p[j] * g[j];
    for (j = 0; j < visible; ++j) g[j] = p[j] * (g[j] - dot);
    std::fill(g + visible, g + n, 0.0f);
}
MODSCOPE_ISA_BUILDS(void, softmaxGradRow, "arch=x86-64-v3",
                    (const float* p, float* g, std::int64_t visible, std::int64_t n),
                    (p, g, visible, n))

// log(sum(exp(row))) over n floats, with e as room for n floats.
float logSumExp(const float* row, float* e, std::int64_t n) {
    float max = 0.0f;
    const float sum = softmaxNumerators(row, e, n, n, &max);
    return max + std::log(sum);
}

// The rows of logits [N, V] (rows contiguous) with their targets, checked.
struct LossRows {
    torch::Tensor targets;
    const float* x = nullptr;
    const std::int64_t* t = nullptr;
    std::int64_t N = 0, V = 0, ld = 0;
};

LossRows lossRows(const torch::Tensor& logits, const torch::Tensor& targets_in, const char* caller) {
    TORCH_CHECK(appliesTo(logits) && logits.dim() == 2 && logits.size(1) > 0, caller,
                ": float32 CPU logits [N, V] expected");
    LossRows r;
    r.N = logits.size(0);
    r.V = logits.size(1);
    r.ld = r.N > 1 ? logits.stride(0) : r.V;
    r.targets = targets_in.to(torch::kCPU, torch::kLong).contiguous().view({-1});
    TORCH_CHECK(r.targets.numel() == r.N, caller, ": one target per row expected");
    r.t = r.targets.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < r.N; ++i)
        TORCH_CHECK(r.t[i] >= 0 && r.t[i] < r.V, caller, ": target ", r.t[i], " out of range");
    r.x = logits.data_ptr<float>();
    return r;
}

}  // namespace

torch::Tensor splitHeads(const torch::Tensor& qkv, const torch::Tensor& pos, const torch::Tensor& rope) {
    TORCH_CHECK(appliesTo(qkv) && qkv.dim() == 5 && qkv.size(2) == 3 && qkv.size(4) % 2 == 0,
                "cpu::splitHeads: float32 CPU qkv [B, S, 3, H, hd] expected");
    const auto B = qkv.size(0), S = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
    const auto r = rotary(pos, rope, B * S, hd, "cpu::splitHeads");
    auto out = torch::empty({3, B * H, S, hd}, qkv.options());
    moveHeads<false>(qkv.data_ptr<float>(), {qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)},
                     out.data_ptr<float>(), B, S, H, hd, r);
    return out;
}

torch::Tensor splitHeadsBackward(const torch::Tensor& grad_in, const torch::Tensor& pos,
                                 const torch::Tensor& rope, std::int64_t batch) {
    TORCH_CHECK(applies(grad_in) && grad_in.dim() == 4 && grad_in.size(0) == 3 && batch > 0 &&
                    grad_in.size(1) % batch == 0 && grad_in.size(3) % 2 == 0,
                "cpu::splitHeadsBackward: float32 CPU [3, B * H, S, hd] expected");
    const auto grad = grad_in.contiguous();
    const auto S = grad.size(2), hd = grad.size(3), B = batch, H = grad.size(1) / B;
    const auto r = rotary(pos, rope, B * S, hd, "cpu::splitHeadsBackward");
    auto out = torch::empty({B, S, 3, H, hd}, grad.options());
    moveHeads<true>(out.data_ptr<float>(), {out.stride(0), out.stride(1), out.stride(2), out.stride(3)},
                    grad.data_ptr<float>(), B, S, H, hd, r);
    return out;
}

void causalSoftmaxBackward(const torch::Tensor& probs, torch::Tensor& grad, std::int64_t first) {
    TORCH_CHECK(appliesTo(probs) && appliesTo(grad) && probs.dim() == 3 && grad.sizes() == probs.sizes() &&
                    first >= 0,
                "cpu::causalSoftmaxBackward: float32 CPU probs and grad [P, n, keys] of one shape expected");
    const auto P = probs.size(0), n = probs.size(1), keys = probs.size(2);
    const float* p = probs.data_ptr<float>();
    float* g = grad.data_ptr<float>();
    const auto pp = probs.stride(0), pr = probs.stride(1), gp = grad.stride(0), gr = grad.stride(1);
    forRowShares(P * n, [&](std::int64_t r0, std::int64_t r1) {
        for (auto r = r0; r < r1; ++r) {
            const auto b = r / n, i = r % n;
            softmaxGradRow(p + b * pp + i * pr, g + b * gp + i * gr, std::min(keys, first + i + 1), keys);
        }
    });
}

CrossEntropyRows crossEntropy(const torch::Tensor& logits, const torch::Tensor& targets) {
    const auto rows = lossRows(logits, targets, "cpu::crossEntropy");
    CrossEntropyRows out;
    out.lse = torch::empty({rows.N}, logits.options());
    float* lse = out.lse.data_ptr<float>();
    std::vector<float> loss(static_cast<std::size_t>(rows.N));
    forRowShares(rows.N, [&](std::int64_t r0, std::int64_t r1) {
        std::vector<float> e(static_cast<std::size_t>(rows.V));
        for (auto r = r0; r < r1; ++r) {
            const float* row = rows.x + r * rows.ld;
            lse[r] = logSumExp(row, e.data(), rows.V);
            loss[r] = lse[r] - row[rows.t[r]];
        }
    });
    double sum = 0.0;
    for (const float l : loss) sum += l;
    out.loss = rows.N > 0 ? sum / static_cast<double>(rows.N) : std::nan("");
    return out;
}

torch::Tensor crossEntropyBackward(const torch::Tensor& logits, const torch::Tensor& targets,
                                   const torch::Tensor& lse_in, float scale) {
    const auto rows = lossRows(logits, targets, "cpu::crossEntropyBackward");
    const auto lse = lse_in.contiguous();
    TORCH_CHECK(applies(lse) && lse.numel() == rows.N, "cpu::crossEntropyBackward: lse [N] expected");
    auto out = torch::empty({rows.N, rows.V}, logits.options());
    const float* l = lse.data_ptr<float>();
    float* o = out.data_ptr<float>();
    forRowShares(rows.N, [&](std::int64_t r0, std::int64_t r1) {
        for (auto r = r0; r < r1; ++r) {
            float* dst = o + r * rows.V;
            expRow(rows.x + r * rows.ld, 1.0f, l[r], dst, rows.V);
            for (std::int64_t j = 0; j < rows.V; ++j) dst[j] *= scale;
            dst[rows.t[r]] -= scale;
        }
    });
    return out;
}

}  // namespace modscope::cpu

namespace modscope::nn {

namespace {

struct CausalSelfAttentionFunction : torch::autograd::Function<CausalSelfAttentionFunction> {
    // pos and rope by pointer: constants, not inputs of the graph.
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv,
                                 const torch::Tensor* pos, const torch::Tensor* rope) {
        const auto B = qkv.size(0), S = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
        const auto heads = cpu::splitHeads(qkv, *pos, *rope);  // [3, B * H, S, hd]
        const auto q = heads[0], k = heads[1], v = heads[2];
        auto out = torch::empty({B * H, S, hd}, qkv.options());
        torch::autograd::variable_list saved{heads};
        for (std::int64_t s = 0; s < S; s += kAttentionQueryBlock) {
            const auto n = std::min(kAttentionQueryBlock, S - s), visible = s + n;
            auto probs =
                cpu::bmm(q.narrow(1, s, n), k.narrow(1, 0, visible).transpose(1, 2));  // [B H, n, visible]
            cpu::causalSoftmax(probs, s);
            auto target = out.narrow(1, s, n);
            cpu::bmmInto(probs, v.narrow(1, 0, visible), target);
            saved.push_back(probs);
        }
        ctx->save_for_backward(saved);
        ctx->saved_data["pos"] = *pos;
        ctx->saved_data["rope"] = *rope;
        ctx->saved_data["batch"] = B;
        return out.view({B, H, S, hd}).transpose(1, 2).reshape({B, S, H * hd});
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto& heads = saved[0];
        const auto B = ctx->saved_data["batch"].toInt();
        const auto N = heads.size(1), S = heads.size(2), hd = heads.size(3), H = N / B;
        const auto q = heads[0], k = heads[1], v = heads[2];
        const auto d_out =
            grads[0].reshape({B, S, H, hd}).permute({0, 2, 1, 3}).contiguous().view({N, S, hd});
        auto d_heads = torch::empty_like(heads);
        auto dq = d_heads[0], dk = d_heads[1], dv = d_heads[2];
        // The last block sees every key: it writes all of dk and dv, and the earlier blocks add to their
        // prefix.
        const auto blocks = static_cast<std::int64_t>(saved.size()) - 1;
        for (auto i = blocks - 1; i >= 0; --i) {
            const auto s = i * kAttentionQueryBlock, n = std::min(kAttentionQueryBlock, S - s),
                       visible = s + n;
            const float beta = i == blocks - 1 ? 0.0f : 1.0f;
            const auto& probs = saved[1 + i];
            const auto d_out_block = d_out.narrow(1, s, n);
            auto dv_seen = dv.narrow(1, 0, visible), dk_seen = dk.narrow(1, 0, visible),
                 dq_block = dq.narrow(1, s, n);
            cpu::bmmInto(probs.transpose(1, 2), d_out_block, dv_seen, beta);
            auto d_scores = cpu::bmm(d_out_block, v.narrow(1, 0, visible).transpose(1, 2));
            cpu::causalSoftmaxBackward(probs, d_scores, s);
            cpu::bmmInto(d_scores, k.narrow(1, 0, visible), dq_block);
            cpu::bmmInto(d_scores.transpose(1, 2), q.narrow(1, s, n), dk_seen, beta);
        }
        return {cpu::splitHeadsBackward(d_heads, ctx->saved_data["pos"].toTensor(),
                                        ctx->saved_data["rope"].toTensor(), B),
                torch::Tensor(), torch::Tensor()};
    }
};

struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                                 const torch::Tensor* targets) {
        auto rows = cpu::crossEntropy(logits, *targets);
        ctx->save_for_backward({logits, rows.lse});
        ctx->saved_data["targets"] = *targets;
        return torch::scalar_tensor(rows.loss, logits.options());
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto N = saved[0].size(0);
        const float scale = grads[0].item<float>() / static_cast<float>(N);
        return {cpu::crossEntropyBackward(saved[0], ctx->saved_data["targets"].toTensor(), saved[1], scale),
                torch::Tensor()};
    }
};

}  // namespace

torch::Tensor causalSelfAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                  const torch::Tensor& rope) {
    TORCH_CHECK(cpu::appliesTo(qkv) && qkv.dim() == 5 && qkv.size(2) == 3,
                "causalSelfAttention: float32 CPU qkv [B, S, 3, H, hd] expected");
    return CausalSelfAttentionFunction::apply(qkv, &pos, &rope);
}

torch::Tensor crossEntropyLoss(const torch::Tensor& logits, const torch::Tensor& targets) {
    if (!cpu::appliesTo(logits) || logits.dim() != 2 || logits.size(0) == 0)
        return torch::nn::functional::cross_entropy(logits, targets);
    if (torch::GradMode::is_enabled() && logits.requires_grad())
        return CrossEntropyFunction::apply(logits, &targets);
    return torch::scalar_tensor(cpu::crossEntropy(logits, targets).loss, logits.options());
}

}  // namespace modscope::nn
