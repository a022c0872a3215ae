// The Mixture-of-Depths transformer as LibTorch modules (internal to model/; docs/MODEL.md is the spec).
//
// Registered module and parameter names are the checkpoint keys: never rename one without a migration.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "modscope/engine.h"

namespace modscope::cpu {
struct PredictorParams;  // cpu_kernels.h
}

namespace modscope::nn {

struct RmsNormImpl : torch::nn::Module {
    RmsNormImpl(std::int64_t dim, double eps);
    torch::Tensor forward(const torch::Tensor& x);

    torch::Tensor weight;  // [d]
    double eps;
};
TORCH_MODULE(RmsNorm);

// Keys and values a layer keeps for generation: only the tokens it processed.
struct LayerKV {
    torch::Tensor k;  // [B, H, n, hd], rotary already applied: a view of k_store's first n tokens
    torch::Tensor v;  // [B, H, n, hd], of v_store
    // Room for more tokens than n, grown by doubling: a step appends its token's keys and values in place,
    // where concatenating copied the whole cache at every step (quadratic in the generated length).
    torch::Tensor k_store, v_store;  // [B, H, capacity, hd]
    // Routed layers, B = 1, only when the causal rule uses the prefix top-k: every token's router logit so far,
    // processed or not.
    std::vector<float> router_logits;
    std::int64_t length() const { return k.defined() ? k.size(2) : 0; }
    // Appends k_new and v_new [B, H, S, hd] after the n cached tokens; k and v then view all n + S.
    void append(const torch::Tensor& k_new, const torch::Tensor& v_new);
    // The keys and values of the n cached tokens (the room behind them may hold up to twice as many).
    std::int64_t bytes() const { return k.defined() ? 2 * k.numel() * k.element_size() : 0; }
};

// A weight [out, in] kept as a contiguous [in, out] copy for forwards without autograd on the CPU (see
// linear()). Rebuilt when the weight's storage or version changes: an optimizer step or a checkpoint load
// writes the weight in place, which bumps its version.
class TransposedWeight {
public:
    torch::Tensor of(const torch::Tensor& weight);

private:
    std::mutex mutex_;
    torch::Tensor transposed_;  // [in, out]
    const void* data_ = nullptr;
    std::int64_t version_ = -1;
};

// y = x W^T + b for x [..., in]. On the CPU the product is oneDNN's sgemm (cpu_matmul.h): without autograd
// it reads cache's [in, out] copy of W, which sgemm runs 1.2-6x faster than W transposed on the fly at the
// few rows a routed block, the predictor or a generation step sees (docs/PERFORMANCE.md); with autograd it
// reads W through a transposed view, so the gradient reaches the parameter. Elsewhere F::linear.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                     TransposedWeight& cache);

// Tables that depend on positions only, shared by every layer and built once from the config.
struct PositionTables {
    PositionTables() = default;
    PositionTables(std::int64_t max_seq_len, std::int64_t head_dim, double rope_theta);

    // Rotary factors of each position for q and k at once: [max_seq_len, 2 (cos, sin), 2 (q, k), 1, hd],
    // holding (c, c) and (-s, s) over the two halves of a head, q's multiplied by 1/sqrt(hd).
    torch::Tensor rope;
    // Additive causal mask for a query block: [kAttentionQueryBlock, max_seq_len + kAttentionQueryBlock] of 0
    // and -inf (see causalBias). The operator path adds it; CPU inference masks its scores in place instead.
    torch::Tensor causal_bias;

    // qk [B, S, 2, H, hd] (q then k, any strides) rotated by each token's own position pos [B, S] int64;
    // q comes out scaled by 1/sqrt(hd). Returns a new contiguous [B, S, 2, H, hd].
    torch::Tensor rotateQK(const torch::Tensor& qk, const torch::Tensor& pos) const;
    // The mask of query rows [start, start + n) (n <= kAttentionQueryBlock) after `prior` cached keys over the
    // keys [0, prior + start + n): [n, prior + start + n], -inf where the key comes after the query.
    torch::Tensor causalBias(std::int64_t prior, std::int64_t start, std::int64_t n) const;
};

// Causal attention of S new queries over prior cached keys and the S new ones, in query blocks.
// q [N, S, hd] (already scaled by 1/sqrt(hd)), k and v [N, prior + S, hd] -> [N, S, hd].
// With `into` (a float32 CPU [N, S, hd] view with contiguous rows, no autograd), the result is written there
// and `into` returned: attention can then write straight into the layout the output projection reads.
torch::Tensor causalAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              std::int64_t prior, const PositionTables& positions, const torch::Tensor& into = {});

struct AttentionImpl : torch::nn::Module {
    explicit AttentionImpl(const ModelConfig& config);
    // x [B, S, d], pos [B, S]; causal over the S tokens in their given (original) order.
    // With kv, the cached keys come first and the new ones are appended to it.
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                          LayerKV* kv = nullptr);

    torch::nn::Linear qkv{nullptr};   // weight [3d, d]: rows q, then k, then v
    torch::nn::Linear proj{nullptr};  // weight [d, d]
    std::int64_t n_heads, head_dim;
    TransposedWeight qkv_t, proj_t;
};
TORCH_MODULE(Attention);

struct SwiGluImpl : torch::nn::Module {
    SwiGluImpl(std::int64_t d_model, std::int64_t d_ff);
    torch::Tensor forward(const torch::Tensor& x);

    torch::nn::Linear gate_up{nullptr};  // weight [2 d_ff, d]: rows gate, then up
    torch::nn::Linear down{nullptr};     // weight [d, d_ff]
    TransposedWeight gate_up_t, down_t;
};
TORCH_MODULE(SwiGlu);

// Causal routing predictor: reads the (stop-gradient) block input, one logit per token.
struct PredictorImpl : torch::nn::Module {
    PredictorImpl(std::int64_t d_model, std::int64_t hidden);
    torch::Tensor forward(const torch::Tensor& x);  // [B, S, d] -> [B, S] logits
    // The logits of rows `rows` (int64 [n]) of x2d [N, d] -> [n]: forward on those rows, without copying
    // them out on the CPU when autograd need not see it.
    torch::Tensor atRows(const torch::Tensor& x2d, const torch::Tensor& rows);
    // Whether the predictor can read x's rows in place on the CPU, as atRows does without autograd; if so,
    // params is set to its parameters (the transposed fc1 is the cache's, valid until the weight changes).
    bool readsInPlace(const torch::Tensor& x, cpu::PredictorParams& params);

    torch::nn::Linear fc1{nullptr};  // weight [h, d], bias [h]
    torch::nn::Linear fc2{nullptr};  // weight [1, h], bias [1]
    TransposedWeight fc1_t;
};
TORCH_MODULE(Predictor);

struct BlockImpl : torch::nn::Module {
    BlockImpl(const ModelConfig& config, int index);
    // f(x) = a + m with a = attn(attn_norm(x)), m = mlp(mlp_norm(x + a)): the block's residual update.
    torch::Tensor delta(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                        LayerKV* kv = nullptr);
    // x += delta(x) for an inference forward's x [1, S, d] (contiguous), the same bits; in one parallel
    // region (cpu::addBlockInPlace) where it applies, through delta() otherwise.
    void addDeltaInPlace(torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                         LayerKV* kv = nullptr);

    // Routed only: r = w.x for x [B, S, d] -> [B, S].
    torch::Tensor routerLogits(const torch::Tensor& x);

    int index;
    bool routed;
    RmsNorm attn_norm{nullptr};
    Attention attn{nullptr};
    RmsNorm mlp_norm{nullptr};
    SwiGlu mlp{nullptr};
    torch::nn::Linear router{nullptr};  // routed only: weight [1, d], no bias
    Predictor predictor{nullptr};       // routed only
};
TORCH_MODULE(Block);

// What one layer decided in a forward; tensors are empty for full layers unless noted. Without
// ForwardOptions::collect, only k, router_logits and (causal mode) selected_mask are filled.
struct LayerRouting {
    std::int64_t k = 0;              // top-k size (routed) or T
    torch::Tensor router_logits;     // [B, T]
    torch::Tensor topk_mask;         // [B, T] bool
    torch::Tensor selected_mask;     // [B, T] bool, what was processed (all true for full layers)
    torch::Tensor predictor_logits;  // [B, T]
    std::int64_t predictor_rows = 0; // tokens whose predictor logit was computed (B * T with collect)
};

// Causal mode's decision (docs/MODEL.md "Causal mode"): token t is processed when
//   sigmoid(predictor_logit_t + budget_gain * (capacity * (t + 1) - n_t)) > threshold,
// n_t being the tokens before t that this layer processed, and, with prefix_topk, when also fewer than
// k(t + 1) = capacityToK(capacity, t + 1) earlier tokens have a higher router logit (top-k over the tokens so
// far). Only what is known at t enters it, so it stays causal; with budget_gain 0 and no prefix_topk each
// token decides alone (the paper's predictor).
struct CausalRule {
    double threshold = 0.5;
    double capacity = 0.125;
    double budget_gain = 0.0;
    bool prefix_topk = false;

    // position: t, counted from the start of the sequence; processed_before: n_t; higher_before: earlier
    // tokens whose router logit is above t's.
    bool decide(double predictor_logit, std::int64_t position, std::int64_t processed_before,
                std::int64_t higher_before) const;
    // The predictor's test alone, for a token the prefix top-k lets through (or any token without it).
    bool passes(double predictor_logit, std::int64_t position, std::int64_t processed_before) const;
    // The prefix top-k's test alone (whatever prefix_topk says): fewer than k(t + 1) higher before t.
    static bool inPrefixTopk(double capacity, std::int64_t position, std::int64_t higher_before) {
        return higher_before < capacityToK(capacity, static_cast<int>(position + 1));
    }
};

// The rule applied along each row: predictor_logits and router_logits [B, T] -> processed [B, T] bool. With
// selected, also each row's processed positions as [1, n_b] int64, ascending.
torch::Tensor causalSelection(const torch::Tensor& predictor_logits, const torch::Tensor& router_logits,
                              const CausalRule& rule, std::vector<torch::Tensor>* selected = nullptr);

// How many of history are above value (the prefix-top-k rule's count; NaN counts as -inf).
std::int64_t countAbove(const std::vector<float>& history, float value);

// The positions t of a row of T router logits that pass the prefix top-k at this capacity, ascending: those
// with fewer than k(t + 1) earlier logits strictly above their own (NaN counts as -inf).
std::vector<std::int64_t> prefixTopkCandidates(const float* logits, std::int64_t T, double capacity);

// Causal mode's selection for a routed block with input x [B, T, d] -> [B, T] bool, as causalSelection
// decides it; with the prefix top-k, the predictor runs only on its candidates (the tokens with fewer than
// k(t + 1) higher router logits before them). predictor_rows: how many rows the predictor read.
torch::Tensor causalRouting(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                            const CausalRule& rule, std::int64_t* predictor_rows = nullptr,
                            std::vector<torch::Tensor>* selected = nullptr);

struct ForwardOptions {
    RoutingMode mode = RoutingMode::TopK;
    double capacity = 0.125;
    double predictor_threshold = 0.5;
    double predictor_budget_gain = 0.0;
    bool predictor_prefix_topk = false;
    bool collect = false;                       // fill LayerRouting for every layer
    std::vector<LayerKV>* kv = nullptr;         // when set: filled with each layer's K/V (B must be 1)
    std::vector<torch::Tensor>* residuals = nullptr;  // when set: [0] embeddings, [i+1] after layer i
    // When set: each layer's wall-clock ms, in order, a clock read between layers (profiling.h); the
    // embedding and the final norm are not in them. On the CPU only: a device's work is asynchronous.
    std::vector<double>* layer_ms = nullptr;
    const std::atomic<bool>* cancel = nullptr;

    CausalRule causalRule() const {
        return {predictor_threshold, capacity, predictor_budget_gain, predictor_prefix_topk};
    }
    // The config's causal rule (threshold, budget gain, prefix top-k); the capacity stays the run's own.
    void setCausalRule(const ModelConfig& config) {
        predictor_threshold = config.predictor_threshold;
        predictor_budget_gain = config.predictor_budget_gain;
        predictor_prefix_topk = config.predictor_prefix_topk;
    }
};

struct ModTransformerImpl : torch::nn::Module {
    explicit ModTransformerImpl(const ModelConfig& config);

    // ids [B, T] int64 -> final hidden states [B, T, d] after norm_f
    torch::Tensor hidden(const torch::Tensor& ids, const ForwardOptions& options,
                         std::vector<LayerRouting>* routing = nullptr);
    // ids [B, T] int64 -> token embeddings [B, T, d]
    torch::Tensor embed(const torch::Tensor& ids);
    // hidden [.., d] -> logits [.., V] through the tied embedding
    torch::Tensor logits(const torch::Tensor& hidden);
    // The same for hidden [N, d] on the CPU without autograd, written into out, a row-major float32 [N, V]
    // (the caller's memory: a trace's vector, so the logits are not copied again).
    void logitsInto(const torch::Tensor& hidden, torch::Tensor& out);

    // One generation step in causal mode: token id at position pos, kv holds every layer's cache (a routed
    // layer's cache holds the tokens it processed, which is the rule's n_t). Returns logits [V];
    // processed/prob (size n_layers) report each layer's decision and predictor probability.
    torch::Tensor step(std::int64_t token, std::int64_t pos, std::vector<LayerKV>& kv, const CausalRule& rule,
                       std::vector<std::uint8_t>* processed, std::vector<float>* prob);

    void initWeights(std::uint64_t seed);

    ModelConfig config;
    torch::nn::Embedding tok_emb{nullptr};  // weight [V, d], tied with the output head
    torch::nn::ModuleList layers{nullptr};
    RmsNorm norm_f{nullptr};
    std::vector<Block> blocks;  // typed handles into layers
    PositionTables positions;   // buffers, not parameters: rebuilt from the config
    TransposedWeight head_t;    // the tied output head, tok_emb's weight as [d, V]
};
TORCH_MODULE(ModTransformer);

// The routed layer's selection for a run: indices into T, ascending (original order), per batch row.
torch::Tensor topkIndices(const torch::Tensor& router_logits, std::int64_t k);  // [B, T] -> [B, k]

// Gathers rows idx [B, k] of x [B, T, d] into a contiguous [B, k, d] (whole rows: index_select on [B*T, d]).
torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& idx);

// x [B, T, d] with rows [B, k, d] written at idx [B, k]: a copy.
torch::Tensor scatterRows(const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& rows);

// The gated update of a routed block added into x itself, for router_logits r [B, T] and delta [B, k, d]:
//   x[b, idx[b, i]] += sigmoid(r[b, idx[b, i]]) * delta[b, i].
// Inference only, x contiguous and held by nothing else: the T - k rows that skip are never touched, and the
// selected ones are not copied out and back.
void addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                  const torch::Tensor& delta);

// Runs the routed block on the tokens idx [B, k] of x (gated by sigmoid of their router logits; each token at
// its own position) and writes their updates back; every other row of x is untouched, so skipped tokens stay
// bit-for-bit the same. With in_place the updates go into x itself (addGatedRows), otherwise into a copy.
// With kv, the block's cache holds the processed tokens only.
torch::Tensor processSelected(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                              const torch::Tensor& idx, const PositionTables& positions,
                              LayerKV* kv = nullptr, bool in_place = false);

}  // namespace modscope::nn
