// The training step's fused operations on the CPU, with their gradients (internal to model/).
//
// With autograd, a layer's attention was a dozen operators each way: rotary positions as index_select, cat,
// mul and addcmul; q, k and v as narrowed and selected views, whose gradients autograd builds as zero-filled
// tensors of the whole qkv output, copied into and summed; head-major copies for the products; the causal
// mask added to every score. The loss was log_softmax and nll_loss, with a zero-filled [N, V] gradient. Here
// each is one autograd function whose forward and backward are a kernel or two around the same sgemm
// products (docs/PERFORMANCE.md).
#pragma once

#include <torch/types.h>

namespace modscope::cpu {

// qkv [B, S, 3, H, hd] (q, k, v; the last dimension contiguous, any other strides) -> heads [3, B * H, S,
// hd], contiguous: q and k rotated by positions pos (B * S int64, each in rope's range) with the factors rope
// [L, 2, 2, 1, hd] as rotateQK does (q's carry the attention scale), v as it is.
torch::Tensor splitHeads(const torch::Tensor& qkv, const torch::Tensor& pos, const torch::Tensor& rope);
// Its gradient: d qkv [B, S, 3, H, hd] (a new contiguous tensor) from d heads [3, B * H, S, hd]: q's and k's
// through the rotation's transpose, v's moved back.
torch::Tensor splitHeadsBackward(const torch::Tensor& grad_heads, const torch::Tensor& pos,
                                 const torch::Tensor& rope, std::int64_t batch);

// The gradient of causal attention's scores from probs [P, n, keys] (causalSoftmax's rows: query row i sees
// keys 0 .. first + i) and grad, the gradient of those probabilities, shaped and strided alike, in place:
// grad = probs * (grad - sum(probs * grad)) over each row's visible keys, 0 after them.
void causalSoftmaxBackward(const torch::Tensor& probs, torch::Tensor& grad, std::int64_t first);

// Cross-entropy of logits [N, V] (rows contiguous) against targets [N] (int64, each in [0, V)): the mean of
// log-sum-exp(row) - row[target] over the rows, and each row's log-sum-exp [N] for the backward.
struct CrossEntropyRows {
    double loss = 0.0;
    torch::Tensor lse;  // [N] float32
};
CrossEntropyRows crossEntropy(const torch::Tensor& logits, const torch::Tensor& targets);
// d logits [N, V] = scale * (softmax(row) - one_hot(target)): the mean loss's gradient for scale = g / N.
torch::Tensor crossEntropyBackward(const torch::Tensor& logits, const torch::Tensor& targets,
                                   const torch::Tensor& lse, float scale);

}  // namespace modscope::cpu

namespace modscope::nn {

// Causal self-attention from the qkv projection's output qkv [B, S, 3, H, hd] (float32 CPU, the last
// dimension contiguous) at positions pos (B * S int64) with rotary factors rope (PositionTables::rope): the
// heads' outputs side by side, [B, S, H * hd], for the output projection. Differentiable in qkv (splitHeads,
// the score and value products on query blocks of kAttentionQueryBlock that never score the keys after their
// block, causalSoftmax), with a backward of the same products and causalSoftmaxBackward. Not twice
// differentiable.
torch::Tensor causalSelfAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                  const torch::Tensor& rope);

// F::cross_entropy(logits [N, V], targets [N]) with the mean over rows, on the CPU: crossEntropy forward,
// crossEntropyBackward back, where autograd ran log_softmax and nll_loss with their zero-filled gradients.
torch::Tensor crossEntropyLoss(const torch::Tensor& logits, const torch::Tensor& targets);

}  // namespace modscope::nn
