// RoutingSnapshot: everything the views show about one run, as one immutable value.
//
// The worker thread builds it from the engine's RunTrace and the tokenized prompt; the GUI thread receives
// it as a shared_ptr<const RoutingSnapshot> and hands the same pointer to every view, so a 2,048 x 32 run is
// never copied per panel. Only data members of the engine's structs are used here: the views link no
// engine code (and so no LibTorch).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

// Causal predictor against top-k membership over one layer's tokens (the engine's Agreement, as counts
// with inline ratios so the views need none of the engine's code).
struct AgreementCounts {
    std::int64_t tp = 0, fp = 0, tn = 0, fn = 0;
    std::int64_t total() const { return tp + fp + tn + fn; }
    // An empty set of tokens has no disagreement: 1 rather than 0/0.
    double accuracy() const { return total() ? double(tp + tn) / double(total()) : 1.0; }
    double precision() const { return tp + fp ? double(tp) / double(tp + fp) : 1.0; }
    double recall() const { return tp + fn ? double(tp) / double(tp + fn) : 1.0; }
    AgreementCounts& operator+=(const AgreementCounts& o) {
        tp += o.tp, fp += o.fp, tn += o.tn, fn += o.fn;
        return *this;
    }
};

struct RoutingSnapshot {
    std::uint64_t job = 0;  // the run request this answers

    // The model it ran on.
    std::string model_name;
    int n_layers = 0;
    int d_model = 0;
    int max_seq_len = 0;
    double predictor_threshold = 0.5;
    ModelConfig config;
    std::string weights_sha256;
    std::string model_directory;

    RunTrace trace;  // token_ids, layers, flops; layers is empty for an empty prompt
    std::string prompt;          // the text that ran (cut after its last token when truncated)
    std::vector<Token> prompt_tokens;  // the tokenizer's tokens of prompt, with byte ranges
    std::size_t original_tokens = 0;  // tokens of the whole prompt, before truncation
    // False while a long prompt's tokens beyond the context are still being counted (original_tokens is a
    // lower bound then); a second snapshot of the same run follows with the count.
    bool original_tokens_exact = true;
    // The thread that tokenized the prompt: the engine's worker, so that even a long paste never keeps the
    // GUI thread waiting on the tokenizer. No thread for a snapshot made from a trace file.
    std::thread::id tokenized_on;

    // Per token (same length as trace.token_ids).
    std::vector<std::string> pieces;  // the tokenizer's piece, as the token axis shows it
    std::vector<std::string> texts;   // the prompt text this token covers (valid UTF-8, may be empty)
    std::vector<int> depth;           // how many layers processed the token

    std::vector<AgreementCounts> agreement;  // per layer; all zero for full layers
    AgreementCounts agreement_total;          // over the routed layers

    // KV cache this run's tokens would occupy, against a dense model's (docs/MODEL.md, "Generation").
    std::int64_t kv_cache_bytes = 0;
    std::int64_t dense_kv_cache_bytes = 0;

    // The prompt beyond the model's context is cut: only its first max_seq_len tokens run.
    bool truncated = false;
    std::size_t prompt_bytes = 0;  // the whole prompt
    std::size_t used_bytes = 0;    // the part that ran

    // A trace streamed while generating: tokens from generated_from on were sampled, not typed.
    int generated_from = -1;

    // The losses (docs/MODEL.md "Interventions"), from a second snapshot of the same run: trace.token_loss and
    // trace.top_ids there; with overrides, the same run without them (baseline_*); with a reference model of the
    // same tokenizer, its loss on the same tokens (reference_*). Empty where not computed.
    std::vector<float> baseline_token_loss;
    std::vector<int> baseline_top_ids;
    std::vector<float> baseline_top_probs;
    std::vector<std::string> top_pieces;           // the pieces of trace.top_ids
    std::vector<std::string> baseline_top_pieces;  // of baseline_top_ids
    std::vector<float> reference_token_loss;
    std::string reference_name;
    bool hasLosses() const { return trace.token_loss.size() == trace.token_ids.size() && !trace.token_ids.empty(); }

    int tokens() const { return static_cast<int>(trace.token_ids.size()); }
    int layers() const { return static_cast<int>(trace.layers.size()); }
    bool empty() const { return trace.token_ids.empty() || trace.layers.empty(); }
    bool isGenerated(int token) const { return generated_from >= 0 && token >= generated_from; }
    int routedLayerCount() const {
        int n = 0;
        for (const auto& l : trace.layers) n += l.routed ? 1 : 0;
        return n;
    }
};

using SnapshotPtr = std::shared_ptr<const RoutingSnapshot>;

// How much the layer changed the token, |Δx| / |x|; NaN where the run has no such measure (older traces).
inline double updateRatio(const LayerTrace& layer, int token) {
    return token >= 0 && token < static_cast<int>(layer.update_ratio.size()) ? layer.update_ratio[token]
                                                                              : std::nan("");
}

// One generated token as the generation panels show it (a plain copy of the engine's GenerationStep plus
// the predictor's running agreement with top-k over the generated tokens so far).
struct GenerationPoint {
    int index = 0;
    int position = 0;
    int token_id = 0;
    std::string text;                         // the decoded text this token added
    std::vector<std::uint8_t> processed;      // [n_layers]
    std::int64_t kv_cache_bytes = 0;
    std::int64_t dense_kv_cache_bytes = 0;
    double step_ms = 0.0;
    // Per routed layer (in layer order) and over all of them: accuracy of the predictor's decisions on the
    // generated tokens so far against top-k membership at the chosen capacity.
    std::vector<int> routed_layers;
    std::vector<double> layer_accuracy;
    double accuracy = 1.0;
};

}  // namespace modscope
