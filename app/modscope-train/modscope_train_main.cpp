// modscope-train: trains a MoD (or dense) model into a checkpoint directory, resumably, and evaluates the
// causal predictor of a trained model by prompt length.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

#include "modscope/engine.h"
#include "modscope/trainer.h"
#include "tool_command_line.h"

namespace {

std::atomic<bool> g_stop{false};

void onSigint(int) {
    if (g_stop.exchange(true)) std::_Exit(130);  // a second Ctrl-C does not wait for the checkpoint
    const char msg[] = "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit now)\n";
    (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
}

const char* kAbout = R"(Trains a Mixture-of-Depths model, evaluates one, or tunes its causal mode.

usage:
  modscope-train --out DIR --corpus FILE [--corpus FILE ...] [options]
  modscope-train --evaluate DIR --corpus FILE [...] [--lengths 16,32,64,128,256] [--windows N]
  modscope-train --calibrate-causal DIR --corpus FILE [...] [--gains G1,G2,...] [--lengths ...] [--windows N]

Training writes DIR: config.json, weights.pt, tokenizer.model, train_log.jsonl and train_state.pt (for
--resume); with --dense it trains the dense baseline of the same shape. The last --val-fraction of every
corpus file is held out for validation and never trained on. Interrupt with Ctrl-C: the current step
finishes, a checkpoint is written, and --resume continues it.
)";

const char* kNotes = R"(
Exit status: 0 done, 1 failed, 2 bad arguments, 130 interrupted (a checkpoint was saved).
)";

std::string clock(double seconds) {
    if (!(seconds >= 0) || seconds > 1e7) return "--:--";
    const long s = static_cast<long>(seconds + 0.5);
    char buf[32];
    if (s >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
    else std::snprintf(buf, sizeof buf, "%02ld:%02ld", s / 60, s % 60);
    return buf;
}

void printEval(const modscope::EvalResult& e, const char* indent) {
    std::fprintf(stderr, "%svalidation @%d tokens: loss %.4f, perplexity %.2f\n", indent, e.seq_len, e.loss,
                 e.perplexity);
    for (const auto& l : e.layers) {
        const auto& a = l.agreement;
        std::fprintf(stderr,
                     "%s  layer %d predictor vs top-k: accuracy %.2f%%  balanced %.3f  precision %.3f  recall %.3f\n",
                     indent, l.layer, 100 * a.accuracy(), a.balancedAccuracy(), a.precision(), a.recall());
    }
}

int evaluateCommand(const std::string& dir, const std::vector<std::string>& corpus, const std::vector<int>& lengths,
                    int windows, double val_fraction, const std::string& device) {
    auto model = modscope::Model::open(dir, device);
    const auto c = modscope::Corpus::fromFiles(corpus, val_fraction);
    const auto val_ids = model->tokenizer()->encodeIds(c.val_text);
    std::printf("held-out tokens: %zu; model %s, capacity %.3f, routed layers", val_ids.size(),
                model->config().name.c_str(), model->config().capacity);
    for (int l : model->config().routed_layers) std::printf(" %d", l);
    if (!model->config().moe_layers.empty()) {
        std::printf(", mixture layers");
        for (int l : model->config().moe_layers) std::printf(" %d", l);
        std::printf(" (%d experts, %d no-op choices, capacity factor %g)", model->config().n_experts,
                    model->config().noop_experts, model->config().expert_capacity_factor);
    }
    std::vector<std::pair<int, double>> jaccard;
    std::vector<std::pair<int, modscope::MixtureEval>> mixtures;
    std::printf("\n\n%6s %8s %7s | %5s %9s %9s %9s %9s %13s\n", "tokens", "loss", "ppl", "layer", "accuracy",
                "balanced", "precision", "recall", "count-forced");
    for (int T : lengths) {
        if (T > model->config().max_seq_len) continue;
        const auto e = modscope::evaluate(*model, val_ids, T, std::max(windows, 4096 / T));
        for (std::size_t i = 0; i < e.layers.size(); ++i) {
            const auto& a = e.layers[i].agreement;
            if (i == 0) std::printf("%6d %8.4f %7.2f |", T, e.loss, e.perplexity);
            else std::printf("%6s %8s %7s |", "", "", "");
            std::printf(" %5d %8.2f%% %9.3f %9.3f %9.3f %12.0f%%\n", e.layers[i].layer, 100 * a.accuracy(),
                        a.balancedAccuracy(), a.precision(), a.recall(), 100 * e.layers[i].countForcedShare());
        }
        if (e.layers.empty()) std::printf("%6d %8.4f %7.2f |\n", T, e.loss, e.perplexity);
        if (std::isfinite(e.routed_jaccard)) jaccard.emplace_back(T, e.routed_jaccard);
        for (const auto& m : e.mixtures) mixtures.emplace_back(T, m);
    }
    if (!jaccard.empty()) {
        std::printf("\noverlap of the routed layers' top-k selections (mean pairwise Jaccard over windows):");
        for (const auto& [T, j] : jaccard) std::printf("  %d tokens %.3f", T, j);
        std::printf("\n");
    }
    if (!mixtures.empty()) {
        std::printf("\nmixture layers: share of the tokens reaching each that an expert ran, chose a no-op, or "
                    "overflowed; expert loads\n%6s %5s %8s %8s %9s  %s\n", "tokens", "layer", "ran", "no-op",
                    "overflow", "load per expert");
        for (const auto& [T, m] : mixtures) {
            const double n = std::max<double>(1, m.tokens);
            std::printf("%6d %5d %7.1f%% %7.1f%% %8.1f%% ", T, m.layer, 100 * m.ran / n, 100 * m.noop / n,
                        100 * m.overflow / n);
            for (auto l : m.load) std::printf(" %5.1f%%", 100 * l / n);
            std::printf("\n");
        }
    }
    std::printf("\ncount-forced: share of the disagreements that the number of tokens the predictor selects in a\n"
                "window forces on its own (|selected - k| per window), however well it chooses among them.\n");
    return 0;
}

int calibrateCausalCommand(const std::string& dir, const std::vector<std::string>& corpus,
                           const std::vector<int>& lengths, const std::vector<double>& gains, int windows,
                           double val_fraction, const std::string& device) {
    const auto c = modscope::calibrateCausalRule(dir, corpus, val_fraction, lengths, gains, windows, device);
    std::printf("causal mode's rule, on %zu training-split tokens: lowest agreement with top-k over the routed\n"
                "layers, by window length\n\n%6s %10s", c.training_tokens, "gain", "prefix-topk");
    for (int T : c.lengths) std::printf(" %8d", T);
    std::printf(" %8s\n", "worst");
    for (const auto& trial : c.trials) {
        std::printf("%6.2f %10s", trial.gain, trial.prefix_topk ? "yes" : "no");
        for (double a : trial.worst_accuracy) std::printf(" %7.2f%%", 100 * a);
        std::printf(" %7.2f%%%s\n", 100 * trial.worst(), &trial == c.chosen ? "  <- chosen" : "");
    }
    std::printf("\nwrote predictor_budget_gain %.2f, predictor_prefix_topk %s into %s/config.json\n",
                c.chosen->gain, c.chosen->prefix_topk ? "true" : "false", dir.c_str());
    return 0;
}

// Copies a trained model into a bundle directory: config, tokenizer, weights (float16 with half), its
// evaluation and causal rule, and its training log thinned to every 10th step and every validation. With
// half, the held-out loss of both is compared at every length; a change of 0.001 nats or more fails.
int exportCommand(const std::string& src, const std::string& dst, bool half, const std::vector<std::string>& corpus,
                  const std::vector<int>& lengths, int windows, double val_fraction, const std::string& device) {
    namespace fs = std::filesystem;
    auto model = modscope::Model::open(src, device);
    model->save(dst, half);
    for (const char* name : {"evaluation.txt", "causal_rule.txt"})
        if (fs::exists(fs::path(src) / name))
            fs::copy_file(fs::path(src) / name, fs::path(dst) / name, fs::copy_options::overwrite_existing);
    if (std::ifstream log(fs::path(src) / "train_log.jsonl"); log) {
        std::ostringstream kept;
        std::string line;
        while (std::getline(log, line)) {
            long step = 0;
            if (std::sscanf(line.c_str(), "{\"step\":%ld", &step) != 1) continue;
            if (step % 10 == 0 || step == 1 || line.find("\"validation\"") != std::string::npos) kept << line << "\n";
        }
        modscope::writeFileAtomic((fs::path(dst) / "train_log.jsonl").string(), kept.str());
    }
    std::printf("wrote %s (weights as %s)\n", dst.c_str(), half ? "float16" : "float32");
    if (!half || corpus.empty()) return 0;
    auto copy = modscope::Model::open(dst, device);
    const auto c = modscope::Corpus::fromFiles(corpus, val_fraction);
    const auto val_ids = model->tokenizer()->encodeIds(c.val_text);
    std::printf("%6s %10s %10s %10s\n", "tokens", "float32", "float16", "change");
    double worst = 0.0;
    for (int T : lengths) {
        if (T > model->config().max_seq_len) continue;
        const int n = std::max(windows, 4096 / T);
        const double a = modscope::evaluate(*model, val_ids, T, n).loss, b = modscope::evaluate(*copy, val_ids, T, n).loss;
        std::printf("%6d %10.5f %10.5f %+10.5f\n", T, a, b, b - a);
        worst = std::max(worst, std::abs(b - a));
    }
    if (worst >= 0.001) {
        std::fprintf(stderr, "modscope-train: float16 weights move the held-out loss by %.5f nats (0.001 allowed)\n",
                     worst);
        return 1;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    // First, before any other thread starts: the engine changes process-wide state only when asked (modscope/engine.h).
    modscope::configureRuntime(modscope::RuntimeOptions::forTools());
    using modscope::Error;
    modscope::TrainOptions opt;
    opt.config.name = "modscope";
    std::string evaluate_dir, calibrate_dir;
    std::vector<double> gains{0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3};
    std::vector<int> lengths{16, 32, 64, 128, 256};
    int windows = 64;
    modscope::cli::ToolCommandLine cli("modscope-train", kAbout, kNotes);
    constexpr std::int64_t kMany = std::numeric_limits<int>::max();
    constexpr int kMaxLength = 1 << 16;  // the longest context a config.json may give (ModelConfig's bound)
    cli.group("Training");
    cli.text("--out", opt.out_dir, "DIR", "the model directory to write");
    cli.texts("--corpus", opt.corpus_files, "FILE", "UTF-8 training text; repeat for several files");
    cli.text("--tokenizer", opt.tokenizer_model, "FILE",
             "use this SentencePiece model (default: train one on the training split)");
    cli.flag("--dense", opt.dense, "no routed layers, capacity 1 (the dense baseline)");
    cli.integer("--steps", opt.steps, 1, std::int64_t(1) << 40, "optimiser steps (default 2000)");
    cli.number("--flops-budget", opt.flops_budget, 0.0, 1e30,
               "train for this many FLOPs instead of --steps (3x forward FLOPs per step)");
    cli.integerList("--seq-lens", opt.seq_lens, 1, kMaxLength, "L1,L2,...",
                    "window lengths, one drawn per step (default 256)");
    cli.integer("--batch-tokens", opt.batch_tokens, 1, kMany, "tokens per step (default 4096; batch = N / length)");
    cli.number("--lr", opt.lr, 0.0, 10.0, "peak learning rate (default 0.003)");
    cli.integer("--warmup", opt.warmup_steps, 0, std::int64_t(1) << 40, "warm-up steps (default 100)");
    cli.number("--min-lr-ratio", opt.min_lr_ratio, 0.0, 1.0, "the cosine decays to lr times this (default 0.1)");
    cli.number("--weight-decay", opt.weight_decay, 0.0, 10.0, "AdamW weight decay (default 0.1)");
    cli.number("--grad-clip", opt.grad_clip, 0.0, 1e9, "gradient norm clip, 0 = none (default 1)");
    cli.number("--predictor-weight", opt.predictor_loss_weight, 0.0, 1e6,
               "weight of the predictor's BCE loss (default 1)");
    cli.number("--router-aux-weight", opt.router_aux_loss_weight, 0.0, 1e6,
               "weight of a BCE loss on the router logits themselves (default 0)");
    bool no_calibrate = false;
    cli.flag("--no-calibrate", no_calibrate,
             "keep the predictor's raw 0.5 threshold instead of matching the capacity");
    cli.unsignedInteger("--seed", opt.seed, "seed of the initialisation and the windows (default 1234)");
    cli.number("--val-fraction", opt.val_fraction, 0.0, 0.5, "held-out share of every corpus file (default 0.02)");
    cli.integer("--eval-every", opt.eval_every, 0, kMany, "validate every N steps, 0 = never (default 250)");
    cli.integer("--eval-windows", opt.eval_windows, 1, kMany, "windows per validation (default 48)");
    cli.integer("--checkpoint-every", opt.checkpoint_every, 0, kMany,
                "write a resumable checkpoint every N steps, 0 = at the end only (default 250)");
    cli.flag("--resume", opt.resume, "continue the run in DIR from train_state.pt");
    cli.text("--device", opt.device, "D", "auto, cpu or cuda (default auto)");
    cli.group("Evaluation and tuning of a trained model");
    cli.text("--evaluate", evaluate_dir, "DIR", "held-out loss and causal-vs-top-k agreement by window length");
    cli.text("--calibrate-causal", calibrate_dir, "DIR",
             "choose causal mode's rule (docs/MODEL.md: budget gain, prefix top-k) on training-split windows: "
             "the one with the best worst-case agreement over routed layers and --lengths is written into "
             "DIR/config.json");
    cli.numberList("--gains", gains, 0.0, 100.0, "G1,G2,...",
                   "budget gains to try, each with and without the prefix top-k (default "
                   "0,0.25,0.5,0.75,1,1.25,1.5,2,3)");
    cli.integerList("--lengths", lengths, 1, kMaxLength, "L1,L2,...",
                    "window lengths (default 16,32,64,128,256)");
    cli.integer("--windows", windows, 1, kMany, "windows per length (default 64)");
    std::string export_dir;
    bool half = false;
    cli.text("--export", export_dir, "DIR",
             "copy the trained model in DIR to --out for bundling: config, tokenizer, weights, evaluation, causal "
             "rule, and the training log at every 10th step and every validation");
    cli.flag("--half", half,
             "with --export: weights as float16, checked against the float32 held-out loss at --lengths (a "
             "change of 0.001 nats or more fails)");
    cli.group("Model shape (defaults: the bundled model's)");
    cli.text("--name", opt.config.name, "NAME", "the model's name in config.json (default modscope)");
    cli.integer("--vocab", opt.config.vocab_size, 2, 1 << 20, "vocabulary size of a tokenizer trained here");
    cli.integer("--d-model", opt.config.d_model, 1, 16384, "width of the residual stream");
    cli.integer("--layers", opt.config.n_layers, 1, 512, "layers");
    cli.integer("--heads", opt.config.n_heads, 1, 256, "attention heads");
    cli.integer("--d-ff", opt.config.d_ff, 1, 1 << 17, "hidden width of the SwiGLU MLP");
    cli.integer("--max-seq-len", opt.config.max_seq_len, 1, kMaxLength, "context length");
    cli.number("--capacity", opt.config.capacity, 0.0, 1.0, "fraction of tokens a routed layer processes");
    auto* routed = cli.integerList("--routed", opt.config.routed_layers, 0, 511, "L1,L2,...",
                                   "the routed layers (default every other layer)");
    cli.integer("--predictor-hidden", opt.config.predictor_hidden, 1, 1 << 14, "hidden width of the causal predictor");
    cli.integerList("--moe", opt.config.moe_layers, 0, 511, "L1,L2,...",
                    "layers whose MLP is a mixture of experts (default none; docs/MODEL.md)");
    cli.integer("--experts", opt.config.n_experts, 1, 256, "experts of a mixture layer, each a full SwiGLU MLP");
    cli.integer("--noop-experts", opt.config.noop_experts, 0, 256,
                "router choices that skip the MLP (integrated MoDE; default 0)");
    cli.number("--expert-capacity", opt.config.expert_capacity_factor, 0.01, 1024.0,
               "capacity factor: an expert takes at most factor x tokens / experts (default 1.25)");
    cli.number("--balance-weight", opt.balance_loss_weight, 0.0, 1e6,
               "weight of the mixtures' load-balancing loss (default 0.01)");
    if (const auto status = cli.parse(argc, argv)) return *status;
    opt.calibrate_threshold = !no_calibrate;
    const bool routed_given = routed->count() > 0;
    try {
        if (!routed_given) opt.config.routed_layers = modscope::ModelConfig::everyOtherLayer(opt.config.n_layers);
        if (opt.config.moe_layers.empty() && (opt.config.n_experts > 0 || opt.config.noop_experts > 0))
            return cli.usageError("--experts and --noop-experts need --moe (the mixture layers)");
        if (!opt.config.moe_layers.empty() && opt.config.n_experts == 0)
            return cli.usageError("--moe needs --experts");
        if (opt.corpus_files.empty())
            return cli.usageError("no --corpus given (scripts/make_default_corpus.sh makes one)");
        if (!evaluate_dir.empty())
            return evaluateCommand(evaluate_dir, opt.corpus_files, lengths, windows, opt.val_fraction, opt.device);
        if (!export_dir.empty()) {
            if (opt.out_dir.empty()) return cli.usageError("--export needs --out");
            return exportCommand(export_dir, opt.out_dir, half, opt.corpus_files, lengths, windows, opt.val_fraction,
                                 opt.device);
        }
        if (!calibrate_dir.empty())
            return calibrateCausalCommand(calibrate_dir, opt.corpus_files, lengths, gains, windows,
                                          opt.val_fraction, opt.device);
        if (opt.out_dir.empty()) return cli.usageError("no --out directory given");

        std::signal(SIGINT, onSigint);
        std::signal(SIGTERM, onSigint);
        const bool tty = isatty(STDERR_FILENO);
        double last_print = -1e9;
        bool line_open = false;
        const auto closeLine = [&] {
            if (line_open) std::fputc('\n', stderr);
            line_open = false;
        };
        modscope::Trainer trainer(opt);
        const auto final_progress = trainer.run(
            [&](const modscope::TrainProgress& p) {
                if (p.step == 0) {
                    closeLine();
                    std::fprintf(stderr, "%s\n", p.message.c_str());
                    return;
                }
                // One updating line on a terminal; a line every 15 s in a log.
                const bool event = !p.message.empty();
                if (!event && (tty || p.elapsed_seconds - last_print >= 15.0 || p.step == p.total_steps || p.has_eval)) {
                    std::fprintf(stderr, "%sstep %lld/%lld  loss %.4f  pred %.3f  lr %.2e  %.1fk tok/s  %s elapsed, ETA %s%s",
                                 tty ? "\r\033[K" : "", static_cast<long long>(p.step),
                                 static_cast<long long>(p.total_steps), p.loss, p.predictor_loss, p.lr,
                                 p.tokens_per_second / 1000.0, clock(p.elapsed_seconds).c_str(),
                                 clock(p.eta_seconds).c_str(), tty ? "" : "\n");
                    std::fflush(stderr);
                    line_open = tty;
                    last_print = p.elapsed_seconds;
                }
                if (p.has_eval) {
                    closeLine();
                    printEval(p.eval, "  ");
                }
                if (event) {
                    closeLine();
                    std::fprintf(stderr, "  %s\n", p.message.c_str());
                }
            },
            &g_stop);
        closeLine();
        std::fprintf(stderr, "model written to %s (%.3g training FLOPs)\n", opt.out_dir.c_str(),
                     final_progress.train_flops);
        return g_stop ? 130 : 0;
    } catch (const std::exception& e) {
        return cli.fail(e.what());
    }
}
