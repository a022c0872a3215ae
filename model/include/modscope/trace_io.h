// Routing traces as files: the "modscope.trace/4" JSON document and its long-form CSV (docs/TRACE_FORMAT.md).
//
// Plain C++ only (no LibTorch, no Qt): the app's export, modscope-trace and the tests all build traces with
// the functions below, so the same input gives the same file whoever writes it. A trace file is untrusted
// input: every reader here is bounded in size and counts and names what is wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

// The schema this build writes. It reads that one and the three before it (docs/TRACE_FORMAT.md, "Versions").
inline constexpr const char* kTraceSchema = "modscope.trace/4";
inline constexpr const char* kTraceSchemaV3 = "modscope.trace/3";
inline constexpr const char* kTraceSchemaV2 = "modscope.trace/2";
inline constexpr const char* kTraceSchemaV1 = "modscope.trace/1";

// Bounds on what a reader accepts: anything beyond is refused before it can cost memory or time.
inline constexpr std::uint64_t kMaxTraceFileBytes = 256ull << 20;  // a .json/.jsonl/.csv trace file
inline constexpr int kMaxTraceLayers = 512;
inline constexpr int kMaxTraceTokens = 65536;     // prompt tokens, and generated tokens, per document
inline constexpr int kMaxTraceDocuments = 65536;  // documents in one batch file
inline constexpr int kMaxTraceExperts = 256;      // experts, and no-op choices, of a mixture layer (ModelConfig)

struct TraceModelInfo {
    std::string name;
    ModelConfig config;
    std::string weights_sha256;  // of weights.pt; empty for a model that was never saved or opened
    std::string directory;       // the checkpoint directory; empty for a created model
};

// Tokens generated after the prompt (Model::generate, always causal), with each step's routing.
struct TraceGeneration {
    // The options the tokens were sampled with.
    int max_new_tokens = 0;
    float temperature = 0.0f;
    float top_p = 1.0f;
    std::uint64_t seed = 0;
    int eos_id = -1;
    // result.prompt_ids equals the document's token ids; result.steps[i].token_id == generated_ids[i].
    GenerationResult result;
    std::vector<std::string> pieces;  // one per generated id
    std::string text;                 // the generated ids decoded; invalid UTF-8 replaced by U+FFFD
    double elapsed_ms = 0.0;          // timing
};

struct TraceDocument {
    std::string schema = kTraceSchema;
    TraceModelInfo model;
    // The text that was run and its tokens (byte offsets into this text). A prompt longer than the model's
    // context is cut after its first max_seq_len tokens; the original sizes are kept below.
    std::string prompt;
    std::vector<Token> tokens;
    std::size_t original_tokens = 0;  // tokens of the prompt before truncation (== tokens.size() if none)
    std::size_t original_bytes = 0;   // bytes of the prompt before truncation (== prompt.size() if none)
    // The forward pass (mode, capacity, device, token ids, per-layer routing, FLOPs, elapsed_ms). Its
    // logits are not part of a trace file and are left empty by the readers.
    RunTrace run;
    std::optional<TraceGeneration> generation;
    // Batch runs only: the prompt's 0-based line among the batch's prompts and its "id" from the batch file
    // (the string, or an integer's decimal text with prompt_id_integer set); -1 and empty otherwise.
    int prompt_index = -1;
    std::string prompt_id;
    bool prompt_id_integer = false;  // written back as a JSON number

    bool truncated() const { return original_tokens != tokens.size() || original_bytes != prompt.size(); }
};

// Aggregates of a trace, as written in its "stats" object and printed by modscope-trace.
struct TraceLayerStats {
    int index = 0;
    bool routed = false;
    int k = 0;
    int processed = 0;
    int tokens = 0;
    Agreement predictor;  // zero for full layers
};
struct TraceStats {
    int tokens = 0;
    std::int64_t processed = 0, pairs = 0;                // token-layer pairs processed, of all of them
    std::int64_t routed_processed = 0, routed_pairs = 0;  // the same over routed layers only
    double flops = 0.0, dense_flops = 0.0;
    Agreement predictor;  // summed over routed layers
    std::vector<TraceLayerStats> layers;
    double processedFraction() const { return pairs ? double(processed) / double(pairs) : 0.0; }
    double routedProcessedFraction() const {
        return routed_pairs ? double(routed_processed) / double(routed_pairs) : 0.0;
    }
    double flopsFraction() const { return dense_flops > 0 ? flops / dense_flops : 0.0; }
    TraceStats& operator+=(const TraceStats& o);  // for batches: sums (layers matched by position)
};
TraceStats traceStats(const TraceDocument& doc);

// A prompt tokenized for a run: cut after the model's first max_seq_len tokens, the text cut after the
// last kept token. Throws Error when the model has no tokenizer, the text is not valid UTF-8, or it gives
// no tokens.
struct PromptTokens {
    std::string text;
    std::vector<Token> tokens;
    std::size_t original_tokens = 0;
    std::size_t original_bytes = 0;
    bool truncated() const { return tokens.size() != original_tokens; }
};
PromptTokens tokenizePrompt(const Model& model, const std::string& prompt);

// The document for one run of model over prompt (tokens as the model's tokenizer gave them, trace from
// Model::run on their ids). Throws Error when tokens and trace disagree or the prompt is not UTF-8.
TraceDocument makeTraceDocument(const Model& model, const std::string& prompt,
                                const std::vector<Token>& tokens, const RunTrace& trace);
// The same for a prompt cut by tokenizePrompt (keeps the original sizes).
TraceDocument makeTraceDocument(const Model& model, const PromptTokens& prompt, const RunTrace& trace);
// Adds a generation (Model::generate from the document's token ids with these options).
void addGeneration(TraceDocument& doc, const Model& model, const GenerationOptions& options,
                   const GenerationResult& result, double elapsed_ms);

// What the app and modscope-trace do for one prompt: tokenize (with truncation), run, and with
// generate_tokens > 0 generate (options.max_new_tokens is replaced by generate_tokens).
struct TraceRequest {
    RoutingMode mode = RoutingMode::TopK;
    double capacity = -1.0;  // < 0: the model's
    std::vector<double> layer_capacity;  // RunOptions::layer_capacity: routed layers' own capacities
    int generate_tokens = 0;
    GenerationOptions generation;
    const std::atomic<bool>* cancel = nullptr;  // raises Cancelled out of the run or ends the generation
    // Interventions (RunOptions): forced decisions, per-token loss, decision values and their progress.
    std::vector<RoutingOverride> overrides;
    bool keep_capacity = false;
    bool token_loss = false;
    bool decision_values = false;
    int top_predictions = 0;
    std::function<void(int, int)> progress;
};
TraceDocument traceModel(const Model& model, const std::string& prompt, const TraceRequest& request);

// JSON: one document, pretty-printed, ending in a newline. Throws Error on a value JSON cannot hold
// (a non-finite number where a number is required, a string that is not UTF-8).
std::string traceToJson(const TraceDocument& doc);
// The same on one line (for JSON Lines).
std::string traceToJsonLine(const TraceDocument& doc);
// Reads one document. Throws Error naming the problem: not JSON, an unknown "schema" (naming the one found
// and the one supported), a missing or mistyped field, arrays of the wrong length, out-of-range or
// non-finite numbers, more than the bounds above.
TraceDocument traceFromJson(const std::string& text);
// A .json file holding one document or an array of them, or JSON Lines (one document per line).
std::vector<TraceDocument> tracesFromJson(const std::string& text);
std::vector<TraceDocument> tracesFromJsonLines(const std::string& text);

// CSV (RFC 4180, UTF-8, CRLF line ends), long form: one row per layer and token. With several documents
// (a batch) leading prompt_index and prompt_id columns are added.
inline constexpr const char* kTraceCsvColumns[] = {
    "layer",          "position",           "token_id",      "piece",  "routed",       "router_logit",
    "rank",           "selected",           "predictor_prob", "predictor_selected", "topk_selected", "phase",
    "gate",           "update_ratio",       "expert",        "expert_choice", "expert_prob",
    "token_loss",     "forced",             "decision_value"};
// The columns of earlier versions, which the reader still takes: the first 12 (modscope.trace/1), 14
// (modscope.trace/2) or 17 (modscope.trace/3) of the list above.
inline constexpr int kTraceCsvColumnsV1 = 12;
inline constexpr int kTraceCsvColumnsV2 = 14;
inline constexpr int kTraceCsvColumnsV3 = 17;
std::string traceToCsv(const TraceDocument& doc);
std::string tracesToCsv(const std::vector<TraceDocument>& docs);

// Strict RFC 4180: fields separated by commas, records by CRLF or LF; a field is either bare (no comma,
// quote, CR or LF) or quoted with "" for a quote; every record has as many fields as the first. Throws
// Error naming the line. Bounded by kMaxTraceFileBytes.
std::vector<std::vector<std::string>> parseCsv(const std::string& text);

// One row of a trace CSV, typed. Empty fields (full layers, generated tokens) are nullopt.
struct TraceCsvRow {
    int prompt_index = -1;  // -1 when the file has no prompt_index column
    std::string prompt_id;  // empty when the file has no prompt_id column
    int layer = 0;
    int position = 0;
    int token_id = 0;
    std::string piece;
    bool routed = false;
    std::optional<float> router_logit;
    std::optional<int> rank;
    bool selected = false;
    std::optional<float> predictor_prob;
    std::optional<bool> predictor_selected;
    std::optional<bool> topk_selected;
    std::string phase;  // "prompt" or "generate"
    std::optional<float> gate;          // sigmoid(router_logit); routed layers' prompt rows
    std::optional<float> update_ratio;  // prompt rows (absent from files of the first version)
    // Mixture layers' prompt rows (docs/MODEL.md "Mixture layers"); generate rows have the expert only.
    std::optional<int> expert;          // the expert that ran the token's MLP, -1 none
    std::optional<int> expert_choice;   // the router's top choice (n_experts and above: a no-op), -1 kept out
    std::optional<float> expert_prob;   // its probability
    // Prompt rows of a run with RunOptions::token_loss (the position's, on every layer's row; none at the last
    // position); "process" or "skip" where an override forced the cell (empty elsewhere); routed layers' decision
    // values.
    std::optional<float> token_loss;
    std::string forced;
    std::optional<float> decision_value;
};
// Parses and checks a trace CSV (header, types, ranges); throws Error naming the line and column.
std::vector<TraceCsvRow> traceRowsFromCsv(const std::string& text);

// By the extension of path: .json (one document; several: an array), .jsonl (one per line) or .csv;
// anything else raises Error. Written atomically (writeFileAtomic).
void saveTrace(const std::string& path, const TraceDocument& doc);
void saveTraces(const std::string& path, const std::vector<TraceDocument>& docs);
// Reads a .json trace holding one document (at most kMaxTraceFileBytes).
TraceDocument loadTrace(const std::string& path);
// Reads a .json (one document or an array) or .jsonl trace file.
std::vector<TraceDocument> loadTraces(const std::string& path);

// True when text is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF); on false,
// *bad_offset (when given) is the first offending byte.
bool isValidUtf8(const std::string& text, std::size_t* bad_offset = nullptr);

// The lines of text (split at '\n') holding more than spaces, tabs and '\r', each with its 1-based line number:
// the records of a JSON Lines file.
std::vector<std::pair<std::size_t, std::string>> nonBlankLines(const std::string& text);

// text with each byte that does not begin a well-formed UTF-8 sequence replaced by U+FFFD.
std::string sanitizeUtf8(const std::string& text);

// The part of prompt that kept (a prefix of its tokens, after truncation) covers: cut after the last kept
// token's end and moved forward to a character boundary, since byte-fallback pieces may end inside one.
std::string promptTextCoveredBy(const std::string& prompt, const std::vector<Token>& kept);

}  // namespace modscope
