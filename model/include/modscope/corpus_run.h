// A corpus run for routing statistics (modscope-stats, modscope-bench, the app's Corpus window): the corpus's
// files and documents, their windows, and one window counted into a CorpusStats (docs/STATS_FORMAT.md).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "modscope/corpus_stats.h"
#include "modscope/engine.h"

namespace modscope {

// The files of a corpus given as files and folders: a folder gives its .txt, .text, .md and .jsonl files,
// recursively, in sorted order; a file is taken whatever its name. Error naming a missing input, a folder
// without such files, or something that is neither.
std::vector<std::string> corpusFiles(const std::vector<std::string>& inputs);

// The documents of one corpus file: a .jsonl file gives one per record ({"text": "..."}, blank lines skipped),
// any other file is one document of UTF-8 text. Error naming the file (and line) that is not UTF-8 or not such
// JSON Lines.
std::vector<std::string> corpusDocuments(const std::string& file);

// One window of a document: its number over the whole corpus, its token ids and each token's text.
struct TokenWindow {
    std::int64_t index = 0;
    std::vector<int> ids;
    std::vector<std::string> texts;  // valid UTF-8 (a byte piece inside a character: U+FFFD)
};

// A document's tokens cut into consecutive windows of at most `window` tokens, numbered from next_index on
// (which ends past the last).
std::vector<TokenWindow> documentWindows(const Tokenizer& tokenizer, const std::string& document, int window,
                                          std::int64_t& next_index);

// Every piece of a tokenizer, by id.
std::vector<std::string> tokenizerPieces(const Tokenizer& tokenizer);

// Empty counts for model (its config, pieces, directory and weights) at mode, capacity and window.
CorpusStats statsForModel(const Model& model, RoutingMode mode, double capacity, int window);

// Runs a window through model (options: mode and capacity; the per-token routing is asked for here) and counts
// it into stats. With checkpoints (stats.checkpoints names them, in order), each runs the window too and each
// routed layer's decisions are compared with the last checkpoint's.
void countWindow(const Model& model, const TokenWindow& window, RunOptions options, CorpusStats& stats,
                 const std::vector<const Model*>& checkpoints = {});

// Counts the windows of files (corpusFiles) that fall in stats' shard (windows shard_index - 1, + shard_count,
// ...), in order, with countWindow. stop (may be null) ends it before the next window and marks stats partial.
// progress (may be null) sees (bytes of the files done, bytes of all) after each window counted and each file.
// Error for a corpus that gives no tokens.
void countCorpus(const Model& model, const std::vector<std::string>& files, const RunOptions& options,
                 CorpusStats& stats, const std::vector<const Model*>& checkpoints = {},
                 const std::atomic<bool>* stop = nullptr,
                 const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

}  // namespace modscope
