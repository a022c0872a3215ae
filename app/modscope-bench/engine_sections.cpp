#include "engine_sections.h"

#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include "bench_corpus.h"
#include "bench_stats.h"
#include "core_probe.h"
#include "modscope/corpus_run.h"
#include "modscope/profiling.h"
#include "modscope/trainer.h"

namespace modscope::bench {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Lengths the model can run, in order.
std::vector<int> fitting(const std::vector<int>& lengths, int max_seq_len) {
    std::vector<int> out;
    for (int T : lengths)
        if (T <= max_seq_len) out.push_back(T);
    return out;
}

// Repetitions per length: enough for a stable median, fewer where one forward is long.
int repsFor(const BenchContext& ctx, int T) {
    if (ctx.quick()) return T >= 2048 ? 2 : (T >= 512 ? 3 : 5);
    return T >= 2048 ? 8 : (T >= 512 ? 40 : 60);
}
int warmupFor(const BenchContext& ctx, int T = 0) {
    return ctx.quick() || T >= 2048 ? 1 : 2;
}

struct TimedRun {
    Summary ms;
    RunTrace trace;  // of the last call
};

TimedRun timeRun(const BenchContext& ctx, const Model& model, const std::vector<int>& ids,
                 const RunOptions& ro) {
    TimedRun r;
    r.ms = timeRepeated(warmupFor(ctx, static_cast<int>(ids.size())),
                        repsFor(ctx, static_cast<int>(ids.size())), [&] { r.trace = model.run(ids, ro); });
    return r;
}

std::string summaryCell(const Summary& s, int decimals) {
    return fixed(s.median, decimals);
}
std::string spreadCell(const Summary& s, int decimals) {
    return spread(s.p10, s.p90, decimals);
}

}  // namespace

// ---------------------------------------------------------------------------------------------- forward
void benchForward(BenchContext& ctx) {
    const Model& model = ctx.model();
    const auto& cfg = model.config();
    Table table("Forward + trace, " + cfg.name + " (Model::run, top-k, capacity " + fixed(cfg.capacity, 3) +
                    ", next-token logits as the app asks)",
                {"T", "median ms", "p10–p90 ms", "model ms", "GFLOP", "GFLOP/s", "runs"});
    json rows = json::array();
    const auto lengths = ctx.quick() ? std::vector<int>{32, 128, 512} : std::vector<int>{32, 128, 512, 2048};
    for (int T : fitting(lengths, cfg.max_seq_len)) {
        ctx.progress("forward T=" + std::to_string(T));
        RunOptions ro;
        ro.logits = RunOptions::Logits::Last;
        const auto r = timeRun(ctx, model, randomIds(T, cfg.vocab_size), ro);
        const double gflops = r.trace.flops / (r.ms.median * 1e6);
        table.addRow({std::to_string(T), summaryCell(r.ms, 2), spreadCell(r.ms, 2),
                      fixed(r.trace.elapsed_ms, 2), fixed(r.trace.flops / 1e9, 3), fixed(gflops, 1),
                      std::to_string(r.ms.n)});
        rows.push_back({{"seq_len", T},
                        {"ms", r.ms.toJson()},
                        {"flops", r.trace.flops},
                        {"dense_flops", r.trace.dense_flops},
                        {"gflops", gflops}});
    }
    table.addNote(
        "Wall time of Model::run (forward, top-k selection, full routing trace as the app's worker asks); "
        "\"model ms\" is RunTrace.elapsed_ms of the last run. Seeded random token ids.");
    if (ctx.quick()) table.addNote("--quick: T = 2048 skipped.");
    ctx.report().json["forward"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- mod
namespace {

std::string pairedNote() {
    return "Paired so that a change of the machine's speed between repetitions (a VM's vCPUs moving) falls "
           "on both sides of each ratio; the ratio of the two medians is in the JSON as speedup_of_medians.";
}

}  // namespace

void benchModVsDense(BenchContext& ctx) {
    const Model& model = ctx.model();
    const Model& dense = ctx.denseTwin();
    const auto& cfg = model.config();
    Table table("MoD against dense of the same shape (" + cfg.name + ", next-token logits)",
                {"T", "capacity", "dense ms", "MoD ms", "MoD p10–p90", "speed-up", "ideal (FLOPs)", "÷ ideal",
                 "of saving", "after a switch", "cores before / after"});
    json rows = json::array();
    const auto lengths = ctx.quick() ? std::vector<int>{128, 512} : std::vector<int>{128, 512, 2048};
    for (int T : fitting(lengths, cfg.max_seq_len)) {
        const auto ids = randomIds(T, cfg.vocab_size, 2);
        RunOptions ro;
        ro.logits = RunOptions::Logits::Last;
        ro.per_token_routing = false;  // forwards compared, not the trace built around them
        ctx.progress("MoD and dense, T=" + std::to_string(T));
        const std::vector<double> capacities{0.125, 0.25, 0.5, 1.0};
        // Dense first, then each capacity, in turn every repetition, each twice in a row (timeInTurns).
        std::vector<RunTrace> traces(1 + capacities.size());
        std::vector<std::function<void()>> fns;
        fns.push_back([&] { traces[0] = dense.run(ids, ro); });
        for (std::size_t c = 0; c < capacities.size(); ++c)
            fns.push_back([&, c] {
                RunOptions o = ro;
                o.capacity = capacities[c];
                traces[1 + c] = model.run(ids, o);
            });
        const auto before = probeCores();
        const auto ms = timeInTurns(warmupFor(ctx, T), repsFor(ctx, T), fns);
        const auto after = probeCores();
        const Summary& d = ms[0].steady;
        for (std::size_t c = 0; c < capacities.size(); ++c) {
            const double capacity = capacities[c];
            const Summary& m = ms[1 + c].steady;
            const RunTrace& trace = traces[1 + c];
            const auto paired = pairedRatios(ms[0].steady_ms, ms[1 + c].steady_ms);
            const double speedup = paired.median;
            const double switched = pairedRatios(ms[0].first_ms, ms[1 + c].first_ms).median;
            const double ideal = trace.dense_flops / trace.flops;
            table.addRow({std::to_string(T), fixed(capacity, 3), summaryCell(d, 2), summaryCell(m, 2),
                          spreadCell(m, 2), fixed(speedup, 2) + "×", fixed(ideal, 2) + "×",
                          percent(speedup / ideal, 0),
                          ideal > 1.01 ? percent((speedup - 1.0) / (ideal - 1.0), 0) : "n/a",
                          fixed(switched, 2) + "× (" + percent(switched / ideal, 0) + ")",
                          before.cell() + " / " + after.cell()});
            rows.push_back({{"seq_len", T},
                            {"capacity", capacity},
                            {"dense_ms", d.median},
                            {"mod_ms", m.median},
                            {"dense_spread_ms", {d.p10, d.p90}},
                            {"mod_spread_ms", {m.p10, m.p90}},
                            {"dense", d.toJson()},
                            {"mod", m.toJson()},
                            {"speedup", speedup},
                            {"speedup_paired", paired.toJson()},
                            {"speedup_of_medians", d.median / m.median},
                            {"ideal_speedup", ideal},
                            {"dense_after_switch", ms[0].first.toJson()},
                            {"mod_after_switch", ms[1 + c].first.toJson()},
                            {"speedup_after_switch", switched},
                            {"flops", trace.flops},
                            {"dense_flops", trace.dense_flops},
                            {"cores_before", before.toJson()},
                            {"cores_after", after.toJson()}});
        }
    }
    table.addNote(
        "Model::run with RunOptions::per_token_routing off: the forward alone, no per-token trace. "
        "Dense: Model::create of the same config with routed_layers cleared (random weights). Each "
        "repetition runs dense, then each capacity, every one twice in a row: MoD and dense times are the "
        "second runs, a model run after run as the app re-runs it; \"after a switch\" compares the first "
        "runs, each right after the other model (or capacity) ran, when some of its weights have left the "
        "caches (the speed-up, and in brackets its share of the ideal). Ideal = RunTrace.dense_flops / "
        "RunTrace.flops (docs/MODEL.md, FLOPs). Speed-ups are the median of each repetition's dense / MoD "
        "ratio, the two timed within a second or so of each other. \"÷ ideal\" = speed-up / ideal, the "
        "measure the targets use; \"of saving\" = (speed-up − 1) / (ideal − 1): the share of the "
        "possible saving realised (n/a at capacity 1: nothing to save). " +
        pairedNote() + " " + coreVerdictsNote());
    if (ctx.quick()) table.addNote("--quick: T = 2048 skipped.");
    ctx.report().json["mod_vs_dense"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- mixtures
void benchMixtures(BenchContext& ctx) {
    const auto& base = ctx.model().config();
    // The model zoo's variants of the model's shape (README "Model zoo"; scripts/train_model_zoo.sh), with
    // seeded random weights: times depend on shapes and on how many tokens each expert runs, which a random
    // router spreads about evenly.
    struct Variant {
        std::string name;
        std::unique_ptr<Model> model;
    };
    const auto routed = base.routed_layers.empty() ? ModelConfig::everyOtherLayer(base.n_layers) : base.routed_layers;
    const auto variant = [&](const std::string& name, bool mod, bool moe, int noop) {
        ModelConfig c = base;
        c.name = base.name + "-" + name;
        c.routed_layers = mod ? routed : std::vector<int>{};
        c.moe_layers = moe ? routed : std::vector<int>{};
        c.n_experts = moe ? 4 : 0;
        c.noop_experts = moe ? noop : 0;
        c.expert_capacity_factor = 1.25;
        return Variant{name, Model::create(c, /*seed=*/1234, "cpu")};
    };
    std::vector<Variant> variants;
    variants.push_back(variant("dense", false, false, 0));
    variants.push_back(variant("mod", true, false, 0));
    variants.push_back(variant("moe", false, true, 0));
    variants.push_back(variant("mode-staged", true, true, 0));
    variants.push_back(variant("mode-integrated", false, true, 4));
    Table table("Mixture-of-Depths-and-Experts variants of " + base.name + "'s shape (top-k, next-token logits)",
                {"T", "variant", "ms", "p10–p90", "FLOPs ÷ dense", "speed-up", "ideal", "÷ ideal"});
    json rows = json::array();
    const auto lengths = ctx.quick() ? std::vector<int>{128, 512} : std::vector<int>{128, 512, 2048};
    for (int T : fitting(lengths, base.max_seq_len)) {
        const auto ids = randomIds(T, base.vocab_size, 2);
        RunOptions ro;
        ro.logits = RunOptions::Logits::Last;
        ro.per_token_routing = false;
        ctx.progress("mixtures, T=" + std::to_string(T));
        std::vector<RunTrace> traces(variants.size());
        std::vector<std::function<void()>> fns;
        for (std::size_t v = 0; v < variants.size(); ++v)
            fns.push_back([&, v] { traces[v] = variants[v].model->run(ids, ro); });
        const auto ms = timeInTurns(warmupFor(ctx, T), repsFor(ctx, T), fns);
        const double dense_flops = traces[0].flops;
        std::size_t moe_index = 0, staged_index = 0;
        for (std::size_t v = 0; v < variants.size(); ++v) {
            if (variants[v].name == "moe") moe_index = v;
            if (variants[v].name == "mode-staged") staged_index = v;
            const auto paired = pairedRatios(ms[0].steady_ms, ms[v].steady_ms);
            const double ideal = dense_flops / traces[v].flops;
            table.addRow({std::to_string(T), variants[v].name, summaryCell(ms[v].steady, 2), spreadCell(ms[v].steady, 2),
                          fixed(traces[v].flops / dense_flops, 3), fixed(paired.median, 2) + "×",
                          fixed(ideal, 2) + "×", percent(paired.median / ideal, 0)});
            rows.push_back({{"seq_len", T},
                            {"variant", variants[v].name},
                            {"ms", ms[v].steady.toJson()},
                            {"flops", traces[v].flops},
                            {"flops_ratio_to_dense", traces[v].flops / dense_flops},
                            {"speedup_over_dense", paired.median},
                            {"speedup_over_dense_paired", paired.toJson()},
                            {"ideal_speedup_over_dense", ideal}});
        }
        // Staged MoDE against the plain mixture it routes around: the target's measure.
        const auto staged = pairedRatios(ms[moe_index].steady_ms, ms[staged_index].steady_ms);
        const double staged_ideal = traces[moe_index].flops / traces[staged_index].flops;
        table.addRow({std::to_string(T), "staged ÷ moe", "", "", fixed(1.0 / staged_ideal, 3),
                      fixed(staged.median, 2) + "×", fixed(staged_ideal, 2) + "×",
                      percent(staged.median / staged_ideal, 0)});
        rows.push_back({{"seq_len", T},
                        {"variant", "mode-staged over moe"},
                        {"speedup", staged.median},
                        {"speedup_paired", staged.toJson()},
                        {"ideal_speedup", staged_ideal}});
    }
    table.addNote(
        "Model::create of the model's config with: no routed layers (dense); its routed layers (mod); a mixture "
        "of 4 experts, capacity factor 1.25, in those layers and no routed ones (moe); both (mode-staged); the "
        "mixtures with 4 no-op choices and no routed layers (mode-integrated). Random weights, seed 1234. "
        "FLOPs: RunTrace.flops, counting the experts that ran (docs/MODEL.md). Speed-up: the median of each "
        "repetition's dense / variant ratio; ideal: dense FLOPs / the variant's; the last row of each length "
        "compares staged MoDE with the plain mixture. " + pairedNote());
    if (ctx.quick()) table.addNote("--quick: T = 2048 skipped.");
    ctx.report().json["mixtures"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- interventions
void benchInterventions(BenchContext& ctx) {
    const auto& model = ctx.model();
    const auto& cfg = model.config();
    Table table("Interventions on " + cfg.name + ": per-token loss and the whole decision-value map",
                {"T", "mode", "loss run ms", "map s", "cells", "ms a cell", "target s", "÷ target",
                 "map ÷ (cells × loss run)"});
    json rows = json::array();
    if (cfg.routed_layers.empty()) {
        table.addNote("The model has no routed layers: no decisions to value.");
        ctx.report().add(table);
        ctx.report().json["interventions"] = rows;
        return;
    }
    for (int T : fitting({128, 512}, cfg.max_seq_len)) {
        const auto ids = randomIds(T, cfg.vocab_size, 3);
        const double target_s = T <= 128 ? 1.0 : 10.0;  // docs/PERFORMANCE.md
        for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            ctx.progress(std::string("interventions, ") + toString(mode) + ", T=" + std::to_string(T));
            RunOptions loss;
            loss.mode = mode;
            loss.token_loss = true;
            const auto loss_run = timeRun(ctx, model, ids, loss);
            RunOptions values = loss;
            values.decision_values = true;
            // A map is long: a few repetitions, one under --quick or at 512 tokens.
            const int reps = ctx.quick() || T > 128 ? 1 : 3;
            RunTrace trace;
            const auto map_ms = timeRepeated(0, reps, [&] { trace = model.run(ids, values); });
            const int cells = T * static_cast<int>(cfg.routed_layers.size());
            const double brute_ms = cells * loss_run.ms.median;
            table.addRow({std::to_string(T), toString(mode), fixed(loss_run.ms.median, 2), fixed(map_ms.median / 1000.0, 2),
                          std::to_string(cells), fixed(map_ms.median / cells, 3), fixed(target_s, 0),
                          percent(map_ms.median / 1000.0 / target_s, 0), fixed(map_ms.median / brute_ms, 2)});
            rows.push_back({{"seq_len", T},
                            {"mode", toString(mode)},
                            {"token_loss_run_ms", loss_run.ms.toJson()},
                            {"decision_value_map_ms", map_ms.toJson()},
                            {"cells", cells},
                            {"target_seconds", target_s},
                            {"map_over_single_flip_runs", map_ms.median / brute_ms}});
        }
    }
    table.addNote(
        "Random ids, seed 3. Loss run: Model::run with token_loss (every position's logits). Map: the same with "
        "decision_values, one flip per routed cell, each reusing the run's layer inputs and K/V before the flip "
        "(docs/MODEL.md \"Interventions\"). The last column compares the map with as many whole runs. Targets: "
        "1 s at 128 tokens, 10 s at 512.");
    ctx.report().json["interventions"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- stats
void benchStats(BenchContext& ctx) {
    const auto& model = ctx.model();
    const auto& cfg = model.config();
    Table table("Corpus statistics on " + cfg.name + " (modscope-stats' loop: tokenize, run, count)",
                {"mode", "window", "tokens", "s", "tokens/s", "target"});
    json rows = json::array();
    if (cfg.routed_layers.empty()) {
        table.addNote("The model has no routed layers: no routing to count.");
        ctx.report().add(table);
        ctx.report().json["stats"] = rows;
        return;
    }
    std::string source;
    const std::string text = corpusText(ctx.quick() ? 200000 : 1000000, &source);
    const int window = std::min(256, cfg.max_seq_len);
    for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
        ctx.progress(std::string("stats, ") + toString(mode));
        auto stats = statsForModel(model, mode, cfg.capacity, window);
        RunOptions options;
        options.mode = mode;
        const auto t0 = std::chrono::steady_clock::now();
        std::int64_t next = 0;
        for (const auto& w : documentWindows(*model.tokenizer(), text, window, next)) countWindow(model, w, options, stats);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double rate = double(stats.tokens) / s;
        table.addRow({toString(mode), std::to_string(window), std::to_string(stats.tokens), fixed(s, 2), fixed(rate, 0),
                      mode == RoutingMode::TopK ? "≥ 30000" : ""});
        rows.push_back({{"mode", toString(mode)}, {"window", window}, {"tokens", stats.tokens}, {"seconds", s},
                        {"tokens_per_second", rate}});
    }
    table.addNote("One pass each over " + source + " as one document in windows of " + std::to_string(window) +
                  " tokens, with corpus_run.h's functions (what modscope-stats runs, less reading files): "
                  "tokenizing included. Target: 30,000 tokens/s in top-k mode.");
    ctx.report().json["stats"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- layers
void benchLayers(BenchContext& ctx) {
    const Model& model = ctx.model();
    const Model& dense = ctx.denseTwin();
    const auto& cfg = model.config();
    Table table("Layer by layer inside the forward (" + cfg.name + " and its dense twin, top-k, capacity " +
                    fixed(cfg.capacity, 3) + "; medians in ms)",
                {"T", "layer", "block on", "MoD ms", "MoD µs per token", "dense ms", "dense ÷ MoD",
                 "cores before / after"});
    json rows = json::array();
    const auto lengths = ctx.quick() ? std::vector<int>{128, 512} : std::vector<int>{128, 512, 2048};
    for (int T : fitting(lengths, cfg.max_seq_len)) {
        ctx.progress("layers T=" + std::to_string(T));
        const int reps = ctx.quick() ? (T >= 512 ? 8 : 20) : (T >= 2048 ? 8 : (T >= 512 ? 30 : 100));
        // In turns, a share of the forwards each, so that a change of the cores' state falls on both.
        const int turns = std::min(reps, 4);
        const auto before = probeCores();
        LayerProfile m, d;
        for (int turn = 0; turn < turns; ++turn) {
            const int n = reps / turns + (turn < reps % turns ? 1 : 0);
            for (auto [model_of_turn, into] : {std::pair{&model, &m}, std::pair{&dense, &d}}) {
                const auto p = profileLayers(*model_of_turn, T, n);
                if (turn == 0) {
                    *into = p;
                    continue;
                }
                into->reps += p.reps;
                for (std::size_t l = 0; l < p.layer_samples_ms.size(); ++l)
                    into->layer_samples_ms[l].insert(into->layer_samples_ms[l].end(),
                                                     p.layer_samples_ms[l].begin(),
                                                     p.layer_samples_ms[l].end());
                into->forward_samples_ms.insert(into->forward_samples_ms.end(), p.forward_samples_ms.begin(),
                                                p.forward_samples_ms.end());
            }
        }
        for (LayerProfile* p : {&m, &d}) {
            for (std::size_t l = 0; l < p->layer_ms.size(); ++l)
                p->layer_ms[l] = Summary::of(p->layer_samples_ms[l]).median;
            p->forward_ms = Summary::of(p->forward_samples_ms).median;
        }
        // Outside the layers (embedding, final norm): each forward's whole call less its own layers, then the
        // median. The difference of the medians is not that: medians do not add, and at 2,048 tokens it gave
        // MoD 0.85 ms there against the dense twin's 0.18 for the same embedding and norm.
        const auto outsideLayers = [](const LayerProfile& p) {
            std::vector<double> rest = p.forward_samples_ms;
            for (std::size_t i = 0; i < rest.size(); ++i)
                for (const auto& layer : p.layer_samples_ms) rest[i] -= layer[i];
            return Summary::of(std::move(rest)).median;
        };
        const auto after = probeCores();
        const auto cores = before.cell() + " / " + after.cell();
        for (int i = 0; i < cfg.n_layers; ++i) {
            const auto l = static_cast<std::size_t>(i);
            const std::string block =
                m.tokens[l] == T ? "all " + std::to_string(T) : std::to_string(m.tokens[l]) + " (routed)";
            table.addRow({std::to_string(T), std::to_string(i), block, fixed(m.layer_ms[l], 3),
                          fixed(1e3 * m.layer_ms[l] / std::max(m.tokens[l], 1), 2), fixed(d.layer_ms[l], 3),
                          fixed(d.layer_ms[l] / m.layer_ms[l], 2) + "×", ""});
        }
        const double mod_outside = outsideLayers(m), dense_outside = outsideLayers(d);
        table.addRow({std::to_string(T), "embedding, final norm", "", fixed(mod_outside, 3), "",
                      fixed(dense_outside, 3), "", ""});
        table.addRow({std::to_string(T), "whole forward", "", fixed(m.forward_ms, 3), "",
                      fixed(d.forward_ms, 3), fixed(d.forward_ms / m.forward_ms, 2) + "×", cores});
        rows.push_back({{"seq_len", T},
                        {"capacity", m.capacity},
                        {"reps", m.reps},
                        {"tokens", m.tokens},
                        {"mod_layer_ms", m.layer_ms},
                        {"dense_layer_ms", d.layer_ms},
                        {"mod_forward_ms", m.forward_ms},
                        {"dense_forward_ms", d.forward_ms},
                        {"mod_outside_layers_ms", mod_outside},
                        {"dense_outside_layers_ms", dense_outside},
                        {"cores_before", before.toJson()},
                        {"cores_after", after.toJson()}});
    }
    table.addNote(
        "ModTransformerImpl::hidden reads a clock between its layers (profiling.h, profileLayers): top-k "
        "mode without a trace, the final hidden states only (no logits). Medians over 100 forwards at T = "
        "128, 30 at 512, 8 at 2048 (20 and 8 with --quick), taken in four turns of MoD then dense, each turn "
        "after one warm-up forward. A routed layer's time holds its router, top-k, gather, block and gated "
        "scatter; \"µs per token\" divides a layer's time by the tokens its block processed. A layer that "
        "takes longer than its twin's same layer where both process every token shows what the layers before "
        "it left behind (caches, memory, threads). \"Embedding, final norm\": the median over forwards of "
        "each whole call less its layers. " +
        coreVerdictsNote());
    ctx.report().json["layers"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- generation
void benchGeneration(BenchContext& ctx) {
    const Model& model = ctx.model();
    const Model& dense = ctx.denseTwin();
    const auto& cfg = model.config();
    const int prompt_len = std::min(64, cfg.max_seq_len / 2);
    const int new_tokens = std::min(ctx.quick() ? 32 : 128, cfg.max_seq_len - prompt_len);
    // Five with --quick too (32 tokens a call: a tenth of a second in all). With two, one call that met a
    // slow moment moved the median halfway: a quick run once gave 1.26x where runs of this section alone gave
    // 1.37-1.44x.
    const int reps = 5;
    const auto prompt = randomIds(prompt_len, cfg.vocab_size, 3);

    GenerationOptions go;
    go.max_new_tokens = new_tokens;
    go.temperature = 0.0f;  // greedy: every repetition generates the same tokens
    go.eos_id = -1;         // never stops early, so both models generate new_tokens

    Table table("Generation in causal mode (Model::generate, KV cache, greedy, prompt " +
                    std::to_string(prompt_len) + " tokens + " + std::to_string(new_tokens) + " new)",
                {"model", "tokens/s", "p10–p90", "ms/token", "KV cache", "dense KV cache", "KV share"});
    json out = json::object();
    out["prompt_tokens"] = prompt_len;
    out["new_tokens"] = new_tokens;
    const Model* models[2] = {&model, &dense};
    for (const Model* m : models) {
        GenerationOptions warm = go;
        warm.max_new_tokens = std::min(8, new_tokens);
        m->generate(prompt, warm);
    }
    // MoD and dense in turn, every repetition, so load from other processes falls on both alike.
    std::vector<double> tps[2], step_ms[2];
    GenerationResult last[2];
    for (int i = 0; i < reps; ++i)
        for (int w = 0; w < 2; ++w) {
            ctx.progress(std::string("generation ") + (w == 0 ? "MoD" : "dense") + " " +
                         std::to_string(i + 1) + "/" + std::to_string(reps));
            const auto t0 = std::chrono::steady_clock::now();
            last[w] = models[w]->generate(prompt, go);
            const double ms = msSince(t0);
            // Whole call (prompt prefill included) per generated token, as a user waits for it.
            tps[w].push_back(1000.0 * double(last[w].generated_ids.size()) / ms);
            for (const auto& st : last[w].steps) step_ms[w].push_back(st.step_ms);
        }
    double mod_tps = 0, dense_tps = 0;
    for (int w = 0; w < 2; ++w) {
        const bool is_mod = w == 0;
        const auto t = Summary::of(tps[w]);
        const auto s = Summary::of(step_ms[w]);
        const auto& r = last[w];
        (is_mod ? mod_tps : dense_tps) = t.median;
        const double share =
            r.dense_kv_cache_bytes > 0 ? double(r.kv_cache_bytes) / double(r.dense_kv_cache_bytes) : 0.0;
        table.addRow({is_mod ? "MoD (" + cfg.name + ")" : "dense twin", fixed(t.median, 1),
                      spread(t.p10, t.p90, 1), fixed(s.median, 2), thousands(double(r.kv_cache_bytes)) + " B",
                      thousands(double(r.dense_kv_cache_bytes)) + " B", percent(share)});
        out[is_mod ? "mod" : "dense"] = {{"tokens_per_second", t.median},
                                         {"tokens_per_second_summary", t.toJson()},
                                         {"engine_tokens_per_second", r.tokens_per_second},
                                         {"step_ms", s.toJson()},
                                         {"generated", r.generated_ids.size()},
                                         {"kv_cache_bytes", r.kv_cache_bytes},
                                         {"dense_kv_cache_bytes", r.dense_kv_cache_bytes},
                                         {"kv_cache_share", share}};
    }
    // Each repetition's MoD / dense: the two calls ran within milliseconds of each other.
    const auto paired = pairedRatios(tps[0], tps[1]);
    out["speedup"] = paired.median;
    out["speedup_paired"] = paired.toJson();
    out["speedup_of_medians"] = dense_tps > 0 ? mod_tps / dense_tps : 0.0;
    table.addNote(
        "tokens/s = generated tokens / wall time of the whole generate() call (prefill included), median "
        "of " +
        std::to_string(reps) +
        " after one short warm-up; ms/token = median GenerationStep.step_ms. "
        "MoD/dense tokens/s: " +
        fixed(paired.median, 2) +
        "×, the median of each repetition's ratio (MoD and dense run in turn); "
        "the ratio of the medians is in the JSON as speedup_of_medians.");
    ctx.report().json["generation"] = out;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- peak
void benchPeak(BenchContext& ctx) {
    Table mm("Matmul peak (float32, n×n by n×n)",
             {"library", "threads", "n", "best ms", "median ms", "best GFLOP/s", "median GFLOP/s", "runs"});
    json mms = json::array();
    double peak = 0.0;
    for (const auto library : {MatmulLibrary::Engine, MatmulLibrary::OpenBlas}) {
        const std::string name = library == MatmulLibrary::Engine ? "oneDNN sgemm (the engine's)" : "OpenBLAS";
        for (int n : {1024, 2048}) {
            ctx.progress("matmul " + name + " " + std::to_string(n));
            const int reps = n >= 2048 ? (ctx.quick() ? 3 : 8) : (ctx.quick() ? 5 : 20);
            MatmulPeak p;
            try {
                p = measureMatmulPeak(n, reps, library);
            } catch (const Error& e) {  // another BLAS than OpenBLAS: the engine's row stands alone
                mm.addNote(name + " not measured: " + e.what() + ".");
                break;
            }
            peak = std::max(peak, p.best_gflops);
            mm.addRow({name, std::to_string(p.threads), std::to_string(n), fixed(p.best_ms, 2), fixed(p.median_ms, 2),
                       fixed(p.best_gflops, 1), fixed(p.median_gflops, 1), std::to_string(p.reps)});
            mms.push_back({{"library", library == MatmulLibrary::Engine ? "onednn" : "openblas"},
                           {"threads", p.threads},
                           {"n", n},
                           {"best_ms", p.best_ms},
                           {"median_ms", p.median_ms},
                           {"best_gflops", p.best_gflops},
                           {"median_gflops", p.median_gflops},
                           {"reps", p.reps}});
        }
    }
    mm.addNote("Peak = the best of all runs of either library (one warm-up call each). 2·n³ FLOPs per product. "
               "OpenBLAS gets every core for its rows only; the tools leave it one thread (docs/CPU_BACKEND.md).");
    ctx.report().json["matmul"] = mms;
    ctx.report().json["matmul_peak_gflops"] = peak;
    ctx.report().add(mm);

    // The engine's achieved rate: the forward section's medians when it ran, else measured here.
    const Model& model = ctx.model();
    const auto& cfg = model.config();
    std::vector<std::pair<int, std::pair<double, double>>> runs;  // T -> (flops, median ms)
    const auto& fwd = ctx.report().json.find("forward");
    if (fwd != ctx.report().json.end()) {
        for (const auto& r : *fwd)
            runs.push_back(
                {r["seq_len"].get<int>(), {r["flops"].get<double>(), r["ms"]["median"].get<double>()}});
    } else {
        for (int T : fitting({512, 2048}, cfg.max_seq_len)) {
            ctx.progress("engine forward T=" + std::to_string(T));
            const auto r = timeRun(ctx, model, randomIds(T, cfg.vocab_size), {});
            runs.push_back({T, {r.trace.flops, r.ms.median}});
        }
    }
    Table eng("Engine GFLOP/s (" + cfg.name + ", Model::run top-k) against the matmul peak",
              {"T", "GFLOP", "median ms", "GFLOP/s", "of peak"});
    json by_t = json::array();
    double engine = 0.0;
    for (const auto& [T, fm] : runs) {
        const double g = fm.first / (fm.second * 1e6);
        engine = g;  // the longest length measured: the matmuls are largest there
        eng.addRow({std::to_string(T), fixed(fm.first / 1e9, 3), fixed(fm.second, 2), fixed(g, 1),
                    percent(g / peak)});
        by_t.push_back({{"seq_len", T},
                        {"flops", fm.first},
                        {"ms", fm.second},
                        {"gflops", g},
                        {"fraction_of_peak", g / peak}});
    }
    eng.addNote(
        "GFLOP/s = RunTrace.flops (matmul FLOPs, docs/MODEL.md) / median wall time of Model::run. "
        "engine_gflops in the JSON is the longest T's.");
    ctx.report().json["engine_gflops"] = engine;
    ctx.report().json["engine_fraction_of_peak"] = peak > 0 ? engine / peak : 0.0;
    ctx.report().json["engine_gflops_by_seq_len"] = by_t;
    ctx.report().add(eng);
}

// ---------------------------------------------------------------------------------------------- routing
void benchRouting(BenchContext& ctx) {
    const Model& model = ctx.model();
    const auto& cfg = model.config();
    if (cfg.routed_layers.empty()) {
        ctx.progress("routing: the model has no routed layer; skipped");
        ctx.report().json["routing_cost"] = json::array();
        return;
    }
    Table table("Cost of routing in one routed layer (layer " +
                    std::to_string(*std::min_element(cfg.routed_layers.begin(), cfg.routed_layers.end())) +
                    ", top-k, capacity " + fixed(cfg.capacity, 3) + "; medians in ms)",
                {"T", "k", "router", "top-k", "predictor", "causal select", "gather", "gated scatter",
                 "block", "layer", "routing share", "top-k mode", "causal mode"});
    json rows = json::array();
    const auto lengths = ctx.quick() ? std::vector<int>{128, 512} : std::vector<int>{128, 512, 2048};
    for (int T : fitting(lengths, cfg.max_seq_len)) {
        ctx.progress("routing T=" + std::to_string(T));
        const int reps = ctx.quick() ? 15 : (T >= 2048 ? 30 : 100);
        const auto p = profileRoutedLayer(model, T, reps);
        table.addRow({std::to_string(T), std::to_string(p.k), fixed(p.router_ms, 3), fixed(p.topk_ms, 3),
                      fixed(p.predictor_ms, 3), fixed(p.causal_select_ms, 3), fixed(p.gather_ms, 3),
                      fixed(p.scatter_ms, 3), fixed(p.block_ms, 3), fixed(p.layer_ms, 3),
                      percent(p.routingShare()), percent(p.topkModeShare()), percent(p.causalModeShare())});
        rows.push_back({{"seq_len", T},
                        {"layer", p.layer},
                        {"k", p.k},
                        {"reps", p.reps},
                        {"router_ms", p.router_ms},
                        {"topk_ms", p.topk_ms},
                        {"predictor_ms", p.predictor_ms},
                        {"causal_select_ms", p.causal_select_ms},
                        {"gather_ms", p.gather_ms},
                        {"scatter_ms", p.scatter_ms},
                        {"block_ms", p.block_ms},
                        {"layer_ms", p.layer_ms},
                        {"layer_spread_ms", {p.layer_p10_ms, p.layer_p90_ms}},
                        {"routing_ms", p.routingMs()},
                        {"routing_share", p.routingShare()},
                        {"topk_mode_share", p.topkModeShare()},
                        {"causal_mode_share", p.causalModeShare()}});
    }
    table.addNote(
        "The layer's stages run as the forward runs them, one after another on the model's own modules and "
        "on the layer's real input (profiling.h, profileRoutedLayer), with a clock read between stages; "
        "causal select runs after the router on a fresh copy of the input. Medians over 100 repetitions (30 "
        "at T = 2048, 15 with --quick) after one warm-up; \"layer\" is the top-k pass's total. Share = "
        "(router + top-k + predictor + gather + scatter) / layer, as Model::run does it for a trace; \"gated "
        "scatter\" adds sigmoid(r) * block output into x's selected rows in place (update and write-back in "
        "one pass, counted as routing). \"top-k mode\" is (router + top-k + gather + scatter) / (those + "
        "block): a top-k forward without a trace, which needs no predictor; \"causal mode\" is (router + "
        "causal select + gather + scatter) / (those + block): causal routing as generation and causal runs "
        "do it, where \"causal select\" is the rule's walk with the predictor read only for the tokens the "
        "prefix top-k lets through (the whole row when the model's rule has no prefix top-k).");
    ctx.report().json["routing_cost"] = rows;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- training
namespace {

// A temporary folder removed when the benchmark leaves the section, also on an exception.
struct TempDir {
    fs::path path;
    TempDir() {
        std::string tmpl = (fs::temp_directory_path() / "modscope-bench-XXXXXX").string();
        if (!mkdtemp(tmpl.data()))
            throw Error("cannot create a temporary folder in " + fs::temp_directory_path().string());
        path = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

}  // namespace

void benchTraining(BenchContext& ctx) {
    const std::string tokenizer = (fs::path(ctx.modelDirectory()) / "tokenizer.model").string();
    const ModelConfig base = ctx.model().config();
    const int warmup = ctx.quick() ? 1 : 3;
    const int measured = ctx.quick() ? 2 : 10;
    TempDir tmp;
    std::string source;
    const auto corpus_path = tmp.path / "corpus.txt";
    {
        std::ofstream out(corpus_path, std::ios::binary);
        out << corpusText(ctx.quick() ? 120000 : 400000, &source);
    }
    Table table(
        "Training throughput (Trainer, batch 16 × 256 = 4,096 tokens per step, " + base.name + " shape)",
        {"model", "tokens/s", "p10–p90", "step ms", "GFLOP/s", "trainer's tokens/s"});
    json out = json::object();
    double mod_tps = 0, dense_tps = 0;
    for (bool dense : {false, true}) {
        ctx.progress(std::string("training ") + (dense ? "dense" : "MoD"));
        TrainOptions o;
        o.corpus_files = {corpus_path.string()};
        o.out_dir = (tmp.path / (dense ? "dense" : "mod")).string();
        o.tokenizer_model = tokenizer;
        o.config = base;
        o.config.max_seq_len = 256;  // the rotary table need not reach the bundled model's 2,048
        o.dense = dense;
        o.steps = warmup + measured + 1000;  // stopped from the callback after warmup + measured
        o.seq_lens = {256};
        o.batch_tokens = 4096;
        o.eval_every = 0;
        o.eval_windows = 2;
        o.checkpoint_every = 0;
        o.calibrate_threshold = false;
        o.device = "cpu";
        std::atomic<bool> stop{false};
        std::vector<double> step_ms;
        double trainer_tps = 0;
        std::int64_t last_step = 0;
        auto last_time = std::chrono::steady_clock::now();
        Trainer trainer(o);
        trainer.run(
            [&](const TrainProgress& p) {
                // Only the per-step callbacks (no message) count; the time between two is one step.
                if (!p.message.empty() || p.step == last_step) return;
                const auto now = std::chrono::steady_clock::now();
                if (p.step == last_step + 1 && last_step >= warmup)
                    step_ms.push_back(std::chrono::duration<double, std::milli>(now - last_time).count());
                last_time = now;
                last_step = p.step;
                trainer_tps = p.tokens_per_second;
                if (p.step >= warmup + measured) stop = true;
            },
            &stop);
        const auto s = Summary::of(step_ms);
        const double tps = 4096.0 * 1000.0 / s.median;
        const double flops = trainStepFlops(dense ? [&] { auto c = o.config; c.routed_layers.clear(); return c; }() : o.config, 256, 4096);
        (dense ? dense_tps : mod_tps) = tps;
        table.addRow({dense ? "dense" : "MoD", thousands(tps),
                      thousands(4096.0 * 1000.0 / s.p90) + "–" + thousands(4096.0 * 1000.0 / s.p10),
                      fixed(s.median, 1), fixed(flops / (s.median * 1e6), 1), thousands(trainer_tps)});
        out[dense ? "dense" : "mod"] = {{"tokens_per_second", tps},
                                        {"step_ms", s.toJson()},
                                        {"train_step_flops", flops},
                                        {"gflops", flops / (s.median * 1e6)},
                                        {"trainer_tokens_per_second", trainer_tps}};
    }
    out["batch"] = 16;
    out["seq_len"] = 256;
    out["warmup_steps"] = warmup;
    out["measured_steps"] = measured;
    out["corpus"] = source;
    out["speedup"] = dense_tps > 0 ? mod_tps / dense_tps : 0.0;
    table.addNote("Public Trainer API, bundled tokenizer, corpus from " + source + "; " +
                  std::to_string(warmup) + " warm-up steps excluded, then the median of " +
                  std::to_string(measured) + " step times (between progress callbacks). MoD/dense: " +
                  fixed(mod_tps / std::max(1e-9, dense_tps), 2) +
                  "×. GFLOP/s from trainStepFlops (3× forward).");
    ctx.report().json["training"] = out;
    ctx.report().add(table);
}

// ---------------------------------------------------------------------------------------------- reference
void benchReference(BenchContext& ctx) {
    ModelConfig cfg;
    cfg.name = "reference";
    cfg.vocab_size = 2048;
    cfg.d_model = 192;
    cfg.n_layers = 6;
    cfg.n_heads = 3;
    cfg.d_ff = 512;
    cfg.max_seq_len = 2048;
    cfg.capacity = 0.125;
    cfg.routed_layers = {1, 3, 5};
    ModelConfig dense_cfg = cfg;
    dense_cfg.name = "reference-dense";
    dense_cfg.routed_layers.clear();
    const auto mod = Model::create(cfg, 1234, "cpu");
    const auto dense = Model::create(dense_cfg, 1234, "cpu");

    const std::map<int, double> targets{{128, 4.0}, {512, 25.0}, {2048, 250.0}};
    Table table(
        "Reference shape (6 × d192, 3 heads, SwiGLU 512, V 2048, capacity 0.125 on layers 1/3/5, random "
        "weights, batch 1, logits for all positions)",
        {"T", "MoD ms", "p10–p90", "target", "met", "dense ms", "speed-up", "ideal", "MoD ms after a switch",
         "speed-up after a switch", "cores before / after"});
    json fwd = json::object(), rows = json::array();
    for (const auto& [T, target] : targets) {
        ctx.progress("reference T=" + std::to_string(T));
        const auto ids = randomIds(T, cfg.vocab_size, 4);
        RunOptions ro;
        ro.logits = RunOptions::Logits::All;
        ro.per_token_routing = false;
        RunTrace mod_trace, dense_trace;
        const auto before = probeCores();
        // MoD and dense in turn, every repetition, each twice in a row (timeInTurns).
        const auto ms = timeInTurns(
            warmupFor(ctx, T), repsFor(ctx, T),
            {[&] { mod_trace = mod->run(ids, ro); }, [&] { dense_trace = dense->run(ids, ro); }});
        const auto after = probeCores();
        const Summary &m = ms[0].steady, &d = ms[1].steady;
        const auto paired = pairedRatios(ms[1].steady_ms, ms[0].steady_ms);
        const double speedup = paired.median, ideal = mod_trace.dense_flops / mod_trace.flops;
        const double switched = pairedRatios(ms[1].first_ms, ms[0].first_ms).median;
        table.addRow({std::to_string(T), fixed(m.median, 2), spreadCell(m, 2), "≤ " + fixed(target, 0),
                      m.median <= target ? "yes" : "no", fixed(d.median, 2), fixed(speedup, 2) + "×",
                      fixed(ideal, 2) + "×", fixed(ms[0].first.median, 2), fixed(switched, 2) + "×",
                      before.cell() + " / " + after.cell()});
        fwd[std::to_string(T)] = m.median;
        rows.push_back({{"seq_len", T},
                        {"mod_ms", m.median},
                        {"mod", m.toJson()},
                        {"dense_ms", d.median},
                        {"dense", d.toJson()},
                        {"target_ms", target},
                        {"meets_target", m.median <= target},
                        {"speedup", speedup},
                        {"speedup_paired", paired.toJson()},
                        {"speedup_of_medians", d.median / m.median},
                        {"ideal_speedup", ideal},
                        {"mod_after_switch", ms[0].first.toJson()},
                        {"dense_after_switch", ms[1].first.toJson()},
                        {"speedup_after_switch", switched},
                        {"flops", mod_trace.flops},
                        {"dense_flops", mod_trace.dense_flops},
                        {"cores_before", before.toJson()},
                        {"cores_after", after.toJson()}});
    }
    table.addNote(
        "Model::run in top-k mode with RunOptions::Logits::All and per_token_routing off: the forward alone, "
        "as a PyTorch forward is timed (bench/pytorch_reference_forward.py times one of the same shape). "
        "Dense: the same config with routed_layers cleared. MoD and dense in turn, each twice in a row: the "
        "times are the second runs; \"after a switch\", the first, right after the other model ran. "
        "Speed-ups are the median of each repetition's dense / MoD ratio. " +
        pairedNote() + " " + coreVerdictsNote());
    ctx.report().json["reference_forward_ms"] = fwd;
    ctx.report().json["reference"] = rows;
    ctx.report().add(table);
}

}  // namespace modscope::bench
