// Routing: top-k and causal selection, and running a routed block on its selected tokens (internal to model/;
// docs/MODEL.md "Routing" and "Causal mode").
#pragma once

#include <vector>

#include "nn/modules.h"
#include "nn/prefix_topk.h"

namespace modscope::nn {

// What one layer decided in a forward; tensors are empty for full layers unless noted. Without
// ForwardOptions::collect, only k, router_logits and (causal mode) selected_mask are filled.
struct LayerRouting {
    std::int64_t k = 0;               // top-k size (routed) or T
    torch::Tensor router_logits;      // [B, T]
    torch::Tensor topk_mask;          // [B, T] bool
    torch::Tensor selected_mask;      // [B, T] bool, what was processed (all true for full layers)
    torch::Tensor predictor_logits;   // [B, T]
    std::int64_t predictor_rows = 0;  // tokens whose predictor logit was computed (B * T with collect)
    torch::Tensor update_ratio;       // [B, T] |x_out - x_in| / |x_in| (routed layers, with measure_update)
    MixtureRouting mixture;           // mixture layers, with collect: per token [B, T]
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

// A routed layer's forced decisions in a run (RunOptions::overrides), per token: kFree where the layer decides,
// else kSkip or kProcess.
using ForcedDecisions = std::vector<std::int8_t>;
constexpr std::int8_t kFree = -1, kSkip = 0, kProcess = 1;

// Per layer, the forced decisions of overrides in a run of T tokens: empty where a layer has none. Throws Error
// for a layer that does not exist or is not routed, and for a position outside [0, T).
std::vector<ForcedDecisions> resolveOverrides(const ModelConfig& config, const std::vector<RoutingOverride>& overrides,
                                              std::int64_t T);

// Top-k mode's selection under forced decisions, as ascending positions: with keep_capacity the forced-in tokens
// and the highest-ranked free ones up to k in all (topkIndices' order: NaN first, then the larger logit, then
// the earlier position), else topk (the layer's top k, a mask [T]) plus the forced-in minus the forced-out.
std::vector<std::int64_t> forcedTopk(const float* router_logits, const bool* topk, std::int64_t T, std::int64_t k,
                                     const std::int8_t* forced, bool keep_capacity);
// The same from a row's tensors: router logits [1, T] and the layer's top k, topk_idx [1, k].
std::vector<std::int64_t> forcedTopk(const torch::Tensor& router_logits, const torch::Tensor& topk_idx, std::int64_t k,
                                     const std::int8_t* forced, bool keep_capacity);

// The rule applied along each row: predictor_logits and router_logits [B, T] -> processed [B, T] bool. With
// selected, also each row's processed positions as [1, n_b] int64, ascending. With forced (B = 1, [T]), a forced
// token takes its forced decision and counts among the decisions before the tokens after it.
torch::Tensor causalSelection(const torch::Tensor& predictor_logits, const torch::Tensor& router_logits,
                              const CausalRule& rule, std::vector<torch::Tensor>* selected = nullptr,
                              const std::int8_t* forced = nullptr);

// How many of history are above value (the prefix-top-k rule's count; NaN counts as -inf).
std::int64_t countAbove(const std::vector<float>& history, float value);

// Causal mode's selection for a routed block with input x [B, T, d] -> [B, T] bool, as causalSelection
// decides it; with the prefix top-k, the predictor runs only on its candidates (the tokens with fewer than
// k(t + 1) higher router logits before them). predictor_rows: how many rows the predictor read.
torch::Tensor causalRouting(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                            const CausalRule& rule, std::int64_t* predictor_rows = nullptr,
                            std::vector<torch::Tensor>* selected = nullptr);

// The routed layer's selection for a run: indices into T, ascending (original order), per batch row; the
// backend's topkIndices, which these three wrappers call as the current backend has them.
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
// With kv, the block's cache holds the processed tokens only. With update_ratio: [B, T] how much the block
// changed each token, |sigmoid(r) f(x)| / |x| (0 for the rows it skipped), from the k rows it ran on.
// With mixture (a mixture layer): what its MLP did with each of the T tokens, -1 and NaN for those it skipped.
torch::Tensor processSelected(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                              const torch::Tensor& idx, const PositionTables& positions,
                              LayerKV* kv = nullptr, bool in_place = false, torch::Tensor* update_ratio = nullptr,
                              MixtureRouting* mixture = nullptr);

// A mixture's report on the k tokens idx [B, k] of T spread over all T ([B, T]): -1 (NaN for probabilities)
// at the tokens that did not reach it.
MixtureRouting spreadMixture(const MixtureRouting& selected, const torch::Tensor& idx, std::int64_t T);

// Mixture reports of batch rows, concatenated along the batch.
MixtureRouting catMixture(const std::vector<MixtureRouting>& rows);

}  // namespace modscope::nn
