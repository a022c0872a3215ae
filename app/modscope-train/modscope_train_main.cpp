// modscope-train: trains a MoD (or dense) model into a checkpoint directory, resumably, and evaluates the
// causal predictor of a trained model by prompt length.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "modscope/engine.h"
#include "modscope/trainer.h"

namespace {

std::atomic<bool> g_stop{false};

void onSigint(int) {
    if (g_stop.exchange(true)) std::_Exit(130);  // a second Ctrl-C does not wait for the checkpoint
    const char msg[] = "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit now)\n";
    (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
}

const char* kUsage = R"(usage:
  modscope-train --out DIR --corpus FILE [--corpus FILE ...] [options]
  modscope-train --evaluate DIR --corpus FILE [...] [--lengths 16,32,64,128,256] [--windows N]
  modscope-train --calibrate-causal DIR --corpus FILE [...] [--gains G1,G2,...] [--lengths ...] [--windows N]

Trains a Mixture-of-Depths model (or with --dense the dense baseline of the same shape) into DIR:
config.json, weights.pt, tokenizer.model, train_log.jsonl and train_state.pt (for --resume).
The last --val-fraction of every corpus file is held out for validation and never trained on.
Interrupt with Ctrl-C: the current step finishes, a checkpoint is written, and --resume continues it.

training:
  --tokenizer FILE        use this SentencePiece model (default: train one on the training split)
  --dense                 no routed layers, capacity 1 (the dense baseline)
  --steps N               optimiser steps (default 2000)
  --flops-budget F        train for this many FLOPs instead of --steps (3x forward FLOPs per step)
  --seq-lens L1,L2,...    window lengths, one drawn per step (default 256)
  --batch-tokens N        tokens per step (default 4096; batch = N / length)
  --lr F --warmup N --min-lr-ratio F --weight-decay F --grad-clip F
  --predictor-weight F    weight of the predictor's BCE loss (default 1)
  --router-aux-weight F   weight of a BCE loss on the router logits themselves (default 0)
  --no-calibrate          keep the predictor's raw 0.5 threshold instead of matching the capacity
  --seed N --val-fraction F --eval-every N --eval-windows N --checkpoint-every N
  --resume                continue the run in DIR from train_state.pt
  --device auto|cpu|cuda
evaluation and tuning of a trained model in DIR:
  --evaluate DIR          held-out loss and causal-vs-top-k agreement by window length
  --calibrate-causal DIR  choose causal mode's rule (docs/MODEL.md: budget gain, prefix top-k) on
                          training-split windows: the one with the best worst-case agreement over routed
                          layers and --lengths is written into DIR/config.json (--gains: the budget gains
                          to try, each with and without the prefix top-k; default 0,0.25,0.5,0.75,1,1.25,
                          1.5,2,3)
model shape (defaults: the bundled model's):
  --vocab N --d-model N --layers N --heads N --d-ff N --max-seq-len N
  --capacity F --routed L1,L2,... (default every other layer) --predictor-hidden N
)";

// A comma-separated list, empty parts skipped; every part must convert whole, else Error("not <what>: ...").
template <typename T, typename Convert>
std::vector<T> parseList(const std::string& text, const char* what, Convert convert) {
    std::vector<T> out;
    std::stringstream in(text);
    std::string part;
    while (std::getline(in, part, ',')) {
        if (part.empty()) continue;
        std::size_t used = 0;
        T v{};
        try {
            v = convert(part, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used == 0 || used != part.size()) throw modscope::Error(std::string("not ") + what + ": '" + text + "'");
        out.push_back(v);
    }
    return out;
}

std::vector<double> parseDoubles(const std::string& text) {
    return parseList<double>(text, "a list of numbers",
                             [](const std::string& s, std::size_t* used) { return std::stod(s, used); });
}

std::vector<int> parseInts(const std::string& text) {
    return parseList<int>(text, "an integer list",
                          [](const std::string& s, std::size_t* used) { return std::stoi(s, used); });
}

double parseDouble(const std::string& flag, const std::string& text) {
    try {
        std::size_t used = 0;
        const double v = std::stod(text, &used);
        if (used == text.size()) return v;
    } catch (const std::exception&) {
    }
    throw modscope::Error(flag + ": not a number: '" + text + "'");
}

long long parseInt(const std::string& flag, const std::string& text) {
    try {
        std::size_t used = 0;
        const long long v = std::stoll(text, &used);
        if (used == text.size()) return v;
    } catch (const std::exception&) {
    }
    throw modscope::Error(flag + ": not an integer: '" + text + "'");
}

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
    bool routed_given = false;
    try {
        std::vector<std::string> args(argv + 1, argv + argc);
        for (std::size_t i = 0; i < args.size(); ++i) {
            const std::string& a = args[i];
            const auto value = [&]() -> std::string {
                if (i + 1 >= args.size()) throw Error(a + " needs a value");
                return args[++i];
            };
            if (a == "-h" || a == "--help") {
                std::fputs(kUsage, stdout);
                return 0;
            } else if (a == "--out") opt.out_dir = value();
            else if (a == "--corpus") opt.corpus_files.push_back(value());
            else if (a == "--tokenizer") opt.tokenizer_model = value();
            else if (a == "--dense") opt.dense = true;
            else if (a == "--steps") opt.steps = parseInt(a, value());
            else if (a == "--flops-budget") opt.flops_budget = parseDouble(a, value());
            else if (a == "--seq-lens") opt.seq_lens = parseInts(value());
            else if (a == "--batch-tokens") opt.batch_tokens = static_cast<int>(parseInt(a, value()));
            else if (a == "--lr") opt.lr = parseDouble(a, value());
            else if (a == "--warmup") opt.warmup_steps = parseInt(a, value());
            else if (a == "--min-lr-ratio") opt.min_lr_ratio = parseDouble(a, value());
            else if (a == "--weight-decay") opt.weight_decay = parseDouble(a, value());
            else if (a == "--grad-clip") opt.grad_clip = parseDouble(a, value());
            else if (a == "--predictor-weight") opt.predictor_loss_weight = parseDouble(a, value());
            else if (a == "--router-aux-weight") opt.router_aux_loss_weight = parseDouble(a, value());
            else if (a == "--no-calibrate") opt.calibrate_threshold = false;
            else if (a == "--seed") opt.seed = static_cast<std::uint64_t>(parseInt(a, value()));
            else if (a == "--val-fraction") opt.val_fraction = parseDouble(a, value());
            else if (a == "--eval-every") opt.eval_every = static_cast<int>(parseInt(a, value()));
            else if (a == "--eval-windows") opt.eval_windows = static_cast<int>(parseInt(a, value()));
            else if (a == "--checkpoint-every") opt.checkpoint_every = static_cast<int>(parseInt(a, value()));
            else if (a == "--resume") opt.resume = true;
            else if (a == "--device") opt.device = value();
            else if (a == "--name") opt.config.name = value();
            else if (a == "--vocab") opt.config.vocab_size = static_cast<int>(parseInt(a, value()));
            else if (a == "--d-model") opt.config.d_model = static_cast<int>(parseInt(a, value()));
            else if (a == "--layers") opt.config.n_layers = static_cast<int>(parseInt(a, value()));
            else if (a == "--heads") opt.config.n_heads = static_cast<int>(parseInt(a, value()));
            else if (a == "--d-ff") opt.config.d_ff = static_cast<int>(parseInt(a, value()));
            else if (a == "--max-seq-len") opt.config.max_seq_len = static_cast<int>(parseInt(a, value()));
            else if (a == "--capacity") opt.config.capacity = parseDouble(a, value());
            else if (a == "--routed") opt.config.routed_layers = parseInts(value()), routed_given = true;
            else if (a == "--predictor-hidden") opt.config.predictor_hidden = static_cast<int>(parseInt(a, value()));
            else if (a == "--evaluate") evaluate_dir = value();
            else if (a == "--calibrate-causal") calibrate_dir = value();
            else if (a == "--gains") gains = parseDoubles(value());
            else if (a == "--lengths") lengths = parseInts(value());
            else if (a == "--windows") windows = static_cast<int>(parseInt(a, value()));
            else throw Error("unknown option '" + a + "' (see --help)");
        }
        if (!routed_given) opt.config.routed_layers = modscope::ModelConfig::everyOtherLayer(opt.config.n_layers);
        if (opt.corpus_files.empty()) throw Error("no --corpus given (scripts/make_default_corpus.sh makes one)");
        if (!evaluate_dir.empty())
            return evaluateCommand(evaluate_dir, opt.corpus_files, lengths, windows, opt.val_fraction, opt.device);
        if (!calibrate_dir.empty())
            return calibrateCausalCommand(calibrate_dir, opt.corpus_files, lengths, gains, windows,
                                          opt.val_fraction, opt.device);
        if (opt.out_dir.empty()) throw Error("no --out directory given");

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
        // One line, whatever the message holds (a reader's or LibTorch's text may span lines).
        std::string message = e.what();
        for (auto& c : message)
            if (c == '\n' || c == '\r') c = ' ';
        std::fprintf(stderr, "modscope-train: %s\n", message.c_str());
        return 1;
    }
}
