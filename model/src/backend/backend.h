// The engine's backend seam: every operation the model's forward, routing, generation step and training step
// run, and where each backend's version lives (internal to model/).
//
//   backend    class               file                            what it runs
//   ops        OpsBackend          backend/ops_backend.cpp         plain LibTorch operators: any device
//   (CUDA),
//                                                                  any dtype (float64); what a GPU runs
//   cpu-kernels CpuKernelsBackend  cpu/cpu_kernels_backend.cpp     fused x86-64 float32 loops
//   (cpu/cpu_kernels.h,
//                                                                  cpu/cpu_training.h) and oneDNN's sgemm
//                                                                  (cpu/cpu_matmul.h); built only with the
//                                                                  CMake option MODSCOPE_CPU_KERNELS
//
// CpuKernelsBackend derives from OpsBackend and overrides the operations it has kernels for. Wherever a
// kernel does not take its arguments (a CUDA or float64 tensor, a shape it was not written for, autograd
// where it has no gradient) it calls the OpsBackend version, so an operation added here with an operator
// version works on every backend the day it is written. The fused operations at the end are optional:
// OpsBackend has none, and the modules then compose the operations above them.
//
// Modules (nn/) ask for backend::current(), the backend of the calling thread. Model installs its own
// (backend::Use) around each run, generation and training step, so two models on two backends can share a
// process, and a test can run one model on both.
#pragma once

#include <torch/types.h>

#include <mutex>
#include <string>
#include <vector>

namespace modscope::nn {
struct BlockImpl;
struct LayerKV;
struct PositionTables;
}  // namespace modscope::nn

namespace modscope::backend {

// A weight [out, in] kept as a contiguous [in, out] copy, for a backend whose products read that layout (the
// kernel backend's sgemm runs 1.2-6x faster on it for the few rows a routed block or a generation step sees:
// modscope-bench's matmul section). Rebuilt when the weight's storage or version changes: an optimizer step
// or a checkpoint load writes the weight in place, which bumps its version. The operator backend never makes
// one.
class TransposedWeight {
public:
    torch::Tensor of(const torch::Tensor& weight);

private:
    std::mutex mutex_;
    torch::Tensor transposed_;  // [in, out]
    const void* data_ = nullptr;
    std::int64_t version_ = -1;
};

// The causal predictor's parameters: logit = silu(x W1^T + b1) . w2 + b2.
struct PredictorWeights {
    const torch::Tensor& fc1_weight;  // [h, d]
    const torch::Tensor& fc1_bias;    // [h]
    const torch::Tensor& fc2_weight;  // [1, h]
    const torch::Tensor& fc2_bias;    // [1]
    TransposedWeight& fc1_t;
};

// Causal attention's query heads, and its keys and values after any cached ones, as [N = B * H, *, hd] views.
struct AttentionHeads {
    torch::Tensor q;  // [N, S, hd], rotated, scaled by 1/sqrt(hd)
    torch::Tensor k;  // [N, prior + S, hd], rotated
    torch::Tensor v;  // [N, prior + S, hd]
    std::int64_t prior = 0;
};

class OpsBackend {
public:
    virtual ~OpsBackend() = default;
    virtual const char* name() const { return "ops"; }

    // ------------------------------------------------------------------------------------------------ norm
    // RMSNorm of x [..., d], or of x + plus (shaped as x) when plus is given: y * rsqrt(mean(y^2) + eps) *
    // weight.
    virtual torch::Tensor rmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                  const torch::Tensor& plus = {}) const;

    // ------------------------------------------------------------------------------------------------
    // products x [..., in] W^T (+ bias) for W [out, in].
    virtual torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                                 const torch::Tensor& bias, TransposedWeight& cache) const;
    // a [P, M, K] @ b [P, K, N] (+ add, [M, N] broadcast over P, a constant).
    virtual torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b,
                              const torch::Tensor& add = {}) const;
    // The tied output head: logits [N, V] of hidden [N, d] and the embedding W [V, d], written into out (an
    // [N, V] tensor of the caller's, such as a view of a trace's vector). Without autograd.
    virtual void headInto(const torch::Tensor& hidden, const torch::Tensor& weight, TransposedWeight& cache,
                          torch::Tensor& out) const;

    // ------------------------------------------------------------------------------------------------
    // attention qk [B, S, 2, H, hd] (q then k) rotated by each token's position pos [B, S] with the factors
    // rope (PositionTables::rope); q comes out scaled by 1/sqrt(hd). A new [B, S, 2, H, hd].
    virtual torch::Tensor rotateQK(const torch::Tensor& qk, const torch::Tensor& pos,
                                   const torch::Tensor& rope) const;
    // Causal attention of S queries over `prior` earlier keys and their own: q [N, S, hd] (scaled), k and v
    // [N, prior + S, hd] -> [N, S, hd]. Query blocks of kAttentionQueryBlock (nn/attention_blocks.h) that
    // never score the keys after their block; every query sees its own key, so no row of scores is all
    // masked.
    virtual torch::Tensor causalAttention(const torch::Tensor& q, const torch::Tensor& k,
                                          const torch::Tensor& v, std::int64_t prior,
                                          const nn::PositionTables& positions) const;
    // A block's self-attention from its qkv projection [B, S, 3, H, hd] at positions pos [B, S]: the heads'
    // outputs side by side, [B, S, H * hd], ready for the output projection. With kv, the cached keys come
    // first and this call's keys and values are appended to the cache. Composed of rotateQK and
    // causalAttention.
    virtual torch::Tensor selfAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                        const nn::PositionTables& positions, nn::LayerKV* kv) const;

    // ------------------------------------------------------------------------------------------------ MLP
    // SwiGLU's activation: gate_up [..., 2 f] (gate, then up) -> silu(gate) * up [..., f].
    virtual torch::Tensor swiGlu(const torch::Tensor& gate_up) const;

    // ------------------------------------------------------------------------------------------------ rows
    // Token embeddings: rows ids [B, T] (int64) of table [V, d] -> [B, T, d].
    virtual torch::Tensor embed(const torch::Tensor& table, const torch::Tensor& ids) const;
    // Rows idx [B, k] (int64, ascending, each in [0, T)) of x [B, T, d] -> a new [B, k, d].
    virtual torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& idx) const;
    // The routed block's gated update added into x [B, T, d] itself (contiguous, inference only):
    // x[b, idx[b, i]] += sigmoid(router_logits[b, idx[b, i]]) * delta[b, i]; the other rows are not touched.
    virtual void addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                              const torch::Tensor& delta) const;

    // ------------------------------------------------------------------------------------------------
    // routing The router: r = x . w for x [B, S, d] and w [1, d] -> [B, S].
    virtual torch::Tensor routerLogits(const torch::Tensor& x, const torch::Tensor& weight) const;
    // The causal predictor's logits of x [..., d] -> [...]; with rows (int64 [n]), of those rows of x [N, d]
    // -> [n]. A row's logit does not depend on which other rows are computed with it.
    virtual torch::Tensor predictorLogits(const PredictorWeights& p, const torch::Tensor& x,
                                          const torch::Tensor& rows = {}) const;
    // Top-k: the k largest of each row of router_logits [B, T] -> their positions [B, k] (int64, ascending).
    // NaN ranks above everything; of equal logits the earlier position goes first on the CPU (LibTorch's topk
    // there, and the kernel backend's selection); CUDA's topk may take another of equal logits.
    virtual torch::Tensor topkIndices(const torch::Tensor& router_logits, std::int64_t k) const;
    // Causal mode's prefix top-k on row b of x [B, T, d]: the positions t whose router logit (router_row, T
    // floats on the host) has fewer than capacityToK(capacity, t + 1) larger ones before it, ascending, into
    // positions; the predictor's logit of each into logits, with the bits predictorLogits gives that row among
    // all T (the ops backend computes every row and keeps the candidates'; the kernel backend's rows are
    // independent of each other, so it reads the candidates only).
    virtual void prefixCandidateLogits(const PredictorWeights& p, const torch::Tensor& x, std::int64_t b,
                                       const float* router_row, double capacity,
                                       std::vector<std::int64_t>& positions,
                                       std::vector<float>& logits) const;

    // ------------------------------------------------------------------------------------------------ loss
    // Mean cross-entropy of logits [N, V] against targets [N] (int64).
    virtual torch::Tensor crossEntropy(const torch::Tensor& logits, const torch::Tensor& targets) const;

    // ------------------------------------------------------------------------------------------------ fused
    // Optional fusions of the operations above, each computing the same values: an undefined tensor or false
    // where this backend has none, and the module then composes the operations.
    //
    // A whole block's update f(x) (nn::BlockImpl::delta) for x [B, S, d] at positions pos, without a cache.
    virtual torch::Tensor fusedBlockDelta(nn::BlockImpl& block, const torch::Tensor& x,
                                          const torch::Tensor& pos,
                                          const nn::PositionTables& positions) const {
        return {};
    }
    // x += f(x) in place for a full layer of an inference forward (x [1, S, d], contiguous).
    virtual bool fusedAddBlock(nn::BlockImpl& block, torch::Tensor& x, const torch::Tensor& pos,
                               const nn::PositionTables& positions) const {
        return false;
    }

protected:
    // q, k and v of a qkv projection's rotated q and k (qk [B, S, 2, H, hd]) and its v, appended to kv when
    // given, as head-major views.
    static AttentionHeads heads(const torch::Tensor& qk, const torch::Tensor& qkv, nn::LayerKV* kv);
};

// ---------------------------------------------------------------------------------------------------- choice
// The operator backend, always there.
const OpsBackend& ops();
// The kernel backend, or nullptr in a build without MODSCOPE_CPU_KERNELS.
const OpsBackend* cpuKernels();
// Whether this build has the kernel backend.
bool cpuKernelsBuilt();
// Whether MODSCOPE_CPU_KERNELS=0 (or off, no, false) in the environment turns it off.
bool cpuKernelsTurnedOff();
// The kernel backend when it is built, enabled (configureRuntime's RuntimeOptions::cpu_kernels) and not
// turned off by the environment (MODSCOPE_CPU_KERNELS=0); else nullptr.
const OpsBackend* cpuKernelsUsable();

// "auto", "ops" or "cpu-kernels" for a model on device with parameters of dtype: auto takes the kernel
// backend where it is usable and the model is float32 on the CPU, ops otherwise. Throws modscope::Error where
// the requested backend cannot run there, with the reason, and where the kernel backend would run while
// MODSCOPE_CPU_ISA names no instruction-set level (cpu::environmentIsaError).
const OpsBackend& resolve(const std::string& requested, const torch::Device& device, torch::ScalarType dtype);

// Every backend a test can run on this build and process: ops, and cpu-kernels where usable.
std::vector<const OpsBackend*> usable();

// The calling thread's backend: the one a Use on this thread installed, else the process's default (what
// resolve("auto") gives a float32 CPU model: the kernel backend where it is usable, else ops).
const OpsBackend& current();

// Installs a backend on the calling thread for its lifetime; nests.
class Use {
public:
    explicit Use(const OpsBackend& backend);
    ~Use();
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;

private:
    const OpsBackend* previous_;
};

// Positions idx [B, k] into rows of T -> row numbers [B * k] into [B * T, d]: the operator versions of the row
// gather, the gated scatter and nn::scatterRows index x viewed that way.
torch::Tensor flatRows(const torch::Tensor& idx, std::int64_t T);

// Whether autograd must see an operation on a and b: grad mode is on and either requires grad.
bool needsGrad(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace modscope::backend
