// The operator backend (backend.h): every operation as plain LibTorch operators, on any device and dtype.
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>

#include "backend/backend.h"
#include "nn/attention_blocks.h"
#include "nn/modules.h"
#include "nn/prefix_topk.h"

namespace modscope::backend {

namespace F = torch::nn::functional;

bool needsGrad(const torch::Tensor& a, const torch::Tensor& b) {
    return torch::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
}

torch::Tensor flatRows(const torch::Tensor& idx, std::int64_t T) {
    if (idx.size(0) == 1) return idx.reshape(-1);
    return (idx + torch::arange(idx.size(0), idx.options()).unsqueeze(1) * T).reshape(-1);
}

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

torch::Tensor OpsBackend::rmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                  const torch::Tensor& plus) const {
    const auto y = plus.defined() ? x + plus : x;
    return y * torch::rsqrt(y.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight;
}

torch::Tensor OpsBackend::linear(const torch::Tensor& x, const torch::Tensor& weight,
                                 const torch::Tensor& bias, TransposedWeight&) const {
    return F::linear(x, weight, bias);
}

torch::Tensor OpsBackend::bmm(const torch::Tensor& a, const torch::Tensor& b,
                              const torch::Tensor& add) const {
    return add.defined() ? torch::baddbmm(add, a, b) : torch::bmm(a, b);
}

void OpsBackend::headInto(const torch::Tensor& hidden, const torch::Tensor& weight, TransposedWeight& cache,
                          torch::Tensor& out) const {
    out.copy_(linear(hidden, weight, {}, cache));
}

torch::Tensor OpsBackend::rotateQK(const torch::Tensor& qk, const torch::Tensor& pos,
                                   const torch::Tensor& rope) const {
    const auto B = qk.size(0), S = qk.size(1), hd = qk.size(-1), half = hd / 2;
    const auto f = rope.index_select(0, pos.reshape(-1)).view({B, S, 2, 2, 1, hd});
    // Rotating (x1, x2) by the angle is x * (c, c) + (x2, x1) * (-s, s): two products over both halves.
    const auto swapped = torch::cat({qk.narrow(-1, half, half), qk.narrow(-1, 0, half)}, -1);
    return torch::addcmul(qk * f.select(2, 0), swapped, f.select(2, 1));
}

torch::Tensor OpsBackend::causalAttention(const torch::Tensor& q, const torch::Tensor& k,
                                          const torch::Tensor& v, std::int64_t prior,
                                          const nn::PositionTables& positions) const {
    // Query block [s, e) needs keys [0, prior + e) only: the keys after it would be masked anyway, so the
    // upper triangle of the score matrix is never computed, and each block's scores stay cache-sized. The
    // mask is an additive bias, 0 or -inf, that the score product starts from.
    const auto S = q.size(1);
    constexpr std::int64_t kBlock = kAttentionQueryBlock;
    std::vector<torch::Tensor> blocks;
    for (std::int64_t s = 0; s < S; s += kBlock) {
        const auto n = std::min(kBlock, S - s), visible = prior + s + n;
        const auto kt = k.narrow(1, 0, visible).transpose(1, 2);
        const auto vs = v.narrow(1, 0, visible);
        // One query (S = 1) sees every key: no mask.
        const auto scores =
            S == 1 ? bmm(q, kt) : bmm(q.narrow(1, s, n), kt, positions.causalBias(prior, s, n));
        blocks.push_back(bmm(torch::softmax(scores, -1), vs));  // [N, n, hd]
    }
    return blocks.size() == 1 ? blocks[0] : torch::cat(blocks, 1);
}

AttentionHeads OpsBackend::heads(const torch::Tensor& qk, const torch::Tensor& qkv, nn::LayerKV* kv) {
    const auto B = qk.size(0), S = qk.size(1), H = qk.size(3), hd = qk.size(4);
    // Head-major views [B, H, S, hd]; with B = 1 the reshapes below stay views (bmm takes row strides).
    const auto q = qk.select(2, 0).transpose(1, 2);
    auto k = qk.select(2, 1).transpose(1, 2);
    auto v = qkv.select(2, 2).transpose(1, 2);
    AttentionHeads h;
    if (kv != nullptr) {
        h.prior = kv->length();
        kv->append(k, v);
        k = kv->k;
        v = kv->v;
    }
    h.q = q.reshape({B * H, S, hd});
    h.k = k.reshape({B * H, h.prior + S, hd});
    h.v = v.reshape({B * H, h.prior + S, hd});
    return h;
}

torch::Tensor OpsBackend::selfAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                        const nn::PositionTables& positions, nn::LayerKV* kv) const {
    const auto B = qkv.size(0), S = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
    const auto h = heads(rotateQK(qkv.narrow(2, 0, 2), pos, positions.rope), qkv, kv);
    const auto out = causalAttention(h.q, h.k, h.v, h.prior, positions).view({B, H, S, hd});
    return out.transpose(1, 2).reshape({B, S, H * hd});
}

torch::Tensor OpsBackend::swiGlu(const torch::Tensor& gate_up) const {
    const auto gu = gate_up.chunk(2, -1);
    return F::silu(gu[0]) * gu[1];
}

torch::Tensor OpsBackend::embed(const torch::Tensor& table, const torch::Tensor& ids) const {
    return F::embedding(ids, table);
}

torch::Tensor OpsBackend::gatherRows(const torch::Tensor& x, const torch::Tensor& idx) const {
    // Whole rows copied as rows: a gather with the index expanded over d looks up every element.
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    const auto flat = flatRows(idx, T);
    return x.reshape({B * T, d}).index_select(0, flat).view({B, idx.size(1), d});
}

void OpsBackend::addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                              const torch::Tensor& delta) const {
    TORCH_CHECK(x.is_contiguous() && !torch::GradMode::is_enabled(),
                "addGatedRows: in place, inference only");
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    const auto flat = flatRows(idx, T);
    auto flat_x = x.view({B * T, d});
    const auto gate = torch::sigmoid(router_logits.reshape(-1).index_select(0, flat)).unsqueeze(-1);
    flat_x.index_add_(0, flat, gate * delta.reshape({-1, d}));
}

torch::Tensor OpsBackend::routerLogits(const torch::Tensor& x, const torch::Tensor& weight) const {
    return torch::matmul(x,
                         weight.view(-1));  // a matrix-vector product, where linear would be a [d, 1] product
}

torch::Tensor OpsBackend::predictorLogits(const PredictorWeights& p, const torch::Tensor& x,
                                          const torch::Tensor& rows) const {
    const auto in = rows.defined() ? x.index_select(0, rows.to(x.device())) : x;
    // One output: a matrix-vector product, where fc2 as a linear layer would be a product with one column.
    return torch::matmul(F::silu(linear(in, p.fc1_weight, p.fc1_bias, p.fc1_t)), p.fc2_weight.view(-1)) +
           p.fc2_bias;
}

torch::Tensor OpsBackend::topkIndices(const torch::Tensor& router_logits, std::int64_t k) const {
    const auto idx = std::get<1>(router_logits.topk(k, /*dim=*/1, /*largest=*/true, /*sorted=*/false));
    return std::get<0>(idx.sort(1));
}

void OpsBackend::prefixCandidateLogits(const PredictorWeights& p, const torch::Tensor& x, std::int64_t b,
                                       const float* router_row, double capacity,
                                       std::vector<std::int64_t>& positions,
                                       std::vector<float>& logits) const {
    // Every row's logit, the candidates' kept: a product's rounding may depend on its row count (cuBLAS picks its
    // algorithm by shape), and a traced run computes every row, so this way both decide alike on any device.
    const auto T = x.size(1);
    positions = nn::prefixTopkCandidates(router_row, T, capacity);
    logits.clear();
    if (positions.empty()) return;
    const auto all = predictorLogits(p, x.select(0, b).detach()).to(torch::kCPU, torch::kFloat32).contiguous();
    const float* l = all.data_ptr<float>();
    for (const auto t : positions) logits.push_back(l[t]);
}

torch::Tensor OpsBackend::crossEntropy(const torch::Tensor& logits, const torch::Tensor& targets) const {
    return F::cross_entropy(logits, targets);
}

}  // namespace modscope::backend
