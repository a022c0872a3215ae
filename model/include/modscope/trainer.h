// ModScope trainer: corpus, tokenizer training, MoD / dense training with resumable checkpoints, and the
// held-out evaluation of the causal predictor. Plain C++ types only, like engine.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

// UTF-8 text of the given files, each split into a training and a held-out validation part: the last
// val_fraction of every file (cut at a line break) is validation and is never trained on, tokenizer
// included. Missing, empty or non-UTF-8 files raise Error naming the file (and the byte offset).
struct Corpus {
    std::string train_text;
    std::string val_text;
    std::vector<std::string> files;
    static Corpus fromFiles(const std::vector<std::string>& files, double val_fraction);
};

// Throws Error naming `source` and the first offending byte offset when text is not valid UTF-8.
void requireUtf8(const std::string& text, const std::string& source);

struct TrainOptions {
    std::vector<std::string> corpus_files;
    std::string out_dir;               // becomes a model directory (config.json, weights.pt, tokenizer.model)
    std::string tokenizer_model;       // existing SentencePiece model; empty: train one on the training text
    ModelConfig config;                // vocab_size is taken from the tokenizer
    bool dense = false;                // the dense baseline of the same shape: no routed layers

    std::int64_t steps = 2000;
    double flops_budget = 0.0;         // > 0: steps = budget / training FLOPs per step (3x forward)
    int batch_tokens = 4096;           // tokens per step; batch = batch_tokens / seq_len
    std::vector<int> seq_lens{256};    // each step draws one length; mixed lengths teach short prompts
    double lr = 3e-3;
    double min_lr_ratio = 0.1;         // cosine decays to lr * this
    std::int64_t warmup_steps = 100;
    double weight_decay = 0.1;
    double beta1 = 0.9, beta2 = 0.95;
    double grad_clip = 1.0;
    double predictor_loss_weight = 1.0;    // BCE of the causal predictor against top-k membership
    double router_aux_loss_weight = 0.0;   // the paper's other method: BCE of the router logit itself
    double balance_loss_weight = 0.01;     // Switch Transformer's load balance, mean over mixture layers
    bool calibrate_threshold = true;       // after training: predictor bias set so its selection rate = capacity
    std::uint64_t seed = 1234;
    double val_fraction = 0.02;
    int eval_every = 250;
    int eval_windows = 48;
    int checkpoint_every = 250;
    bool resume = false;
    std::string device = "auto";
};

struct LayerEval {
    int layer = 0;
    Agreement agreement;   // causal predictor against top-k, on held-out windows
    // Sum over windows of |tokens the predictor selects - k|: disagreements its count alone forces, however
    // well it picks. Their share of fp + fn says whether errors come from the rate or from the choice.
    std::int64_t count_forced = 0;
    double countForcedShare() const {
        const auto wrong = agreement.fp + agreement.fn;
        return wrong > 0 ? double(count_forced) / double(wrong) : 0.0;
    }
};

// A mixture layer on held-out windows: where its tokens went.
struct MixtureEval {
    int layer = 0;
    std::int64_t tokens = 0;    // tokens that reached the mixture
    std::int64_t ran = 0;       // ... that an expert ran
    std::int64_t noop = 0;      // ... whose top choice was a no-op
    std::int64_t overflow = 0;  // ... whose expert was full
    std::vector<std::int64_t> load;  // [n_experts] tokens each expert ran
};

struct EvalResult {
    double loss = 0.0;
    double perplexity = 0.0;
    int seq_len = 0;
    std::vector<LayerEval> layers;
    // Mean over window rows and pairs of routed layers of |A & B| / |A | B|, A and B the two layers' top-k
    // selections: 1 when the routed layers take the same tokens. NaN with fewer than two routed layers.
    double routed_jaccard = std::numeric_limits<double>::quiet_NaN();
    std::vector<MixtureEval> mixtures;
};

struct TrainProgress {
    std::int64_t step = 0;      // steps done
    std::int64_t total_steps = 0;
    double loss = 0.0;          // language-model cross-entropy of the last step
    double predictor_loss = 0.0;
    double balance_loss = 0.0;  // mixture layers' load-balancing loss (0 without mixtures)
    double lr = 0.0;
    double tokens_per_second = 0.0;
    double elapsed_seconds = 0.0;
    double eta_seconds = 0.0;
    double train_flops = 0.0;   // cumulative
    bool has_eval = false;
    EvalResult eval;
    std::string message;        // set for notable events (tokenizer trained, checkpoint, resume)
};

class Trainer {
public:
    explicit Trainer(TrainOptions options);
    ~Trainer();
    // Trains until the last step or until stop is raised; saves a checkpoint either way. Returns the
    // final progress. Resumable: run again with resume = true.
    TrainProgress run(const std::function<void(const TrainProgress&)>& on_progress,
                      const std::atomic<bool>* stop = nullptr);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Held-out evaluation of a model: mean LM loss and the predictor's agreement with top-k, over `windows`
// windows of seq_len tokens drawn (seeded) from ids.
EvalResult evaluate(const Model& model, const std::vector<int>& ids, int seq_len, int windows,
                    std::uint64_t seed = 99);

// Causal mode's rule (ModelConfig::predictor_budget_gain and predictor_prefix_topk, docs/MODEL.md) chosen by
// measurement. For each candidate, the causal decisions' agreement with top-k in every routed layer at every
// window length, on windows drawn from the training split (the held-out split stays for reporting). The
// candidate whose worst (layer, length) accuracy is highest wins; ties go to the simpler rule.
struct CausalRuleTrial {
    double gain = 0.0;
    bool prefix_topk = false;
    std::vector<double> worst_accuracy;  // per length (CausalRuleCalibration::lengths): lowest over routed layers
    double worst() const;
};

struct CausalRuleCalibration {
    std::vector<int> lengths;
    std::vector<CausalRuleTrial> trials;  // every gain without, then with the prefix top-k
    const CausalRuleTrial* chosen = nullptr;
    std::size_t training_tokens = 0;
};

// Opens the checkpoint in dir, measures every gain in `gains` with and without the prefix top-k over at least
// 32k tokens a length (seeded), and rewrites dir/config.json (atomically) with the chosen rule.
CausalRuleCalibration calibrateCausalRule(const std::string& dir, const std::vector<std::string>& corpus_files,
                                          double val_fraction, const std::vector<int>& lengths,
                                          const std::vector<double>& gains, int windows,
                                          const std::string& device, std::uint64_t seed = 7);

// Training FLOPs of one step of batch_tokens tokens at seq_len (3x the forward: forward + backward).
double trainStepFlops(const ModelConfig& config, int seq_len, int batch_tokens);

}  // namespace modscope
