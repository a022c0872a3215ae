// From engine results to RoutingSnapshot: prompt preparation (truncation to the model's context) and the
// per-token and per-layer numbers the views show. Runs on the worker thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "modscope/engine.h"
#include "routing_snapshot.h"

namespace modscope {

struct TraceDocument;

// The prompt as it runs: its first max_tokens tokens and the text up to the last of them.
struct PreparedPrompt {
    std::string text;
    std::vector<Token> tokens;
    std::size_t original_tokens = 0;  // before truncation (a lower bound while !counted)
    std::size_t original_bytes = 0;
    // A long prompt is tokenized only as far as the run needs; the rest is counted afterwards
    // (countRemainingTokens) so the run is not kept waiting.
    bool counted = true;
    std::string source;            // the whole (sanitized) prompt while !counted
    std::size_t scanned_bytes = 0;  // how far source was tokenized
    std::thread::id tokenized_on;   // the thread that last ran the tokenizer on it
    bool truncated() const { return !counted || tokens.size() != original_tokens; }
    std::vector<int> ids() const;
};

// Invalid UTF-8 is replaced (U+FFFD) before tokenizing, so any bytes are a defined prompt. An empty or
// whitespace-only prompt that gives no tokens yields no tokens (the views then show what to do).
// stop_early: stop tokenizing a long prompt once it certainly exceeds max_tokens (then !counted).
// Raises Cancelled when cancel is raised between chunks.
PreparedPrompt preparePrompt(const Tokenizer& tokenizer, const std::string& prompt, int max_tokens,
                             bool stop_early = false, const std::atomic<bool>* cancel = nullptr);

// Finishes what preparePrompt(stop_early) left: counts the rest of the prompt's tokens into
// original_tokens. Raises Cancelled when cancel is raised between chunks.
void countRemainingTokens(const Tokenizer& tokenizer, PreparedPrompt& prompt, const std::atomic<bool>* cancel);

// Tokenizes text[from, end) in chunks that each end before a space (SentencePiece splits on spaces, so
// no token spans two chunks and the tokens equal one encode of the whole), with byte ranges into text.
// take sees each chunk's tokens and returns false to stop; returns the byte where tokenizing stopped.
std::size_t encodeInChunks(const Tokenizer& tokenizer, const std::string& text, std::size_t from,
                           const std::atomic<bool>* cancel, const std::function<bool(std::vector<Token>&&)>& take,
                           std::size_t chunk_bytes = 64 * 1024);

// Appends generated token ids to a prepared prompt: text and byte ranges as the tokenizer decodes them.
void appendGenerated(const Tokenizer& tokenizer, PreparedPrompt& prompt, const std::vector<int>& ids);

// Everything the views need from one run. generated_from: the first generated token (-1: none).
std::shared_ptr<RoutingSnapshot> buildSnapshot(const Model& model, const PreparedPrompt& prompt, RunTrace trace,
                                               std::uint64_t job, int generated_from = -1);

// The snapshot of a prompt that gave no tokens.
std::shared_ptr<RoutingSnapshot> emptySnapshot(const Model& model, const PreparedPrompt& prompt, std::uint64_t job);

// The snapshot of a saved trace (trace_io.h), shown without its model: the reader has already checked
// that the token, layer and per-layer array lengths agree.
std::shared_ptr<RoutingSnapshot> snapshotFromTrace(const TraceDocument& doc);

// Replaces ill-formed UTF-8 sequences with U+FFFD.
std::string sanitizeText(const std::string& text);

}  // namespace modscope
