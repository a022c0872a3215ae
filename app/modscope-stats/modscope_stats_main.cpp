// modscope-stats: routing statistics over a corpus (docs/STATS_FORMAT.md). Runs a model over text files, JSON
// Lines or folders of them in windows of N tokens and counts, per routed layer, what it processes and skips by
// token, class and position, how the layers overlap, the predictor's agreement and the experts' vocabularies;
// shards merge into exactly what one run over the whole corpus gives.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "modscope/corpus_run.h"
#include "modscope/corpus_stats.h"
#include "modscope/engine.h"
#include "modscope/paths.h"
#include "modscope/trace_io.h"
#include "tool_command_line.h"

namespace {

using modscope::Error;
using modscope::cli::UsageError;

const char* kAbout = R"(Routing statistics of a Mixture-of-Depths model over a corpus.

usage:
  modscope-stats [--model DIR] [--capacity F] [--mode topk|causal] [--window N] [--shard I/N]
                 --out STATS.json [--csv DIR] CORPUS... [--checkpoints DIR...]
  modscope-stats --merge A.json B.json ... --out ALL.json [--csv DIR]

CORPUS: text files, JSON Lines files ({"text": ...} per line) or folders of them (their .txt, .text, .md and
.jsonl files, recursively). docs/STATS_FORMAT.md describes the file and its tables.
)";

const char* kNotes = R"(
Ctrl-C stops after the current window and writes the statistics so far, marked partial. Exit status: 0 done
(also when stopped), 1 failed, 2 bad arguments.
)";

std::atomic<bool> g_stop{false};
extern "C" void onInterrupt(int) { g_stop.store(true); }

struct Options {
    std::string model, out, csv, mode = "topk", device = "cpu", shard;
    double capacity = -1.0;
    int window = 0, min_count = 20;  // window 0: 256, or the model's context where shorter
    bool quiet = false;
    std::vector<std::string> corpus, merge, checkpoints;
};

// "I/N" with 1 <= I <= N.
std::pair<int, int> parseShard(const std::string& text) {
    const auto slash = text.find('/');
    if (slash == std::string::npos) throw UsageError("--shard " + text + ": expected I/N, as 2/8");
    const int n = static_cast<int>(modscope::cli::parseInteger("--shard", text.substr(slash + 1), 1, 1 << 20));
    const int i = static_cast<int>(modscope::cli::parseInteger("--shard", text.substr(0, slash), 1, n));
    return {i, n};
}

// Progress on stderr: a bar redrawn in place on a terminal, else a line at every tenth of the corpus.
class Progress {
public:
    explicit Progress(bool quiet)
        : tty_(isatty(STDERR_FILENO) != 0), quiet_(quiet), start_(std::chrono::steady_clock::now()) {}
    // bytes of the corpus done, of total_bytes; tokens counted.
    void update(std::uint64_t bytes, std::uint64_t total_bytes, std::int64_t tokens, bool done = false) {
        total_ = std::max<std::uint64_t>(1, total_bytes);
        if (quiet_ || tokens == 0) return;  // nothing counted yet (or an empty corpus, which fails)
        const auto now = std::chrono::steady_clock::now();
        if (!done && now - last_ < std::chrono::milliseconds(tty_ ? 250 : 2000)) return;
        last_ = now;
        const double secs = std::chrono::duration<double>(now - start_).count();
        const double f = std::min(1.0, double(bytes) / double(total_));
        const double rate = secs > 0 ? double(tokens) / secs : 0.0;
        const double left = f > 0 ? secs * (1.0 - f) / f : 0.0;
        char line[160];
        std::snprintf(line, sizeof(line), "%5.1f%%  %lld tokens  %.0f tokens/s  %s left", 100.0 * f,
                      static_cast<long long>(tokens), rate, clock(left).c_str());
        if (tty_) {
            constexpr int kWidth = 24;
            const int filled = static_cast<int>(kWidth * f);
            std::fprintf(stderr, "\r[%s%s] %s\033[K", std::string(std::size_t(filled), '#').c_str(),
                         std::string(std::size_t(kWidth - filled), '.').c_str(), line);
            if (done) std::fputc('\n', stderr);
        } else {
            const int tenth = static_cast<int>(f * 10);
            if (done || tenth > last_tenth_) std::fprintf(stderr, "modscope-stats: %s\n", line);
            last_tenth_ = tenth;
        }
        std::fflush(stderr);
    }

private:
    static std::string clock(double s) {
        char buf[32];
        const long t = static_cast<long>(s + 0.5);
        std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
        return buf;
    }
    std::uint64_t total_ = 1;
    bool tty_, quiet_;
    std::chrono::steady_clock::time_point start_, last_{};
    int last_tenth_ = -1;
};

void writeOutputs(const modscope::CorpusStats& stats, const Options& o) {
    modscope::writeFileAtomic(o.out, modscope::statsToJson(stats, o.min_count));
    if (!o.csv.empty()) modscope::writeStatsCsv(stats, o.csv, o.min_count);
}

int merge(const Options& o) {
    std::vector<modscope::CorpusStats> parts;
    for (const auto& f : o.merge) parts.push_back(modscope::loadStats(f));
    const int n = parts.front().shard_count;
    std::set<int> seen;
    for (std::size_t i = 0; i < parts.size(); ++i) {
        if (parts[i].shard_count != n)
            throw Error(o.merge[i] + ": a shard of " + std::to_string(parts[i].shard_count) + ", the first file's of " +
                        std::to_string(n));
        if (!seen.insert(parts[i].shard_index).second)
            throw Error(o.merge[i] + ": shard " + std::to_string(parts[i].shard_index) + " is given twice");
    }
    if (int(seen.size()) != n) {
        std::string missing;
        for (int i = 1; i <= n; ++i)
            if (!seen.count(i)) missing += (missing.empty() ? "" : ", ") + std::to_string(i);
        throw Error("--merge: shards " + missing + " of " + std::to_string(n) + " are missing");
    }
    auto all = std::move(parts.front());
    for (std::size_t i = 1; i < parts.size(); ++i) {
        try {
            all.merge(parts[i]);
        } catch (const Error& e) {
            throw Error(o.merge[i] + ": " + e.what());
        }
    }
    all.shard_index = 1;
    all.shard_count = 1;
    writeOutputs(all, o);
    if (!o.quiet)
        std::printf("merged    %zu shards: %lld windows, %lld tokens%s\nwrote     %s\n", o.merge.size(),
                    static_cast<long long>(all.windows), static_cast<long long>(all.tokens),
                    all.partial ? " (partial: a shard was stopped early)" : "", o.out.c_str());
    return 0;
}

int run(const Options& o) {
    if (!o.merge.empty()) return merge(o);
    const auto [shard_index, shard_count] = o.shard.empty() ? std::pair{1, 1} : parseShard(o.shard);
    const auto files = modscope::corpusFiles(o.corpus);

    // The model counted: --model, else the last checkpoint, else the bundled one.
    std::string dir = o.model;
    if (dir.empty()) dir = o.checkpoints.empty() ? modscope::defaultModelDirectory() : o.checkpoints.back();
    const auto model = modscope::Model::open(dir, o.device);
    const auto& cfg = model->config();
    const int window = o.window > 0 ? o.window : std::min(256, cfg.max_seq_len);
    if (window > cfg.max_seq_len)
        throw UsageError("--window " + std::to_string(window) + ": the model's context is " + std::to_string(cfg.max_seq_len));
    if (cfg.routed_layers.empty()) throw Error(dir + ": the model has no routed layers: there is no routing to count");
    modscope::RunOptions options;
    options.mode = modscope::routingModeFromString(o.mode);
    options.capacity = o.capacity;
    auto stats = modscope::statsForModel(*model, options.mode, o.capacity < 0 ? cfg.capacity : o.capacity, window);
    stats.sources = o.corpus;
    stats.shard_index = shard_index;
    stats.shard_count = shard_count;

    std::vector<std::unique_ptr<modscope::Model>> checkpoint_models;
    std::vector<const modscope::Model*> checkpoints;
    for (const auto& c : o.checkpoints) {
        auto m = modscope::Model::open(c, o.device);
        if (modscope::tokenizerPieces(*m->tokenizer()) != stats.pieces)
            throw Error("--checkpoints " + c + ": its tokenizer differs from " + cfg.name + "'s");
        if (m->config().routed_layers != cfg.routed_layers)
            throw Error("--checkpoints " + c + ": its routed layers differ from " + cfg.name + "'s");
        modscope::CheckpointMatch match;
        match.name = m->config().name;
        match.directory = m->directory();
        match.matching.assign(cfg.routed_layers.size(), 0);
        match.decisions.assign(cfg.routed_layers.size(), 0);
        stats.checkpoints.push_back(match);
        checkpoints.push_back(m.get());
        checkpoint_models.push_back(std::move(m));
    }

    std::signal(SIGINT, onInterrupt);
    Progress progress(o.quiet);
    std::uint64_t bytes_done = 0, bytes_total = 1;
    modscope::countCorpus(*model, files, options, stats, checkpoints, &g_stop,
                          [&](std::uint64_t done, std::uint64_t total) {
                              bytes_done = done, bytes_total = total;
                              progress.update(done, total, stats.tokens);
                          });
    progress.update(bytes_done, bytes_total, stats.tokens, true);
    writeOutputs(stats, o);
    if (!o.quiet) {
        std::printf("model     %s  %s\n", cfg.name.c_str(), model->directory().c_str());
        std::printf("run       %s, capacity %g, windows of %d tokens, shard %d of %d%s\n", o.mode.c_str(), stats.capacity,
                    window, shard_index, shard_count, stats.partial ? ", stopped early: partial" : "");
        std::printf("corpus    %zu files, %lld windows, %lld tokens counted\n", files.size(),
                    static_cast<long long>(stats.windows), static_cast<long long>(stats.tokens));
        for (const auto& l : stats.layers) {
            const auto r = modscope::wilsonInterval(l.processed, l.tokens);
            std::printf("layer %-3d processed %6.2f%% (95%% %.2f-%.2f), predictor accuracy %.3f (balanced %.3f)\n", l.index,
                        100 * r.rate, 100 * r.low, 100 * r.high, l.predictor.accuracy(), l.predictor.balancedAccuracy());
        }
        std::printf("wrote     %s%s%s\n", o.out.c_str(), o.csv.empty() ? "" : " and CSV tables in ", o.csv.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    modscope::configureRuntime(modscope::RuntimeOptions::forTools());
    Options o;
    modscope::cli::ToolCommandLine cli("modscope-stats", kAbout, kNotes, std::string("writes ") + modscope::kStatsSchema);
    cli.group("What to run");
    cli.text("--model", o.model, "DIR",
             "checkpoint directory (default: $MODSCOPE_MODEL, else the last of --checkpoints, else the bundled model)");
    cli.number("--capacity", o.capacity, 0.0, 1.0, "fraction of tokens a routed layer takes (default: the model's)");
    cli.choice("--mode", o.mode, {"topk", "causal"}, "routing rule (default topk)");
    cli.integer("--window", o.window, 1, modscope::kMaxTraceTokens,
                "tokens a window (default 256, or the model's context where shorter)");
    cli.text("--shard", o.shard, "I/N", "count only the I-th of N parts of the corpus (windows I, I+N, ...; 1-based)");
    cli.text("--device", o.device, "D", "auto, cpu or cuda (default cpu)");
    cli.app().add_option("corpus", o.corpus, "text files, .jsonl files or folders")->type_name("CORPUS");
    cli.app().add_option("--checkpoints", o.checkpoints,
                         "checkpoint directories of one training run, in order: each one's decisions against the last's")
        ->type_name("DIR...")
        ->group("What to run");
    cli.app().add_option("--merge", o.merge, "merge the shards' statistics files into --out")->type_name("FILE...")->group("What to run");
    cli.group("Output");
    cli.text("--out", o.out, "FILE", "the statistics file to write (JSON)");
    cli.text("--csv", o.csv, "DIR", "also write each table as a CSV file in DIR");
    cli.integer("--min-count", o.min_count, 1, 1 << 30, "occurrences a piece needs to be listed (default 20)");
    cli.flag("--quiet", o.quiet, "no progress or summary");
    if (const auto status = cli.parse(argc, argv)) return *status;
    try {
        if (o.out.empty()) throw UsageError("--out FILE is required");
        if (!o.merge.empty() && (!o.corpus.empty() || !o.checkpoints.empty() || !o.shard.empty()))
            throw UsageError("--merge takes statistics files only: no corpus, --checkpoints or --shard");
        if (o.merge.empty() && o.corpus.empty()) throw UsageError("name the corpus: text files, .jsonl files or folders");
        return run(o);
    } catch (const UsageError& e) {
        return cli.usageError(e.what());
    } catch (const std::exception& e) {
        return cli.fail(e.what());
    }
}
