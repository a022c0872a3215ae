// Fused CPU loops for forwards without autograd (internal to model/).
//
// At T = 128 a layer's elementwise work is a few dozen microseconds, but as LibTorch operators it is a dozen
// dispatches and temporaries per layer: RMSNorm alone was six operators (pow, mean, add, rsqrt, mul, mul).
// These loops do the same arithmetic in one pass (docs/PERFORMANCE.md). Callers use them only where
// appliesTo() holds and no gradient is needed; otherwise they take the operator path, which autograd follows.
#pragma once

#include <torch/types.h>

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace modscope::cpu {

// A float32 CPU tensor whose last dimension is contiguous.
bool appliesTo(const torch::Tensor& t);

// The instruction-set levels the kernels are compiled for, each a superset of the one before: Baseline
// (x86-64), Avx2 (x86-64-v3: AVX2, FMA, BMI2, ...) and Avx512 (x86-64-v4: x86-64-v3 and AVX-512 F, VL, BW, DQ,
// CD). Every loop has a Baseline and an Avx2 build; the predictor's first layer and the small attention also an
// Avx512 one. Each call takes the build of isaLevel(), so that one host can run, and the tests compare, every
// build its CPU has (docs/CPU_BACKEND.md, "Builds per CPU").
enum class Isa { Baseline, Avx2, Avx512 };

const char* isaName(Isa isa);  // "baseline", "avx2", "avx512"
// isaName's inverse, in any letter case; nothing for another word.
std::optional<Isa> isaFromName(const std::string& name);

// The highest level this CPU runs.
Isa cpuIsa();
// The cap MODSCOPE_CPU_ISA (baseline, avx2 or avx512) puts on the whole process, read once: Avx512 where it is
// unset, empty or not a level's name. For the last, environmentIsaError() is the message (empty otherwise):
// the first read writes it to stderr, and backend::resolve refuses the kernel backend with it.
Isa environmentIsaCap();
std::string environmentIsaError();

// The level the kernels run at: the lowest of cpuIsa(), environmentIsaCap() and the cap setIsaCap last set
// (Avx512 until then). One relaxed load.
Isa isaLevel();
// Caps isaLevel() at `cap` (never above the CPU's or the environment's; Avx512 lifts this cap) and returns the
// cap set before. For tests and benchmarks, between kernel calls: a call running meanwhile may take some of its
// loops' builds at either level.
Isa setIsaCap(Isa cap);

// setIsaCap for the lifetime of this object, then the cap before.
class ScopedIsaCap {
public:
    explicit ScopedIsaCap(Isa cap) : previous_(setIsaCap(cap)) {}
    ~ScopedIsaCap() { setIsaCap(previous_); }
    ScopedIsaCap(const ScopedIsaCap&) = delete;
    ScopedIsaCap& operator=(const ScopedIsaCap&) = delete;

private:
    Isa previous_;
};

// x [..., d] -> x * rsqrt(mean(x^2 over d) + eps) * weight [d]; a new contiguous tensor. With `plus` (shaped
// as x), the norm of x + plus, a sum that is never stored.
torch::Tensor rmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                      const torch::Tensor& plus = {});
// Its gradient for training, without `plus`: {dx shaped as x, dw [d]} from x, the weight and the output's
// gradient, one pass over each row where autograd runs the norm's pow, mean, rsqrt and products backwards.
std::pair<torch::Tensor, torch::Tensor> rmsNormBackward(const torch::Tensor& x, const torch::Tensor& weight,
                                                        double eps, const torch::Tensor& grad);

// qk [B, S, 2, H, hd] (q then k; strides free but the last) rotated by positions pos [B, S] (int64) with the
// factors rope [L, 2 (cos, sin), 2 (q, k), 1, hd] (PositionTables::rope): out = qk * cos + swap_halves(qk) * sin.
// Returns a new contiguous [B, S, 2, H, hd].
torch::Tensor rotateQK(const torch::Tensor& qk, const torch::Tensor& pos, const torch::Tensor& rope);

// Rows of x [N, d] at rows [k] (int64, each in [0, N)) -> a new contiguous [k, d]; or, batched, rows [B, k] of
// x [B, T, d] (each in [0, T)) -> [B, k, d]. Rows may lie any distance apart.
torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& rows);

// x [..., d] . w -> [...]: one dot product per row (a router's logits), w any contiguous shape of d floats
// (the router's [1, d] weight as it is). At 512 x 192, timed alone, LibTorch's matrix-vector product took
// 7.1 us, this loop 5.6 on one thread and 4.3 on two.
torch::Tensor rowDot(const torch::Tensor& x, const torch::Tensor& w);

// x[rows[i]] += sigmoid(logits[rows[i]]) * delta[i] for x [N, d], rows [k], logits [N] and delta [k, d], or
// batched (x [B, T, d], rows [B, k], logits [B, T], delta [B, k, d]) for each batch row: a routed block's
// gated update written straight into the residual stream, where the operators gathered x's rows, updated the
// copy and copied it back. x, logits and delta must be contiguous; rows must not repeat within a batch row.
void addGatedRows(torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& logits,
                  const torch::Tensor& delta);

// Causal attention's probabilities from scores [P, n, keys] (rows contiguous, any row and batch strides) in
// place: query row i, whose own key is first + i, sees keys 0 .. first + i; their scores become their softmax
// and every later key's a 0. One pass per row: in one process on Zen 5, 10.7-11.6 us at 3 x 64 x 64 and
// 29.7-31.1 at 3 x 128 x 128, where masking the later keys with -inf then LibTorch's softmax took 18.7-19.3
// and 65.2-67.5.
void causalSoftmax(torch::Tensor& scores, std::int64_t first);

// The causal predictor's logits for rows x [N, d] (rows any distance apart), or for the rows `rows` of x
// (int64 [n], each in [0, N)) when given: silu(x fc1_t + b1) . w2 + b2 with fc1_t [d, h] (the transposed
// weight), b1 [h], w2 [h], b2 [1] -> [n]. One pass per row, which reads its row of x where it lies (no
// gathered copy), and a row's logit does not depend on which other rows are computed with it.
torch::Tensor predictorLogits(const torch::Tensor& x, const torch::Tensor& fc1_t, const torch::Tensor& b1,
                              const torch::Tensor& w2, const torch::Tensor& b2,
                              const torch::Tensor& rows = {});

// The causal predictor's parameters read in place: fc1_t [d, h] (fc1's weight transposed, contiguous),
// b1 [h], w2 [h] and b2.
struct PredictorParams {
    const float* fc1_t = nullptr;
    const float* b1 = nullptr;
    const float* w2 = nullptr;
    float b2 = 0.0f;
    std::int64_t d = 0, h = 0;
};

// Rows handed over by one producing thread while others take them: the producer pushes rows, then closes the
// feed; takers claim the rows pushed so far a few at a time. The room for every row is made up front, so
// takers read rows the producer will not move.
class RowFeed {
public:
    explicit RowFeed(std::int64_t capacity);
    void push(std::int64_t row);  // the producer's, at most `capacity` rows in all
    void close();                 // the producer's: no more rows
    std::int64_t capacity() const { return static_cast<std::int64_t>(rows_.size()); }
    const std::int64_t* rows() const { return rows_.data(); }
    std::int64_t size() const { return published_.load(std::memory_order_acquire); }
    // The next up to `most` rows not yet claimed, as indices [i0, i1) into rows(): waits while the feed is
    // open and fewer than `most` are waiting; false once it is closed and every row is claimed.
    bool claim(std::int64_t most, std::int64_t& i0, std::int64_t& i1);

private:
    std::vector<std::int64_t> rows_;
    std::int64_t pushed_ = 0;  // the producer's own count
    alignas(64) std::atomic<std::int64_t> published_{0};
    std::atomic<bool> closed_{false};
    alignas(64) std::atomic<std::int64_t> claimed_{0};
};

// The predictor's logits (predictorLogits' arithmetic and bits) of the rows of x (row i at x + i * ld) that
// produce() pushes into feed, while produce runs on the calling thread: from 64 rows of room in the feed
// (kParallelFedRows), the team's other threads take the rows as they come, one pass of rows at a time, and
// the calling thread joins them once produce returns; below, it runs produce and then every row itself. The feed is
// closed here; logits[i] is the logit of feed.rows()[i]. If produce throws, its exception is rethrown here
// after the rows it pushed are done.
void predictorLogitsFed(const PredictorParams& params, const float* x, std::int64_t ld, RowFeed& feed,
                        const std::function<void()>& produce, float* logits);

// SwiGLU's activation for gate_up [..., 2 f] (gate, then up): silu(gate) * up -> a new contiguous [..., f],
// in one pass where the operators made three (silu, a strided multiply and their temporaries).
torch::Tensor swiGlu(const torch::Tensor& gate_up);
// Its gradient: d gate_up [..., 2 f] (a new contiguous tensor) from gate_up and the gradient of the output
// [..., f], one pass over each row where autograd runs silu's and the product's backward operators.
torch::Tensor swiGluBackward(const torch::Tensor& gate_up, const torch::Tensor& grad);

// Whether smallCausalAttention takes S queries after `prior` keys at head size hd in AVX-512, four query
// rows at a time (two beyond 64 keys) with their scores in registers (kWideAttentionKeys, attention_blocks.h):
// at isaLevel() Avx512, for 2 to 128 keys in all and hd a multiple of 16 up to 128.
bool wideAttentionFits(std::int64_t S, std::int64_t prior, std::int64_t hd);

// Causal attention for a few queries, written into out: q [N, S, hd] (scaled), k and v [N, prior + S, hd],
// out [N, S, hd]; query i sees keys 0 .. prior + i. Any row and batch strides, the last dimension
// contiguous. A row of scores at a time on one thread, or (wideAttentionFits) a few rows at a time on the team:
// for the few rows a routed layer or a generation step attends with, the batched path's two sgemm calls per
// head and its softmax pass cost more than the arithmetic.
void smallCausalAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          std::int64_t prior, torch::Tensor& out);

// One transformer block's weights as smallBlockDelta reads them: the norms' [d] and the projections'
// transposed copies, row-major [in, out] (TransposedWeight).
struct BlockWeights {
    const float *attn_norm, *qkv_t, *proj_t, *mlp_norm, *gate_up_t, *down_t;
    float attn_eps, mlp_eps;
    std::int64_t d, heads, head_dim, ff;
};

// Whether smallBlockDelta takes S tokens with heads of hd: up to 32 tokens, or up to 64 where the wide attention
// takes them (a routed layer's few tokens; beyond, the operator-level block is faster).
bool smallBlockFits(std::int64_t S, std::int64_t hd);

// A block's update f(x) = a + m, a = attn(norm(x)), m = mlp(norm(x + a)) (BlockImpl::delta) for the S rows x
// [S, d] (contiguous) at positions pos [S] (int64, each in rope's range; rope: PositionTables::rope), without
// autograd: the operator-level path's kernels and products in its order, so the same bits, with its
// intermediate rows in one buffer per thread that every call reuses instead of a dozen tensors. Returns a new
// [S, d].
torch::Tensor smallBlockDelta(const torch::Tensor& x, const torch::Tensor& pos, const torch::Tensor& rope,
                              const BlockWeights& w);

// Rows from which addBlockInPlace takes a layer: on fewer, a thread would have no rows of its own, and one
// thread doing a block alone reads all of its weights, where the operator path's products split them (4
// tokens took the reference forward from 0.27 to 0.32 ms; 8 from 0.38 to 0.33).
constexpr std::int64_t kTeamBlockRows = 8;

// Whether addBlockInPlace takes S tokens with heads of hd: from kTeamBlockRows, where the wide attention
// takes them (wideAttentionFits, no cached keys).
bool teamBlockFits(std::int64_t S, std::int64_t hd);

// x [S, d] += f(x), a full layer's update in an inference forward (x contiguous; pos and rope as for
// smallBlockDelta), with the operator path's kernels and products in its order, so its bits, in one parallel
// region: each thread keeps its own rows from the first norm to the update, and the team meets twice, once
// every row's keys and values are in and once every row is attended. The operator path hands rows between
// threads at every stage (a product's rows come back to a single-threaded add, say): when a VM's two vCPUs
// sit on different core complexes, each hand-over crosses the package (docs/PERFORMANCE.md, the cores probe).
// Not for a routed layer's few rows: there each thread would read all of the layer's weights, cold from L3,
// and the reference forward at T = 128 took 3.12 ms against 2.99 with smallBlockDelta (modscope-bench's
// reference section).
void addBlockInPlace(torch::Tensor& x, const torch::Tensor& pos, const torch::Tensor& rope,
                     const BlockWeights& w);

}  // namespace modscope::cpu
