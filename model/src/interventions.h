// Interventions (docs/MODEL.md "Interventions"): per-token loss, the most probable next tokens, and the value
// of each routing decision, for Model::run (internal to model/).
#pragma once

#include <functional>
#include <vector>

#include "model_impl.h"

namespace modscope {

// -log p(ids[first + i + 1] | ...) for each row i of logits [n, V] (the positions first .. first + n - 1, none
// of them the last of ids).
std::vector<float> tokenLosses(const torch::Tensor& logits, const std::vector<int>& ids, int first);

// Each row of logits [T, V]: its n most probable tokens, best first, and their probabilities, into trace.
void topPredictions(const torch::Tensor& logits, int n, RunTrace& trace);

// What a run's forward left for the decision values: per layer its routing, its K/V and its input.
struct CapturedRun {
    std::vector<nn::LayerRouting> routing;
    std::vector<nn::LayerKV> kv;
    std::vector<torch::Tensor> residuals;  // [i]: layer i's input [1, T, d]; [n_layers]: after the last layer
    std::vector<float> token_loss;         // [T], NaN at the last position
};

// Every routed layer's decision_value in trace (whose layers hold the run's per-token routing): each cell's
// decision flipped on top of the run's own forced decisions, in the run's mode. A flip at (l, t) starts from the
// captured input of layer l and, at each layer, from the first position whose input or decision can differ
// from the run's (t, or earlier where a later top-k layer's selection changes before it), reading the run's keys
// and values for the positions before it. progress sees (cells done, cells); cancel raises Cancelled.
void computeDecisionValues(Model::Impl& impl, const std::vector<int>& ids, const nn::ForwardOptions& run_options,
                           const std::vector<nn::ForcedDecisions>& forced, const CapturedRun& run, RunTrace& trace,
                           const std::function<void(int, int)>& progress, const std::atomic<bool>* cancel);

}  // namespace modscope
