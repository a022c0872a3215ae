// Training: corpus split, tokenizer, AdamW with warm-up and cosine decay, predictor BCE, atomic resumable
// checkpoints, held-out evaluation of the causal predictor.
#include "modscope/trainer.h"

#include <torch/nn/functional/loss.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <sstream>

#include "backend/backend.h"
#include "formats/file_io.h"
#include "modscope/trace_io.h"
#include "model_impl.h"
#include "runtime_state.h"

namespace modscope {

namespace fs = std::filesystem;
namespace F = torch::nn::functional;

namespace {

constexpr std::uint64_t kMaxCorpusFileBytes = 2ull << 30;
constexpr const char* kStateFile = "train_state.pt";
constexpr const char* kLogFile = "train_log.jsonl";

double secondsSince(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Tokenizes text in chunks cut at line breaks (SentencePiece treats each call as one sentence).
std::vector<int> tokenizeText(const Tokenizer& tok, const std::string& text) {
    std::vector<int> ids;
    ids.reserve(text.size() / 3);
    std::size_t start = 0;
    while (start < text.size()) {
        std::size_t end = std::min(text.size(), start + (1 << 16));
        if (end < text.size()) {
            const auto nl = text.rfind('\n', end);
            if (nl != std::string::npos && nl > start) end = nl + 1;
        }
        const auto part = tok.encodeIds(text.substr(start, end - start));
        ids.insert(ids.end(), part.begin(), part.end());
        start = end;
    }
    return ids;
}

// Windows of seq_len + 1 tokens at seeded random offsets: [B, T+1] int64.
torch::Tensor sampleWindows(const std::vector<int>& ids, int seq_len, int batch, std::mt19937_64& rng) {
    const auto span = static_cast<std::int64_t>(ids.size()) - seq_len - 1;
    if (span <= 0)
        throw Error("corpus too small: " + std::to_string(ids.size()) + " tokens for windows of " +
                    std::to_string(seq_len + 1));
    std::uniform_int_distribution<std::int64_t> offset(0, span);
    auto out = torch::empty({batch, seq_len + 1}, torch::kLong);
    auto* p = out.data_ptr<std::int64_t>();
    for (int b = 0; b < batch; ++b) {
        const auto o = offset(rng);
        for (int t = 0; t <= seq_len; ++t) p[b * (seq_len + 1) + t] = ids[o + t];
    }
    return out;
}

std::string jsonNumber(double v) {
    if (!std::isfinite(v)) return "null";
    std::ostringstream out;
    out.precision(6);
    out << v;
    return out.str();
}

std::string evalJson(const EvalResult& e) {
    std::ostringstream out;
    out << "{\"seq_len\":" << e.seq_len << ",\"loss\":" << jsonNumber(e.loss) << ",\"perplexity\":"
        << jsonNumber(e.perplexity) << ",\"layers\":[";
    for (std::size_t i = 0; i < e.layers.size(); ++i) {
        const auto& a = e.layers[i].agreement;
        out << (i ? "," : "") << "{\"layer\":" << e.layers[i].layer << ",\"accuracy\":" << jsonNumber(a.accuracy())
            << ",\"precision\":" << jsonNumber(a.precision()) << ",\"recall\":" << jsonNumber(a.recall())
            << ",\"balanced_accuracy\":" << jsonNumber(a.balancedAccuracy()) << ",\"tp\":" << a.tp
            << ",\"fp\":" << a.fp << ",\"tn\":" << a.tn << ",\"fn\":" << a.fn << "}";
    }
    out << "]";
    if (std::isfinite(e.routed_jaccard)) out << ",\"routed_jaccard\":" << jsonNumber(e.routed_jaccard);
    if (!e.mixtures.empty()) {
        out << ",\"mixtures\":[";
        for (std::size_t i = 0; i < e.mixtures.size(); ++i) {
            const auto& m = e.mixtures[i];
            out << (i ? "," : "") << "{\"layer\":" << m.layer << ",\"tokens\":" << m.tokens << ",\"ran\":" << m.ran
                << ",\"noop\":" << m.noop << ",\"overflow\":" << m.overflow << ",\"load\":[";
            for (std::size_t e2 = 0; e2 < m.load.size(); ++e2) out << (e2 ? "," : "") << m.load[e2];
            out << "]}";
        }
        out << "]";
    }
    out << "}";
    return out.str();
}

}  // namespace

// ------------------------------------------------------------------------------------------------ corpus
void requireUtf8(const std::string& text, const std::string& source) {
    std::size_t bad = 0;
    if (!isValidUtf8(text, &bad))
        throw Error(source + ": not UTF-8 text (malformed sequence at byte offset " + std::to_string(bad) + ")");
}

Corpus Corpus::fromFiles(const std::vector<std::string>& files, double val_fraction) {
    if (files.empty()) throw Error("no corpus files given");
    if (!(val_fraction > 0.0 && val_fraction < 0.5)) throw Error("validation fraction must be in (0, 0.5)");
    Corpus corpus;
    for (const auto& file : files) {
        if (!fs::exists(file)) throw Error(file + ": no such corpus file");
        std::string text = readFileBounded(file, kMaxCorpusFileBytes);
        if (text.find_first_not_of(" \t\r\n") == std::string::npos) throw Error(file + ": corpus file is empty");
        requireUtf8(text, file);
        if (text.back() != '\n') text.push_back('\n');
        // The held-out part is the file's tail, cut at a line break so no line is split between the two.
        std::size_t cut = static_cast<std::size_t>(text.size() * (1.0 - val_fraction));
        const auto nl = text.find('\n', cut);
        cut = nl == std::string::npos ? text.size() : nl + 1;
        corpus.train_text += text.substr(0, cut);
        corpus.val_text += text.substr(cut);
        corpus.files.push_back(file);
    }
    return corpus;
}

double trainStepFlops(const ModelConfig& config, int seq_len, int batch_tokens) {
    std::vector<int> processed, expert_rows;
    for (int i = 0; i < config.n_layers; ++i) {
        const int n = config.isRouted(i) ? capacityToK(config.capacity, seq_len) : seq_len;
        processed.push_back(n);
        // A mixture as a balanced router fills it: each choice equally often, the experts up to capacity.
        const double to_experts = config.routerChoices() > 0 ? double(n) * config.n_experts / config.routerChoices() : n;
        expert_rows.push_back(static_cast<int>(std::lround(std::min(
            to_experts, double(config.n_experts) * expertCapacity(config.expert_capacity_factor, config.n_experts, n)))));
    }
    const int batch = std::max(1, batch_tokens / seq_len);
    return 3.0 * batch * forwardFlops(config, seq_len, processed, -1, {}, expert_rows);
}

// ------------------------------------------------------------------------------------------------ evaluate
EvalResult evaluate(const Model& model, const std::vector<int>& ids, int seq_len, int windows, std::uint64_t seed) {
    torch::InferenceMode guard;
    auto& impl = internals(model);
    backend::Use use(*impl.backend);
    std::mt19937_64 rng(seed);
    EvalResult result;
    result.seq_len = seq_len;
    std::map<int, Agreement> per_layer;
    std::map<int, std::int64_t> count_forced;
    std::map<int, MixtureEval> mixtures;
    double jaccard_sum = 0.0, jaccard_rows = 0.0;
    double loss_sum = 0.0;
    int batches = 0;
    const int per_batch = std::max(1, 8192 / seq_len);
    for (int done = 0; done < windows; done += per_batch) {
        const int b = std::min(per_batch, windows - done);
        const auto w = sampleWindows(ids, seq_len, b, rng).to(impl.device);
        nn::ForwardOptions fo;
        fo.capacity = impl.config.capacity;
        fo.setCausalRule(impl.config);
        fo.collect = true;
        std::vector<nn::LayerRouting> routing;
        const auto h = impl.net->hidden(w.narrow(1, 0, seq_len), fo, &routing);
        const auto logits = impl.net->logits(h);
        loss_sum += backend::current().crossEntropy(logits.reshape({-1, logits.size(-1)}), w.narrow(1, 1, seq_len).reshape(-1))
                        .item<double>();
        ++batches;
        for (int li = 0; li < impl.config.n_layers; ++li) {
            if (!impl.config.isRouted(li)) continue;
            const auto truth = routing[li].topk_mask;
            const auto pred = nn::causalSelection(routing[li].predictor_logits, routing[li].router_logits,
                                                  fo.causalRule())
                                  .to(truth.device());
            auto& a = per_layer[li];
            a.tp += (truth & pred).sum().item<std::int64_t>();
            a.fp += (~truth & pred).sum().item<std::int64_t>();
            a.tn += (~truth & ~pred).sum().item<std::int64_t>();
            a.fn += (truth & ~pred).sum().item<std::int64_t>();
            // Each window's top-k holds exactly k tokens, so a predictor selecting n of them is wrong on at
            // least |n - k|.
            count_forced[li] += (pred.sum(1) - routing[li].k).abs().sum().item<std::int64_t>();
        }
        const auto& routed = impl.config.routed_layers;
        for (std::size_t i = 0; i < routed.size(); ++i)
            for (std::size_t j = i + 1; j < routed.size(); ++j) {
                const auto& a = routing[routed[i]].topk_mask;
                const auto& c = routing[routed[j]].topk_mask;
                const auto both = (a & c).sum(1).to(torch::kFloat64), either = (a | c).sum(1).to(torch::kFloat64);
                jaccard_sum += (both / either.clamp_min(1)).sum().item<double>();
                jaccard_rows += static_cast<double>(a.size(0));
            }
        for (int li = 0; li < impl.config.n_layers; ++li) {
            const auto& m = routing[li].mixture;
            if (!impl.config.isMoe(li) || !m.expert.defined()) continue;
            auto& me = mixtures[li];
            me.layer = li;
            const auto reached = m.choice >= 0, ran = m.expert >= 0;
            const auto noop = m.choice >= impl.config.n_experts;
            me.tokens += reached.sum().item<std::int64_t>();
            me.ran += ran.sum().item<std::int64_t>();
            me.noop += noop.sum().item<std::int64_t>();
            me.overflow += (reached & ~noop & ~ran).sum().item<std::int64_t>();
            me.load.resize(static_cast<std::size_t>(impl.config.n_experts), 0);
            for (int e = 0; e < impl.config.n_experts; ++e) me.load[e] += (m.expert == e).sum().item<std::int64_t>();
        }
    }
    if (jaccard_rows > 0) result.routed_jaccard = jaccard_sum / jaccard_rows;
    for (auto& [layer, me] : mixtures) result.mixtures.push_back(me);
    result.loss = loss_sum / std::max(1, batches);
    result.perplexity = std::exp(result.loss);
    for (const auto& [layer, a] : per_layer) result.layers.push_back({layer, a, count_forced[layer]});
    return result;
}

// ------------------------------------------------------------------------------------------- causal rule
double CausalRuleTrial::worst() const {
    return worst_accuracy.empty() ? 0.0 : *std::min_element(worst_accuracy.begin(), worst_accuracy.end());
}

CausalRuleCalibration calibrateCausalRule(const std::string& dir, const std::vector<std::string>& corpus_files,
                                          double val_fraction, const std::vector<int>& lengths,
                                          const std::vector<double>& gains, int windows,
                                          const std::string& device, std::uint64_t seed) {
    if (gains.empty()) throw Error("no budget gains to try");
    for (const double g : gains)
        if (!(g >= 0.0 && g <= 100.0)) throw Error("budget gain " + std::to_string(g) + " is outside 0..100");
    auto model = Model::open(dir, device);
    if (!model->tokenizer()) throw Error(dir + ": no tokenizer.model");
    auto& impl = internals(*model);
    backend::Use use(*impl.backend);
    auto config = impl.config;
    if (config.routed_layers.empty()) throw Error(dir + ": a dense model has no causal decisions to tune");
    const auto corpus = Corpus::fromFiles(corpus_files, val_fraction);
    const auto ids = model->tokenizer()->encodeIds(corpus.train_text);

    CausalRuleCalibration result;
    result.training_tokens = ids.size();
    for (const bool prefix : {false, true})
        for (const double g : gains) result.trials.push_back({g, prefix, {}});
    torch::InferenceMode guard;
    std::mt19937_64 rng(seed);
    for (const int T : lengths) {
        if (T < 1 || T > config.max_seq_len || static_cast<std::size_t>(T) >= ids.size()) continue;
        result.lengths.push_back(T);
        // One top-k forward a length: the logits and top-k do not depend on the rule. At least 32k tokens a
        // length: neighbouring gains differ by tenths of a percent.
        const auto w = sampleWindows(ids, T, std::max(windows, 32768 / T), rng).to(impl.device);
        nn::ForwardOptions fo;
        fo.capacity = config.capacity;
        fo.collect = true;
        std::vector<nn::LayerRouting> routing;
        impl.net->hidden(w.narrow(1, 0, T), fo, &routing);
        for (auto& trial : result.trials) {
            double worst = 1.0;
            for (int li = 0; li < config.n_layers; ++li) {
                if (!config.isRouted(li)) continue;
                const nn::CausalRule rule{config.predictor_threshold, config.capacity, trial.gain, trial.prefix_topk};
                const auto& r = routing[li];
                const auto pred = nn::causalSelection(r.predictor_logits, r.router_logits, rule).to(impl.device);
                worst = std::min(worst, (pred == r.topk_mask).to(torch::kFloat64).mean().item<double>());
            }
            trial.worst_accuracy.push_back(worst);
        }
    }
    if (result.lengths.empty()) throw Error("no window length fits both the model and the corpus");
    for (const auto& trial : result.trials)  // in order of simplicity: a tie keeps the earlier one
        if (!result.chosen || trial.worst() > result.chosen->worst()) result.chosen = &trial;
    config.predictor_budget_gain = result.chosen->gain;
    config.predictor_prefix_topk = result.chosen->prefix_topk;
    writeFileAtomic((fs::path(dir) / "config.json").string(), config.toJson());
    return result;
}

// ------------------------------------------------------------------------------------------------ trainer
struct Trainer::Impl {
    TrainOptions opt;
    std::unique_ptr<Model> model;
    std::vector<int> train_ids, val_ids;
    std::unique_ptr<torch::optim::AdamW> optimizer;
    std::int64_t step = 0;
    std::int64_t total_steps = 0;  // the learning-rate schedule's length
    double train_flops = 0.0;

    // The planned steps are done and, with a FLOPs budget, the budget is spent: a run whose steps cost less
    // than planned (a mixture's experts ran fewer rows) tops up at the final learning rate until it is.
    bool done() const {
        if (step < total_steps) return false;
        return !(opt.flops_budget > 0 && train_flops < opt.flops_budget);
    }

    void log(const std::string& line) {
        std::ofstream out(fs::path(opt.out_dir) / kLogFile, std::ios::app);
        out << line << "\n";
    }

    double lrAt(std::int64_t s) const {
        if (s < opt.warmup_steps) return opt.lr * double(s + 1) / double(opt.warmup_steps);
        const double progress =
            std::min(1.0, double(s - opt.warmup_steps) / double(std::max<std::int64_t>(1, total_steps - opt.warmup_steps)));
        const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
        return opt.lr * (opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * cosine);
    }

    void buildOptimizer() {
        std::vector<torch::Tensor> decay, no_decay;
        for (const auto& p : internals(*model).net->named_parameters()) {
            // Matrices decay; gains and biases do not (they set scales, not features).
            (p.value().dim() >= 2 ? decay : no_decay).push_back(p.value());
        }
        std::vector<torch::optim::OptimizerParamGroup> groups;
        auto base = torch::optim::AdamWOptions(opt.lr).betas({opt.beta1, opt.beta2}).eps(1e-8);
        groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(opt.weight_decay)));
        groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(0.0)));
        optimizer = std::make_unique<torch::optim::AdamW>(groups, base);
    }

    void saveState() {
        model->save(opt.out_dir);
        torch::serialize::OutputArchive archive;
        optimizer->save(archive);
        for (const auto& p : internals(*model).net->named_parameters())
            archive.write("param/" + p.key(), p.value().detach().to(torch::kCPU));
        archive.write("step", torch::tensor(step, torch::kLong));
        archive.write("total_steps", torch::tensor(total_steps, torch::kLong));
        archive.write("train_flops", torch::tensor(train_flops, torch::kFloat64));
        std::ostringstream bytes;
        archive.save_to(bytes);
        writeFileAtomic((fs::path(opt.out_dir) / kStateFile).string(), bytes.str());
    }

    void loadState() {
        const auto path = (fs::path(opt.out_dir) / kStateFile).string();
        if (!fs::exists(path)) throw Error(path + ": nothing to resume from");
        torch::serialize::InputArchive archive;
        try {
            archive.load_from(path, internals(*model).device);
            torch::NoGradGuard guard;
            for (auto& p : internals(*model).net->named_parameters()) {
                torch::Tensor t;
                archive.read("param/" + p.key(), t);
                p.value().copy_(t);
            }
            optimizer->load(archive);
            torch::Tensor t;
            archive.read("step", t);
            step = t.item<std::int64_t>();
            archive.read("total_steps", t);
            if (t.item<std::int64_t>() != total_steps)
                throw Error("the run was planned for " + std::to_string(t.item<std::int64_t>()) +
                            " steps, these options give " + std::to_string(total_steps));
            // A fresh tensor: read() into a defined one copies into its dtype, and t holds an int64 by now
            // (the FLOPs' float64 bits came back as an integer).
            torch::Tensor flops;
            archive.read("train_flops", flops);
            train_flops = flops.item<double>();
        } catch (const Error&) {
            throw;
        } catch (const std::exception& e) {
            throw Error(path + ": cannot resume (" + std::string(e.what()).substr(0, 200) + ")");
        }
    }

    // Shifts each routed layer's predictor bias so that it selects `capacity` of the held-out tokens:
    // the BCE-trained probability is biased towards 'skip' (7 of 8 tokens are negatives), and a threshold
    // matched to the capacity recovers recall at little cost in accuracy.
    void calibratePredictors(std::vector<std::string>& notes) {
        auto& net = *internals(*model).net;
        const auto& cfg = internals(*model).config;
        backend::Use use(*internals(*model).backend);
        const double thr_logit = std::log(cfg.predictor_threshold / (1.0 - cfg.predictor_threshold));
        for (auto& block : net.blocks) {
            if (!block->routed) continue;
            std::vector<torch::Tensor> logits;
            std::mt19937_64 rng(opt.seed + 17);
            for (int T : opt.seq_lens) {
                torch::InferenceMode guard;
                const auto w = sampleWindows(val_ids, T, std::max(1, 8192 / T), rng).to(internals(*model).device);
                nn::ForwardOptions fo;
                fo.capacity = cfg.capacity;
                fo.collect = true;
                std::vector<nn::LayerRouting> routing;
                net.hidden(w.narrow(1, 0, T), fo, &routing);
                logits.push_back(routing[block->index].predictor_logits.reshape(-1));
            }
            const auto all = torch::cat(logits).to(torch::kFloat64);
            const double q = std::clamp(1.0 - cfg.capacity, 0.0, 1.0);
            const double cut = torch::quantile(all, q).item<double>();
            torch::NoGradGuard guard;
            block->predictor->fc2->bias.add_(thr_logit - cut);
            notes.push_back("layer " + std::to_string(block->index) + ": predictor bias shifted by " +
                            std::to_string(thr_logit - cut));
        }
    }
};

Trainer::Trainer(TrainOptions options) : impl_(std::make_unique<Impl>()) { impl_->opt = std::move(options); }
Trainer::~Trainer() = default;

TrainProgress Trainer::run(const std::function<void(const TrainProgress&)>& on_progress,
                           const std::atomic<bool>* stop) {
    auto& s = *impl_;
    auto& opt = s.opt;
    const auto t_start = std::chrono::steady_clock::now();
    const auto notify = [&](TrainProgress p) {
        if (on_progress) on_progress(p);
    };
    if (opt.out_dir.empty()) throw Error("no output directory given");
    if (opt.seq_lens.empty()) throw Error("no training sequence length given");
    for (int T : opt.seq_lens)
        if (T < 2 || T > opt.config.max_seq_len)
            throw Error("training length " + std::to_string(T) + " outside 2.." + std::to_string(opt.config.max_seq_len));
    std::error_code ec;
    fs::create_directories(opt.out_dir, ec);
    if (ec) throw Error(opt.out_dir + ": cannot create (" + ec.message() + ")");

    const auto corpus = Corpus::fromFiles(opt.corpus_files, opt.val_fraction);

    // Tokenizer: given, already in the output directory (resume), or trained on the training split only.
    const auto tok_path = (fs::path(opt.out_dir) / "tokenizer.model").string();
    std::unique_ptr<Tokenizer> tokenizer;
    if (!opt.tokenizer_model.empty()) {
        tokenizer = Tokenizer::load(opt.tokenizer_model);
    } else if (opt.resume && fs::exists(tok_path)) {
        tokenizer = Tokenizer::load(tok_path);
    } else {
        const auto corpus_path = (fs::path(opt.out_dir) / ".tokenizer_corpus.txt").string();
        writeFileAtomic(corpus_path, corpus.train_text);
        Tokenizer::TrainOptions to;
        to.input_files = {corpus_path};
        to.model_prefix = (fs::path(opt.out_dir) / "tokenizer").string();
        to.vocab_size = opt.config.vocab_size;
        to.seed = opt.seed;
        Tokenizer::train(to);
        fs::remove(corpus_path, ec);
        fs::remove(to.model_prefix + ".vocab", ec);
        tokenizer = Tokenizer::load(tok_path);
        TrainProgress p;
        p.message = "tokenizer trained: " + std::to_string(tokenizer->vocabSize()) + " pieces";
        notify(p);
    }

    auto config = opt.config;
    config.vocab_size = tokenizer->vocabSize();
    if (opt.dense) {
        config.routed_layers.clear();
        config.capacity = 1.0;
    }
    config.validate();
    s.model = Model::create(config, opt.seed, opt.device);
    s.model->attachTokenizer(std::move(tokenizer));
    s.train_ids = tokenizeText(*s.model->tokenizer(), corpus.train_text);
    s.val_ids = tokenizeText(*s.model->tokenizer(), corpus.val_text);
    {
        TrainProgress p;
        p.message = "corpus: " + std::to_string(s.train_ids.size()) + " training tokens, " +
                    std::to_string(s.val_ids.size()) + " held-out tokens";
        notify(p);
    }

    double flops_per_step = 0.0;
    for (int T : opt.seq_lens) flops_per_step += trainStepFlops(config, T, opt.batch_tokens);
    flops_per_step /= opt.seq_lens.size();
    s.total_steps = opt.flops_budget > 0 ? static_cast<std::int64_t>(std::ceil(opt.flops_budget / flops_per_step))
                                         : opt.steps;
    if (s.total_steps <= 0) throw Error("nothing to train: zero steps");
    s.buildOptimizer();
    if (opt.resume) {
        s.loadState();
        TrainProgress p;
        std::ostringstream msg;
        msg << "resumed at step " << s.step << " of " << s.total_steps << " (" << s.train_flops << " FLOPs spent";
        if (opt.flops_budget > 0) msg << " of " << opt.flops_budget;
        msg << ")";
        p.message = msg.str();
        notify(p);
    } else {
        std::ofstream(fs::path(opt.out_dir) / kLogFile, std::ios::trunc);
    }

    auto& impl = internals(*s.model);
    backend::Use use(*impl.backend);
    auto& net = *impl.net;
    net.train();
    TrainProgress progress;
    progress.total_steps = s.total_steps;
    double window_tokens = 0.0, window_seconds = 0.0;
    int run_steps = 0;
    const int eval_len = *std::max_element(opt.seq_lens.begin(), opt.seq_lens.end());

    const auto runEval = [&]() {
        net.eval();
        progress.eval = evaluate(*s.model, s.val_ids, eval_len, opt.eval_windows);
        progress.has_eval = true;
        net.train();
    };

    while (!s.done()) {
        if (stop && stop->load()) break;
        runtime::beforeCpuWork();
        const auto t0 = std::chrono::steady_clock::now();
        // Every step's batch follows from (seed, step) alone, so a resumed run sees the same data.
        std::mt19937_64 rng(opt.seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(s.step));
        const int T = opt.seq_lens[rng() % opt.seq_lens.size()];
        const int B = std::max(1, opt.batch_tokens / T);
        const auto windows = sampleWindows(s.train_ids, T, B, rng).to(impl.device);
        const auto inputs = windows.narrow(1, 0, T), targets = windows.narrow(1, 1, T);

        nn::ForwardOptions fo;
        fo.capacity = config.capacity;
        fo.collect = true;
        std::vector<nn::LayerRouting> routing;
        const auto logits = net.logits(net.hidden(inputs, fo, &routing));
        const auto lm_loss = backend::current().crossEntropy(logits.reshape({-1, logits.size(-1)}), targets.reshape(-1));
        auto loss = lm_loss;
        torch::Tensor pred_loss = torch::zeros({}, logits.options());
        int routed = 0;
        for (int li = 0; li < config.n_layers; ++li) {
            if (!config.isRouted(li)) continue;
            const auto target = routing[li].topk_mask.to(torch::kFloat32);
            pred_loss = pred_loss + F::binary_cross_entropy_with_logits(routing[li].predictor_logits, target);
            if (opt.router_aux_loss_weight > 0)
                loss = loss + opt.router_aux_loss_weight / config.routed_layers.size() *
                                  F::binary_cross_entropy_with_logits(routing[li].router_logits, target);
            ++routed;
        }
        if (routed > 0) {
            pred_loss = pred_loss / routed;
            loss = loss + opt.predictor_loss_weight * pred_loss;
        }
        torch::Tensor balance_loss;
        std::vector<int> step_processed, step_expert_rows;  // per batch row, for the FLOPs this step spent
        for (int li = 0; li < config.n_layers; ++li) {
            step_processed.push_back(config.isRouted(li) ? static_cast<int>(routing[li].k) : T);
            const auto& m = routing[li].mixture;
            step_expert_rows.push_back(static_cast<int>(std::lround(double(m.expert_rows) / B)));
            if (!config.isMoe(li) || !m.balance_loss.defined()) continue;
            balance_loss = balance_loss.defined() ? balance_loss + m.balance_loss : m.balance_loss;
        }
        if (balance_loss.defined()) {
            balance_loss = balance_loss / static_cast<double>(config.moe_layers.size());
            if (opt.balance_loss_weight > 0) loss = loss + opt.balance_loss_weight * balance_loss;
        }
        const double lr = s.lrAt(s.step);
        for (auto& group : s.optimizer->param_groups())
            static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
        // Gradients set to none rather than zeroed: backward then writes them instead of adding to zeros.
        for (auto& p : net.parameters()) p.mutable_grad() = torch::Tensor();
        loss.backward();
        torch::nn::utils::clip_grad_norm_(net.parameters(), opt.grad_clip);
        s.optimizer->step();
        ++s.step;

        const double lm = lm_loss.item<double>();
        if (!std::isfinite(lm)) throw Error("training diverged at step " + std::to_string(s.step) + " (loss " +
                                            std::to_string(lm) + "); lower the learning rate");
        const double dt = secondsSince(t0);
        s.train_flops += 3.0 * B * forwardFlops(config, T, step_processed, -1, {}, step_expert_rows);
        window_tokens = 0.9 * window_tokens + B * T;
        window_seconds = 0.9 * window_seconds + dt;
        progress.step = s.step;
        progress.loss = lm;
        progress.predictor_loss = pred_loss.item<double>();
        progress.balance_loss = balance_loss.defined() ? balance_loss.item<double>() : 0.0;
        progress.lr = lr;
        progress.tokens_per_second = window_tokens / std::max(1e-9, window_seconds);
        progress.elapsed_seconds = secondsSince(t_start);
        // window_seconds is an exponential sum (decay 0.9): times 0.1, bias-corrected, it is the mean step time.
        const double mean_step = 0.1 * window_seconds / (1.0 - std::pow(0.9, double(std::min(++run_steps, 500))));
        progress.eta_seconds = std::max<std::int64_t>(0, s.total_steps - s.step) * mean_step;
        progress.train_flops = s.train_flops;
        progress.has_eval = false;
        progress.message.clear();

        const bool last = s.done();
        if ((opt.eval_every > 0 && s.step % opt.eval_every == 0) || last) runEval();
        std::ostringstream line;
        line << "{\"step\":" << s.step << ",\"seq_len\":" << T << ",\"loss\":" << jsonNumber(lm)
             << ",\"predictor_loss\":" << jsonNumber(progress.predictor_loss) << ",\"lr\":" << jsonNumber(lr);
        if (balance_loss.defined()) line << ",\"balance_loss\":" << jsonNumber(progress.balance_loss);
        line
             << ",\"tokens_per_second\":" << jsonNumber(progress.tokens_per_second)
             << ",\"train_flops\":" << jsonNumber(s.train_flops)
             << ",\"elapsed_seconds\":" << jsonNumber(progress.elapsed_seconds);
        if (progress.has_eval) line << ",\"validation\":" << evalJson(progress.eval);
        line << "}";
        s.log(line.str());
        if (opt.checkpoint_every > 0 && s.step % opt.checkpoint_every == 0 && !last) {
            s.saveState();
            progress.message = "checkpoint at step " + std::to_string(s.step);
        }
        notify(progress);
    }

    net.eval();
    if (s.done() && opt.calibrate_threshold && !config.routed_layers.empty()) {
        std::vector<std::string> notes;
        s.calibratePredictors(notes);
        runEval();
        std::ostringstream line;
        line << "{\"step\":" << s.step << ",\"calibrated\":true,\"validation\":" << evalJson(progress.eval) << "}";
        s.log(line.str());
        progress.message = "predictor thresholds calibrated to capacity";
        notify(progress);
    }
    s.saveState();
    progress.has_eval = false;
    progress.message = s.done() ? "done" : "stopped at step " + std::to_string(s.step) + "; resume with --resume";
    notify(progress);
    return progress;
}

}  // namespace modscope
