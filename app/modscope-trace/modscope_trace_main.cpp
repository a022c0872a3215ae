// modscope-trace: runs a Mixture-of-Depths model over a prompt (or a batch of them) and writes the routing
// trace as JSON, JSON Lines or CSV (docs/TRACE_FORMAT.md), with a per-layer summary on stdout.
//
// It builds every trace with modscope::traceModel, the function the app's export uses, so both give the
// same file for the same model, prompt, capacity and mode.
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "modscope/engine.h"
#include "modscope/paths.h"
#include "modscope/trace_io.h"
#include "tool_command_line.h"

namespace {

using modscope::Error;

constexpr std::uint64_t kMaxInputBytes = 64ull << 20;  // --input and --batch files

const char* kAbout = R"(Runs a Mixture-of-Depths model over a prompt and writes its routing trace.

usage:
  modscope-trace [--model DIR] (--prompt TEXT | --input FILE | --batch FILE.jsonl) --out FILE [options]
  modscope-trace --check FILE

The extension of --out picks the format: .json (one trace document; with --batch a JSON array of them),
.jsonl (one document per line) or .csv (long form, one row per layer and token; with --batch a leading
prompt_index column). docs/TRACE_FORMAT.md describes the formats. A per-layer summary goes to stdout.
)";

const char* kNotes = R"(
A prompt longer than the model's context is cut after its first max_seq_len tokens (a note says so on
stderr, and the trace records the original length). Exit status: 0 done, 1 failed, 2 bad arguments.
)";

using modscope::cli::UsageError;

struct Options {
    std::string model, prompt, input, batch, out, check, device = "auto", mode = "topk";
    bool quiet = false;
    modscope::cli::CapacitySpec capacity;
    int generate = 0;
    float temperature = 0.8f, top_p = 0.95f;
    std::uint64_t seed = 0;
    bool token_loss = false, keep_capacity = false, decision_values = false;
    std::vector<std::string> force;
};

// --force LAYER:POS=process|skip, or LAYER:all=process|skip for every token of the layer.
modscope::RoutingOverride parseForce(const std::string& text) {
    const auto fail = [&](const std::string& why) {
        return UsageError("--force " + text + ": " + why + " (expected LAYER:POS=process|skip or LAYER:all=...)");
    };
    const auto colon = text.find(':'), eq = text.find('=');
    if (colon == std::string::npos || eq == std::string::npos || eq < colon) throw fail("malformed");
    modscope::RoutingOverride o;
    o.layer = static_cast<int>(modscope::cli::parseInteger("--force", text.substr(0, colon), 0, modscope::kMaxTraceLayers - 1));
    const auto pos = text.substr(colon + 1, eq - colon - 1);
    o.position = pos == "all" ? modscope::RoutingOverride::kAllPositions
                              : static_cast<int>(modscope::cli::parseInteger("--force", pos, 0, modscope::kMaxTraceTokens - 1));
    const auto what = text.substr(eq + 1);
    if (what != "process" && what != "skip") throw fail("'" + what + "' is neither process nor skip");
    o.process = what == "process";
    return o;
}

struct Prompt {
    std::string text;
    std::string id;  // batch only
    bool id_integer = false;
};

std::string routedList(const modscope::ModelConfig& cfg) {
    std::string out;
    for (const int l : cfg.routed_layers) out += (out.empty() ? "" : ", ") + std::to_string(l);
    return out.empty() ? "none" : out;
}

std::string formatNumber(double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

// Usage problems the parser cannot see: which options go together.
void checkCombination(const Options& o, bool have_prompt) {
    const int sources = int(have_prompt) + int(!o.input.empty()) + int(!o.batch.empty());
    if (!o.check.empty()) {
        if (sources != 0 || !o.out.empty()) throw UsageError("--check takes a trace file and nothing to run");
        return;
    }
    if (sources != 1) throw UsageError("give exactly one of --prompt, --input or --batch");
    if (o.out.empty()) throw UsageError("--out FILE is required (.json, .jsonl or .csv)");
    std::string ext = std::filesystem::path(o.out).extension().string();
    for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext != ".json" && ext != ".jsonl" && ext != ".csv")
        throw UsageError("--out " + o.out + ": unknown format '" + (ext.empty() ? "(no extension)" : ext) +
                         "' (use .json, .jsonl or .csv)");
}

std::string readInput(const std::string& path, const char* flag, std::uint64_t max_bytes = kMaxInputBytes) {
    std::string data;
    if (path == "-") {
        char buf[65536];
        std::size_t n = 0;
        while ((n = std::fread(buf, 1, sizeof(buf), stdin)) > 0) {
            data.append(buf, n);
            if (data.size() > max_bytes)
                throw Error(std::string(flag) + " -: more than " + std::to_string(max_bytes) + " bytes");
        }
        return data;
    }
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
        throw Error(std::string(flag) + " " + path + ": no such file");
    if (!std::filesystem::is_regular_file(status))
        throw Error(std::string(flag) + " " + path + ": not a regular file");
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) throw Error(std::string(flag) + " " + path + ": " + ec.message());
    if (size > max_bytes)
        throw Error(std::string(flag) + " " + path + ": " + std::to_string(size) + " bytes, more than the " +
                    std::to_string(max_bytes) + " accepted");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(std::string(flag) + " " + path + ": cannot open for reading");
    data.resize(static_cast<std::size_t>(size));
    in.read(data.data(), static_cast<std::streamsize>(data.size()));
    if (in.gcount() != static_cast<std::streamsize>(data.size()) || in.bad())
        throw Error(std::string(flag) + " " + path + ": read failed");
    return data;
}

void requireUtf8(const std::string& text, const std::string& what) {
    std::size_t bad = 0;
    if (!modscope::isValidUtf8(text, &bad))
        throw Error(what + ": not UTF-8 text (invalid byte at offset " + std::to_string(bad) + ")");
}

std::vector<Prompt> readBatch(const std::string& path) {
    const auto text = readInput(path, "--batch");
    requireUtf8(text, "--batch " + path);
    std::vector<Prompt> prompts;
    for (const auto& [line_no, line] : modscope::nonBlankLines(text)) {
        const std::string where = "--batch " + path + ", line " + std::to_string(line_no);
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(line);
        } catch (const std::exception&) {
            throw Error(where + ": not a JSON object");
        }
        if (!j.is_object()) throw Error(where + ": expected a JSON object such as {\"prompt\": \"...\"}");
        const auto p = j.find("prompt");
        if (p == j.end() || !p->is_string()) throw Error(where + ": needs a string field \"prompt\"");
        Prompt prompt;
        prompt.text = p->get<std::string>();
        if (const auto id = j.find("id"); id != j.end() && !id->is_null()) {
            if (id->is_string())
                prompt.id = id->get<std::string>();
            else if (id->is_number_unsigned() &&
                     id->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                throw Error(where + ": \"id\" " + id->dump() + " is beyond a 64-bit integer (write it as a string)");
            else if (id->is_number_integer())
                prompt.id = id->dump(), prompt.id_integer = true;
            else
                throw Error(where + ": \"id\" must be a string or an integer");
        }
        if (prompts.size() >= static_cast<std::size_t>(modscope::kMaxTraceDocuments))
            throw Error("--batch " + path + ": more than " + std::to_string(modscope::kMaxTraceDocuments) +
                        " prompts");
        prompts.push_back(std::move(prompt));
    }
    if (prompts.empty()) throw Error("--batch " + path + ": no prompts in the file");
    return prompts;
}

// Progress on stderr: a bar redrawn in place on a terminal, else a line at every tenth.
class Progress {
public:
    explicit Progress(std::size_t total) : total_(total), tty_(isatty(STDERR_FILENO) != 0) {}
    void update(std::size_t done) {
        if (tty_) {
            constexpr int kWidth = 30;
            const int filled = static_cast<int>(kWidth * done / total_);
            std::fprintf(stderr, "\r[%s%s] %zu/%zu prompts", std::string(filled, '#').c_str(),
                         std::string(kWidth - filled, '.').c_str(), done, total_);
            if (done == total_) std::fputc('\n', stderr);
            std::fflush(stderr);
        } else {
            const std::size_t step = std::max<std::size_t>(1, total_ / 10);
            if (done % step == 0 || done == total_)
                std::fprintf(stderr, "modscope-trace: %zu/%zu prompts\n", done, total_);
        }
    }

private:
    std::size_t total_;
    bool tty_;
};

std::string formatBytes(std::int64_t bytes) {
    char buf[64];
    if (bytes >= (1 << 20))
        std::snprintf(buf, sizeof(buf), "%.1f MiB", bytes / double(1 << 20));
    else if (bytes >= 1024)
        std::snprintf(buf, sizeof(buf), "%.1f KiB", bytes / 1024.0);
    else
        std::snprintf(buf, sizeof(buf), "%lld B", static_cast<long long>(bytes));
    return buf;
}

void printSummary(const std::vector<modscope::TraceDocument>& docs, const modscope::Model& model,
                  const std::string& out) {
    modscope::TraceStats total;
    for (const auto& d : docs) total += modscope::traceStats(d);
    const auto& first = docs.front();
    const bool batch = docs.size() > 1 || first.prompt_index >= 0;
    std::printf("model     %s  %s", model.config().name.c_str(),
                model.directory().empty() ? "(not saved)" : model.directory().c_str());
    if (!model.weightsSha256().empty()) std::printf("  sha256 %.12s", model.weightsSha256().c_str());
    std::printf("\n");
    std::printf("run       %s, capacity %g, device %s, backend %s, ", modscope::toString(first.run.mode),
                first.run.capacity, first.run.device.c_str(), first.run.backend.c_str());
    if (batch)
        std::printf("%zu prompts, %d tokens\n", docs.size(), total.tokens);
    else
        std::printf("%d tokens%s\n", total.tokens, first.truncated() ? " (prompt truncated)" : "");
    std::string own;  // routed layers that ran at a capacity of their own
    for (const auto& l : first.run.layers)
        if (l.routed && modscope::layerCapacity(first.run, l) != first.run.capacity)
            own += (own.empty() ? "" : ", ") + std::to_string(l.index) + ": " + formatNumber(l.capacity);
    if (!own.empty()) std::printf("layer capacities %s\n", own.c_str());
    std::printf("%5s  %6s  %7s  %13s  %9s  %9s\n", "layer", "routed", batch ? "k (sum)" : "k", "processed",
                "pred acc", "balanced");
    for (const auto& l : total.layers) {
        char processed[32];
        std::snprintf(processed, sizeof(processed), "%d/%d", l.processed, l.tokens);
        if (l.routed)
            std::printf("%5d  %6s  %7d  %13s  %9.3f  %9.3f\n", l.index, "yes", l.k, processed,
                        l.predictor.accuracy(), l.predictor.balancedAccuracy());
        else
            std::printf("%5d  %6s  %7d  %13s  %9s  %9s\n", l.index, "no", l.k, processed, "-", "-");
    }
    // Mixture layers: where the tokens that reached each went, summed over the documents.
    for (std::size_t li = 0; li < first.run.layers.size(); ++li) {
        if (!first.run.layers[li].moe) continue;
        const auto& f = first.run.layers[li];
        long reached = 0, ran = 0, noop = 0, overflow = 0;
        std::vector<long> load(static_cast<std::size_t>(f.n_experts), 0);
        for (const auto& d : docs) {
            const auto c = modscope::countMixture(d.run.layers[li]);
            reached += c.reached, noop += c.noop, overflow += c.overflow;
            for (std::size_t e = 0; e < load.size() && e < c.load.size(); ++e) load[e] += c.load[e], ran += c.load[e];
        }
        const double n = std::max(1L, reached);
        std::printf("mixture   layer %zu: %ld tokens reached it, an expert ran %.1f%%, no-op %.1f%%, overflow %.1f%%; load",
                    li, reached, 100 * ran / n, 100 * noop / n, 100 * overflow / n);
        for (long x : load) std::printf(" %ld", x);
        std::printf("\n");
    }
    if (!batch && !first.run.token_loss.empty()) {
        const double total_loss = modscope::totalTokenLoss(first.run.token_loss);
        const auto n = first.run.token_loss.size() - 1;
        std::printf("loss      %.4f summed over %zu next tokens, %.4f each\n", total_loss, n,
                    n > 0 ? total_loss / double(n) : 0.0);
    }
    if (!batch && !first.run.overrides.empty())
        std::printf("forced    %zu override%s, %s\n", first.run.overrides.size(),
                    first.run.overrides.size() == 1 ? "" : "s", first.run.keep_capacity ? "keeping capacity" : "exact flips");
    for (const auto& l : first.run.layers)
        if (!batch && l.routed && !l.decision_value.empty())
            std::printf("values    layer %d picked %d of its %d most valuable tokens\n", l.index,
                        modscope::valuableSelected(l), l.processed);
    std::printf("processed %.1f%% of token-layers (routed layers %.1f%%), FLOPs %.3f of dense",
                100 * total.processedFraction(), 100 * total.routedProcessedFraction(),
                total.flopsFraction());
    if (total.predictor.total() > 0)
        std::printf(", predictor accuracy %.3f (balanced %.3f)", total.predictor.accuracy(),
                    total.predictor.balancedAccuracy());
    std::printf("\n");
    if (!batch && first.generation) {
        const auto& g = first.generation->result;
        std::printf("generated %zu tokens, KV cache %s against %s dense, %.1f tokens/s\n",
                    g.generated_ids.size(), formatBytes(g.kv_cache_bytes).c_str(),
                    formatBytes(g.dense_kv_cache_bytes).c_str(), g.tokens_per_second);
    }
    std::printf("wrote     %s\n", out.c_str());
}

// --check: the file through the same readers the app replays traces with; one line on stdout when it is
// sound, the reader's one-line reason (exit 1) when not.
int checkTrace(const std::string& path) {
    std::string ext = std::filesystem::path(path).extension().string();
    for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext == ".csv") {
        const auto text = readInput(path, "--check", modscope::kMaxTraceFileBytes);
        std::vector<modscope::TraceCsvRow> rows;
        try {
            rows = modscope::traceRowsFromCsv(text);
        } catch (const Error& e) {
            throw Error(path + ": " + e.what());
        }
        std::printf("%s: a trace CSV of %zu rows\n", path.c_str(), rows.size());
        return 0;
    }
    if (ext != ".json" && ext != ".jsonl")
        throw UsageError("--check " + path + ": unknown format '" + (ext.empty() ? "(no extension)" : ext) +
                         "' (use .json, .jsonl or .csv)");
    const auto docs = modscope::loadTraces(path);
    std::size_t tokens = 0;
    for (const auto& d : docs) tokens += d.tokens.size();
    std::printf("%s: %zu %s trace document%s, %zu tokens\n", path.c_str(), docs.size(),
                docs.empty() ? modscope::kTraceSchema : docs.front().schema.c_str(),
                docs.size() == 1 ? "" : "s", tokens);
    return 0;
}

int run(const Options& o, bool have_prompt) {
    if (!o.check.empty()) return checkTrace(o.check);
    std::vector<Prompt> prompts;
    if (have_prompt) {
        requireUtf8(o.prompt, "--prompt");
        prompts.push_back({o.prompt, {}});
    } else if (!o.input.empty()) {
        auto text = readInput(o.input, "--input");
        requireUtf8(text, "--input " + o.input);
        prompts.push_back({std::move(text), {}});
    } else {
        prompts = readBatch(o.batch);
    }
    const bool batch = !o.batch.empty();

    const std::string dir = o.model.empty() ? modscope::defaultModelDirectory() : o.model;
    const auto model = modscope::Model::open(dir, o.device);

    modscope::TraceRequest request;
    request.mode = modscope::routingModeFromString(o.mode);
    request.capacity = o.capacity.all;
    const auto& cfg = model->config();
    for (std::size_t li = 0; li < o.capacity.per_layer.size(); ++li) {
        if (o.capacity.per_layer[li] < 0) continue;
        if (li >= static_cast<std::size_t>(cfg.n_layers) || !cfg.isRouted(static_cast<int>(li)))
            throw UsageError("--capacity: layer " + std::to_string(li) + " is not a routed layer of " + cfg.name +
                             " (routed: " + routedList(cfg) + ")");
    }
    request.layer_capacity = o.capacity.per_layer;
    request.generate_tokens = o.generate;
    request.generation.temperature = o.temperature;
    request.generation.top_p = o.top_p;
    request.generation.seed = o.seed;
    request.generation.eos_id = -1;
    for (const auto& f : o.force) {
        const auto override_ = parseForce(f);
        if (override_.layer >= cfg.n_layers || !cfg.isRouted(override_.layer))
            throw UsageError("--force " + f + ": layer " + std::to_string(override_.layer) + " is not a routed layer of " +
                             cfg.name + " (routed: " + routedList(cfg) + ")");
        request.overrides.push_back(override_);
    }
    request.keep_capacity = o.keep_capacity;
    request.token_loss = o.token_loss || o.decision_values;
    request.decision_values = o.decision_values;
    std::size_t values_prompt = 0;  // the prompt whose decision values are being computed (progress)
    if (o.decision_values && isatty(STDERR_FILENO))
        request.progress = [&values_prompt, batch](int done, int cells) {
            if (done != cells && done % 16 != 0) return;
            std::fprintf(stderr, "\rdecision values%s: %d/%d cells", batch ? (" of prompt " + std::to_string(values_prompt)).c_str() : "",
                         done, cells);
            if (done == cells) std::fputs("\r\033[K", stderr);
            std::fflush(stderr);
        };

    std::vector<modscope::TraceDocument> docs;
    docs.reserve(prompts.size());
    Progress progress(prompts.size());
    for (std::size_t i = 0; i < prompts.size(); ++i) {
        const std::string which = batch ? "prompt " + std::to_string(i) +
                                              (prompts[i].id.empty() ? "" : " (id " + prompts[i].id + ")")
                                        : "the prompt";
        modscope::TraceDocument doc;
        values_prompt = i;
        try {
            doc = modscope::traceModel(*model, prompts[i].text, request);
        } catch (const modscope::Cancelled&) {
            throw;
        } catch (const Error& e) {
            throw Error(batch ? which + ": " + e.what() : std::string(e.what()));
        }
        if (doc.truncated()) {
            if (batch && isatty(STDERR_FILENO)) std::fputc('\n', stderr);
            std::fprintf(stderr,
                         "modscope-trace: note: %s has %zu tokens, more than the model's context of %d: "
                         "tracing the first %zu\n",
                         which.c_str(), doc.original_tokens, model->config().max_seq_len, doc.tokens.size());
        }
        if (o.generate > 0 && doc.generation && doc.generation->result.generated_ids.empty())
            std::fprintf(stderr, "modscope-trace: note: %s fills the model's context: no tokens generated\n",
                         which.c_str());
        if (batch) {
            doc.prompt_index = static_cast<int>(i);
            doc.prompt_id = prompts[i].id;
            doc.prompt_id_integer = prompts[i].id_integer;
        }
        docs.push_back(std::move(doc));
        if (batch) progress.update(i + 1);
    }

    if (batch)
        modscope::saveTraces(o.out, docs);
    else
        modscope::saveTrace(o.out, docs.front());
    if (!o.quiet) printSummary(docs, *model, o.out);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    // First, before any other thread starts: the engine changes process-wide state only when asked (modscope/engine.h).
    modscope::configureRuntime(modscope::RuntimeOptions::forTools());
    Options o;
    modscope::cli::ToolCommandLine cli("modscope-trace", kAbout, kNotes,
                                       std::string("writes ") + modscope::kTraceSchema);
    cli.group("What to run");
    cli.text("--model", o.model, "DIR", "checkpoint directory (default: $MODSCOPE_MODEL, else the bundled model)");
    auto* prompt = cli.text("--prompt", o.prompt, "TEXT", "the prompt");
    cli.text("--input", o.input, "FILE", "read the prompt from FILE, UTF-8 ('-' reads standard input)");
    cli.text("--batch", o.batch, "FILE.jsonl",
             "one prompt per line: {\"prompt\": \"...\"} or {\"id\": ..., \"prompt\": \"...\"}");
    cli.capacity("--capacity", o.capacity,
                 "fraction of tokens a routed layer processes (default: the model's); LAYER:F gives one routed "
                 "layer its own, as in 1:0.25,3:0.125, beside or instead of the run's F");
    cli.choice("--mode", o.mode, {"topk", "causal"}, "routing rule of the traced forward pass (default topk)");
    cli.text("--device", o.device, "D", "auto, cpu or cuda (default auto)");
    cli.group("Interventions (docs/MODEL.md)");
    cli.flag("--token-loss", o.token_loss, "record each position's loss of the next token (token_loss)");
    cli.texts("--force", o.force, "LAYER:POS=process|skip",
              "force a routed layer's decision on the token at POS (0-based), or on every token with LAYER:all=...; "
              "repeatable");
    cli.flag("--keep-capacity", o.keep_capacity,
             "forced layers keep their k: the other places go to the highest-ranked free tokens (default: exact "
             "flips, the layer's own selection plus and minus the forced tokens)");
    cli.flag("--decision-values", o.decision_values,
             "each routed cell's decision value: the summed loss with that decision flipped, minus without (implies "
             "--token-loss; one single-flip run per cell)");
    cli.group("Generation");
    cli.integer("--generate", o.generate, 0, modscope::kMaxTraceTokens,
                "then generate N tokens (always causal) and record each step's routing");
    cli.number("--temperature", o.temperature, 0.0, 100.0, "sampling temperature, 0 = greedy (default 0.8)");
    cli.number("--top-p", o.top_p, 0.0, 1.0, "nucleus sampling threshold (default 0.95)");
    cli.unsignedInteger("--seed", o.seed, "sampling seed (default 0)");
    cli.group("Output");
    cli.text("--out", o.out, "FILE", "the trace file to write (.json, .jsonl or .csv)");
    cli.flag("--quiet", o.quiet, "no summary on stdout");
    cli.text("--check", o.check, "FILE",
             "read a trace file (.json, .jsonl or .csv) as ModScope reads a trace it is sent, and say what it "
             "holds, or exit 1 with what is wrong with it");
    if (const auto status = cli.parse(argc, argv)) return *status;
    try {
        checkCombination(o, prompt->count() > 0);
        return run(o, prompt->count() > 0);
    } catch (const UsageError& e) {
        return cli.usageError(e.what());
    } catch (const std::exception& e) {
        return cli.fail(e.what());
    }
}
