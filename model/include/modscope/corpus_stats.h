// Routing statistics over a corpus (docs/STATS_FORMAT.md): what each routed layer takes and skips, by token,
// token class and position, how the layers overlap, the predictor's agreement, the experts' vocabularies, and
// how routing settles across checkpoints.
//
// Plain C++ (no LibTorch, no Qt), like trace_io.h: modscope-stats fills a CorpusStats from Model::run traces,
// the app reads the file, and shards merge. Every stored figure is a count, so merging shards gives exactly
// (bit for bit) what one run over the whole corpus gives; rates, intervals and rankings are derived on
// writing.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

inline constexpr const char* kStatsSchema = "modscope.stats/1";
inline constexpr int kStatsExamplesPerPiece = 3;  // contexts kept per token id: the corpus's first ones
inline constexpr int kStatsMaxRoutedLayers = 16;  // depth paths are counted per subset of the routed layers

// What a tokenizer piece is, from its text alone (docs/STATS_FORMAT.md "Token classes").
enum class TokenClass { WordStart, Capitalised, WordContinuation, Digits, Punctuation, Whitespace, Other };
inline constexpr int kTokenClasses = 7;
const char* toString(TokenClass c);
TokenClass classifyPiece(const std::string& piece);

// Counts in bins of equal width over [lo, hi), with what fell below and above (NaN counts as below).
struct StatsHistogram {
    double lo = 0.0, hi = 1.0;
    std::vector<std::int64_t> counts;
    std::int64_t below = 0, above = 0;
    void add(double v);
    std::int64_t total() const;
};

// The counts of one routed layer.
struct LayerStats {
    int index = 0;
    std::int64_t tokens = 0, processed = 0;
    std::vector<std::int64_t> id_tokens, id_processed;  // [vocab]: per token id
    std::array<std::int64_t, kTokenClasses> class_tokens{}, class_processed{};
    std::vector<std::int64_t> position_tokens, position_processed;  // [window]: per position in the window
    Agreement predictor;                                 // causal predictor against top-k, every token
    std::array<Agreement, kTokenClasses> class_predictor{};
    std::vector<Agreement> position_predictor;           // [window]
    StatsHistogram router_logits;                        // every token's
    StatsHistogram threshold;                            // each window's k-th largest logit
};

// The counts of one mixture layer (docs/MODEL.md "Mixture layers"), routed or not.
struct MixtureStats {
    int index = 0;
    int n_experts = 0;
    std::int64_t reached = 0, noop = 0, overflow = 0;  // tokens that reached the mixture; no-op; expert full
    std::vector<std::int64_t> load;                    // [n_experts] tokens each expert ran
    std::vector<std::int64_t> id_expert;               // [vocab * n_experts] tokens of each id each expert ran
};

// A token in its context: window (0-based over the whole corpus), position in it, and the text around it with
// the token between ⟦ and ⟧.
struct StatsExample {
    std::int64_t window = 0;
    int position = 0;
    std::string context;
};

// For --checkpoints: how many of each routed layer's decisions match the last checkpoint's on the same windows.
struct CheckpointMatch {
    std::string name, directory;
    std::vector<std::int64_t> matching, decisions;  // per routed layer
};

struct CorpusStats {
    std::string schema = kStatsSchema;
    // The model and the run.
    std::string model_name, model_directory, weights_sha256;
    ModelConfig config;
    RoutingMode mode = RoutingMode::TopK;
    double capacity = 0.125;
    int window = 256;
    // The corpus: its inputs as given, and the part of it counted here.
    std::vector<std::string> sources;
    int shard_index = 1, shard_count = 1;  // 1-based index; 1 of 1: the whole corpus
    bool partial = false;                  // stopped (Ctrl-C) before the end of its part
    std::int64_t windows = 0, tokens = 0;

    std::vector<int> routed_layers;  // as config.routed_layers
    std::vector<LayerStats> layers;  // one per routed layer, in that order
    std::vector<MixtureStats> mixtures;  // one per mixture layer (config.moe_layers), in that order
    // co_selected[i][j]: tokens both routed layers i and j processed (i == j: layer i's processed).
    std::vector<std::vector<std::int64_t>> co_selected;
    // depth_paths[mask]: tokens processed by exactly the routed layers in mask (bit i: routed layer i).
    std::vector<std::int64_t> depth_paths;
    std::vector<std::vector<StatsExample>> examples;  // [vocab]: the corpus's first contexts of each id
    std::vector<std::string> pieces;                  // [vocab]: the tokenizer's pieces
    std::vector<CheckpointMatch> checkpoints;

    // Empty counts for a model (its config, tokenizer pieces) and a run's settings.
    static CorpusStats forModel(const ModelConfig& config, const std::vector<std::string>& pieces, RoutingMode mode,
                                double capacity, int window);
    // Counts one window: a traced run (per-token routing) of window number `window_index` over the whole corpus,
    // with each token's text (for the contexts).
    void addWindow(const RunTrace& run, std::int64_t window_index, const std::vector<std::string>& token_texts);
    // Adds another part's counts (same schema, model, mode, capacity, window and sources); throws Error naming
    // the first difference.
    void merge(const CorpusStats& other);
};

// A rate with its 95% Wilson interval.
struct RateInterval {
    double rate = 0.0, low = 0.0, high = 0.0;
};
RateInterval wilsonInterval(std::int64_t hits, std::int64_t total);

// The token ids of a layer with at least min_count occurrences, the most often processed first (or, with
// processed_first false, the most often skipped first), ties by count then id; at most limit of them.
std::vector<int> rankedPieces(const LayerStats& layer, int min_count, bool processed_first, std::size_t limit);

// JSON as docs/STATS_FORMAT.md gives it: the counts, then the derived tables (rates, intervals, the pieces most
// often processed and skipped with at least min_count occurrences). statsFromJson reads the counts back and
// checks them (every table sums to the tokens it claims), naming what is wrong.
std::string statsToJson(const CorpusStats& stats, int min_count = 20);
CorpusStats statsFromJson(const std::string& text);
CorpusStats loadStats(const std::string& path);

// The derived tables as CSV files in dir (created if needed), one per table, each with a header row; returns the
// file names written.
std::vector<std::string> writeStatsCsv(const CorpusStats& stats, const std::string& dir, int min_count = 20);

}  // namespace modscope
