// Model: opening, saving, traced forward passes and cached generation.
#include <c10/core/ScalarType.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <random>

#include "checkpoint/checkpoint.h"
#include "formats/file_io.h"
#include "formats/sha256.h"
#include "interventions.h"
#include "model_impl.h"
#include "runtime_state.h"

namespace modscope {

namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kMaxConfigBytes = 1 << 20;
constexpr std::uint64_t kMaxTokenizerBytes = 64ull << 20;

double msSince(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

template <typename T>
std::vector<T> toVector(const torch::Tensor& t) {
    const torch::Tensor c = t.to(torch::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
    return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

std::vector<std::uint8_t> maskToVector(const torch::Tensor& mask) {
    return toVector<std::uint8_t>(mask.to(torch::kUInt8));
}

// Samples from logits [V] with temperature and nucleus (top-p) filtering.
int sampleToken(const torch::Tensor& logits, float temperature, float top_p, std::mt19937_64& rng) {
    auto l = logits.to(torch::kCPU, torch::kFloat32);
    if (temperature <= 0.0f) return static_cast<int>(l.argmax().item<std::int64_t>());
    const auto probs = torch::softmax(l / temperature, -1);
    const auto sorted = probs.sort(-1, /*descending=*/true);
    const auto p = toVector<float>(std::get<0>(sorted));
    const auto idx = toVector<std::int64_t>(std::get<1>(sorted));
    double kept = 0.0;
    std::size_t n = 0;
    while (n < p.size() && (n == 0 || kept < top_p)) kept += p[n++];
    std::uniform_real_distribution<double> uni(0.0, kept);
    double u = uni(rng), acc = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        acc += p[i];
        if (u <= acc) return static_cast<int>(idx[i]);
    }
    return static_cast<int>(idx[n - 1]);
}

// A mixture layer's report, [1, T] tensors, as the trace holds it.
void fillMixture(LayerTrace& lt, const ModelConfig& config, const nn::MixtureRouting& m) {
    lt.moe = true;
    lt.n_experts = config.n_experts;
    lt.noop_experts = config.noop_experts;
    lt.expert_load.assign(static_cast<std::size_t>(config.n_experts), 0);
    if (!m.expert.defined()) return;
    lt.expert = toVector<int>(m.expert[0].to(torch::kInt32));
    lt.expert_choice = toVector<int>(m.choice[0].to(torch::kInt32));
    lt.expert_prob = toVector<float>(m.prob[0].to(torch::kFloat32));
    lt.expert_runner_up = toVector<int>(m.second[0].to(torch::kInt32));
    lt.expert_runner_up_prob = toVector<float>(m.second_prob[0].to(torch::kFloat32));
    const auto counts = countMixture(lt);
    lt.expert_load = counts.load;
    lt.expert_overflow = counts.overflow;
    lt.expert_capacity = expertCapacity(config.expert_capacity_factor, config.n_experts, counts.reached);
}

}  // namespace

torch::Tensor Model::Impl::idsTensor(const std::vector<int>& ids) const {
    if (ids.empty()) throw Error("no tokens to run");
    if (static_cast<int>(ids.size()) > config.max_seq_len)
        throw Error(std::to_string(ids.size()) + " tokens exceed the model's context of " +
                    std::to_string(config.max_seq_len));
    std::vector<std::int64_t> v(ids.begin(), ids.end());
    for (auto id : v)
        if (id < 0 || id >= config.vocab_size)
            throw Error("token id " + std::to_string(id) + " outside the vocabulary of " +
                        std::to_string(config.vocab_size));
    return torch::tensor(v, torch::kLong).view({1, -1}).to(device);
}

Model::Model() : impl_(std::make_unique<Impl>()) {}
Model::~Model() = default;

std::unique_ptr<Model> Model::create(const ModelConfig& config, std::uint64_t seed, const std::string& device,
                                     const std::string& backend_name) {
    config.validate();
    std::unique_ptr<Model> m(new Model());
    m->impl_->config = config;
    m->impl_->device = torch::Device(resolveDevice(device));
    m->impl_->backend = &backend::resolve(backend_name, m->impl_->device, torch::kFloat32);
    m->impl_->net = nn::ModTransformer(config);
    m->impl_->net->initWeights(seed);
    m->impl_->net->to(m->impl_->device);
    return m;
}

std::unique_ptr<Model> Model::open(const std::string& dir, const std::string& device,
                                   const std::string& backend_name) {
    const fs::path root(dir);
    if (!fs::is_directory(root)) throw Error(dir + ": not a model directory");
    const auto config_path = (root / "config.json").string();
    const auto weights_path = (root / "weights.pt").string();
    const auto tokenizer_path = (root / "tokenizer.model").string();
    for (const auto& p : {config_path, weights_path, tokenizer_path})
        if (!fs::exists(p)) throw Error(dir + ": missing " + fs::path(p).filename().string());

    ModelConfig config;
    try {
        config = ModelConfig::fromJson(readFileBounded(config_path, kMaxConfigBytes));
    } catch (const Error& e) {
        throw Error(config_path + ": " + e.what());
    }
    auto tokenizer = Tokenizer::load(tokenizer_path);
    if (tokenizer->vocabSize() != config.vocab_size)
        throw Error(tokenizer_path + ": vocabulary of " + std::to_string(tokenizer->vocabSize()) +
                    " pieces, but config.json says vocab_size " + std::to_string(config.vocab_size));

    const std::string bytes = readFileBounded(weights_path, maxWeightsFileBytes(config));
    // Every parameter is stored in the file with at least 2 bytes (float16), so a smaller file cannot hold it:
    // refused here, before the model's tensors (as large as the config says) are allocated.
    if (bytes.size() < minWeightsFileBytes(config))
        throw Error(weights_path + ": " + std::to_string(bytes.size()) + " bytes, too small for the " +
                    std::to_string(config.parameterCount()) + " parameters config.json declares" +
                    (bytes.empty() ? " (empty file)" : " (truncated?)"));
    std::unique_ptr<Model> m(new Model());
    auto& impl = *m->impl_;
    impl.config = config;
    impl.device = torch::Device(resolveDevice(device));
    impl.backend = &backend::resolve(backend_name, impl.device, torch::kFloat32);
    impl.net = nn::ModTransformer(config);
    loadWeights(*impl.net, bytes, weights_path);
    impl.net->to(impl.device);
    impl.directory = fs::absolute(root).lexically_normal().string();
    impl.weights_sha256 = sha256Hex(bytes);
    impl.tokenizer = std::move(tokenizer);
    return m;
}

void Model::save(const std::string& dir, bool half_weights) const {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw Error(dir + ": cannot create directory (" + ec.message() + ")");
    const auto bytes = serializeWeights(*impl_->net, half_weights);
    writeFileAtomic((fs::path(dir) / "weights.pt").string(), bytes);
    writeFileAtomic((fs::path(dir) / "config.json").string(), impl_->config.toJson());
    if (impl_->tokenizer) {
        const auto src = impl_->tokenizer->modelPath();
        const auto dst = (fs::path(dir) / "tokenizer.model").string();
        if (fs::absolute(src).lexically_normal() != fs::absolute(dst).lexically_normal())
            writeFileAtomic(dst, readFileBounded(src, kMaxTokenizerBytes));
    }
    impl_->weights_sha256 = sha256Hex(bytes);
}

const ModelConfig& Model::config() const { return impl_->config; }
std::string Model::device() const { return impl_->device.str(); }
std::string Model::backend() const { return impl_->backend->name(); }
std::string Model::directory() const { return impl_->directory; }
std::string Model::weightsSha256() const { return impl_->weights_sha256; }
std::int64_t Model::parameterCount() const { return impl_->config.parameterCount(); }
const Tokenizer* Model::tokenizer() const { return impl_->tokenizer.get(); }

void Model::attachTokenizer(std::unique_ptr<Tokenizer> tokenizer) {
    if (tokenizer && tokenizer->vocabSize() != impl_->config.vocab_size)
        throw Error("tokenizer has " + std::to_string(tokenizer->vocabSize()) + " pieces, the model " +
                    std::to_string(impl_->config.vocab_size));
    impl_->tokenizer = std::move(tokenizer);
}

RunTrace Model::run(const std::vector<int>& ids, const RunOptions& options) const {
    const auto t0 = std::chrono::steady_clock::now();
    runtime::beforeCpuWork();
    torch::InferenceMode guard;
    auto& impl = *impl_;
    backend::Use use(*impl.backend);
    const auto input = impl.idsTensor(ids);
    const int T = static_cast<int>(ids.size());

    nn::ForwardOptions fo;
    fo.mode = options.mode;
    fo.capacity = options.capacity < 0 ? impl.config.capacity : std::min(options.capacity, 1.0);
    if (options.layer_capacity.size() > static_cast<std::size_t>(impl.config.n_layers))
        throw Error("capacities for " + std::to_string(options.layer_capacity.size()) + " layers, the model has " +
                    std::to_string(impl.config.n_layers));
    for (std::size_t li = 0; li < options.layer_capacity.size(); ++li)
        if (std::isnan(options.layer_capacity[li]))
            throw Error("layer " + std::to_string(li) + "'s capacity is not a number");
    fo.layer_capacity = options.layer_capacity;
    fo.setCausalRule(impl.config);
    // Decision values read every layer's per-token routing.
    const bool per_token = options.per_token_routing || options.decision_values;
    const bool want_loss = options.token_loss || options.decision_values;
    if (options.top_predictions < 0 || options.top_predictions > 64)
        throw Error("top predictions: " + std::to_string(options.top_predictions) + " asked, 0 to 64 allowed");
    const auto forced = nn::resolveOverrides(impl.config, options.overrides, T);
    fo.forced = &forced;
    fo.keep_capacity = options.keep_capacity;
    fo.collect = per_token;
    fo.measure_update = per_token;
    fo.cancel = options.cancel;
    CapturedRun captured;  // decision values: what their flips start from
    if (options.decision_values) {
        fo.kv = &captured.kv;
        fo.residuals = &captured.residuals;
    }
    std::vector<nn::LayerRouting> routing;
    const auto h = impl.net->hidden(input, fo, &routing);

    RunTrace trace;
    trace.mode = options.mode;
    trace.capacity = fo.capacity;
    trace.device = impl.device.str();
    trace.backend = impl.backend->name();
    trace.token_ids = ids;
    trace.overrides = options.overrides;
    trace.keep_capacity = options.keep_capacity;
    int head_positions = 0;
    if (options.logits == RunOptions::Logits::All || want_loss || options.top_predictions > 0) {
        torch::Tensor all;  // [T, V]
        if (options.logits == RunOptions::Logits::All && h.device().is_cpu() && h.scalar_type() == torch::kFloat32) {
            // The head writes into the trace's own vector: [T, V] logits are not copied a second time.
            trace.logits.resize(static_cast<std::size_t>(T) * impl.config.vocab_size);
            all = torch::from_blob(trace.logits.data(), {T, impl.config.vocab_size}, torch::kFloat32);
            impl.net->logitsInto(h[0], all);
        } else {
            all = impl.net->logits(h[0]);
            if (options.logits == RunOptions::Logits::All) trace.logits = toVector<float>(all);
            if (options.logits == RunOptions::Logits::Last) trace.logits = toVector<float>(all[T - 1]);
        }
        trace.all_logits = options.logits == RunOptions::Logits::All;
        head_positions = T;
        if (want_loss) {
            trace.token_loss = tokenLosses(all.narrow(0, 0, T - 1), ids, 0);
            trace.token_loss.push_back(std::numeric_limits<float>::quiet_NaN());
        }
        if (options.top_predictions > 0) topPredictions(all, options.top_predictions, trace);
    } else if (options.logits == RunOptions::Logits::Last) {
        trace.logits = toVector<float>(impl.net->logits(h[0][T - 1]));
        head_positions = 1;
    }

    std::vector<int> processed, predictor_rows;  // predictor_rows stays empty for a traced run: every token
    std::vector<int> expert_rows;
    for (int li = 0; li < impl.config.n_layers; ++li)
        expert_rows.push_back(static_cast<int>(routing[li].mixture.expert_rows));
    // Without the per-token trace: counts only, and the predictor rows the forward actually computed.
    for (int li = 0; li < impl.config.n_layers && !per_token; ++li) {
        const auto& r = routing[li];
        LayerTrace lt;
        lt.index = li;
        lt.routed = impl.config.isRouted(li);
        lt.capacity = lt.routed ? fo.capacityOf(li) : -1.0;
        lt.k = lt.routed ? static_cast<int>(r.k) : T;
        lt.processed = !lt.routed                   ? T
                       : !r.selected_mask.defined() ? lt.k  // top-k mode's k, unforced
                                                    : static_cast<int>(r.selected_mask.sum().item<std::int64_t>());
        processed.push_back(lt.processed);
        predictor_rows.push_back(static_cast<int>(r.predictor_rows));
        trace.layers.push_back(std::move(lt));
    }
    for (int li = 0; li < impl.config.n_layers && per_token; ++li) {
        const auto& r = routing[li];
        LayerTrace lt;
        lt.index = li;
        lt.routed = impl.config.isRouted(li);
        lt.capacity = lt.routed ? fo.capacityOf(li) : -1.0;
        lt.k = static_cast<int>(r.k);
        lt.selected = maskToVector(r.selected_mask[0]);
        if (r.update_ratio.defined()) lt.update_ratio = toVector<float>(r.update_ratio[0]);
        lt.processed = static_cast<int>(std::count(lt.selected.begin(), lt.selected.end(), 1));
        if (lt.routed) {
            lt.router_logits = toVector<float>(r.router_logits[0]);
            lt.topk_selected = maskToVector(r.topk_mask[0]);
            lt.predictor_prob = toVector<float>(torch::sigmoid(r.predictor_logits[0]));
            // What causal mode decides from these inputs: in causal mode, what it processed.
            lt.predictor_selected =
                options.mode == RoutingMode::Causal
                    ? lt.selected
                    : maskToVector(nn::causalSelection(r.predictor_logits, r.router_logits, fo.causalRule(li))[0]);
            std::vector<int> order(T);
            for (int t = 0; t < T; ++t) order[t] = t;
            std::stable_sort(order.begin(), order.end(),
                             [&](int a, int b) { return lt.router_logits[a] > lt.router_logits[b]; });
            lt.rank.assign(T, 0);
            for (int i = 0; i < T; ++i) lt.rank[order[i]] = i;
            lt.topk_threshold = lt.router_logits[order[lt.k - 1]];
        } else {
            lt.topk_selected = lt.selected;
        }
        if (impl.config.isMoe(li)) fillMixture(lt, impl.config, r.mixture);
        processed.push_back(lt.processed);
        trace.layers.push_back(std::move(lt));
    }
    trace.flops = forwardFlops(impl.config, T, processed, head_positions, predictor_rows, expert_rows);
    trace.dense_flops = denseForwardFlops(impl.config, T, head_positions);
    if (options.decision_values) {
        captured.routing = std::move(routing);
        captured.token_loss = trace.token_loss;
        computeDecisionValues(impl, ids, fo, forced, captured, trace, options.progress, options.cancel);
    }
    trace.elapsed_ms = msSince(t0);
    return trace;
}

GenerationResult Model::generate(const std::vector<int>& prompt_ids, const GenerationOptions& options,
                                 const std::function<bool(const GenerationStep&)>& on_step) const {
    runtime::beforeCpuWork();
    torch::InferenceMode guard;
    auto& impl = *impl_;
    backend::Use use(*impl.backend);
    const auto& cfg = impl.config;
    GenerationResult result;
    result.prompt_ids = prompt_ids;
    auto input = impl.idsTensor(prompt_ids);
    const int budget = std::min(options.max_new_tokens, cfg.max_seq_len - static_cast<int>(prompt_ids.size()));
    if (budget <= 0) return result;

    std::vector<nn::LayerKV> kv;
    nn::ForwardOptions fo;
    fo.mode = RoutingMode::Causal;
    fo.capacity = cfg.capacity;
    fo.setCausalRule(cfg);
    fo.kv = &kv;
    fo.cancel = options.cancel;
    torch::Tensor logits;
    try {
        const auto h = impl.net->hidden(input, fo);
        logits = impl.net->logits(h[0][-1]);
    } catch (const Cancelled&) {
        result.cancelled = true;
        return result;
    }

    std::mt19937_64 rng(options.seed);
    // What a dense model of the same dtype would store per token and layer.
    const std::int64_t kv_per_token_layer = 2LL * cfg.d_model * impl.net->tok_emb->weight.element_size();
    int position = static_cast<int>(prompt_ids.size());
    const auto gen_start = std::chrono::steady_clock::now();
    for (int i = 0; i < budget; ++i) {
        if (options.cancel && options.cancel->load()) {
            result.cancelled = true;
            break;
        }
        runtime::beforeCpuWork();  // reads the load at most every 0.25 s, where asked to
        const auto ts = std::chrono::steady_clock::now();
        GenerationStep step;
        step.index = i;
        step.position = position;
        step.token_id = sampleToken(logits, options.temperature, options.top_p, rng);
        result.generated_ids.push_back(step.token_id);
        // The sampled token runs through the model at once: its K/V join the caches of the layers that
        // process it, its routing is reported, and its logits give the next token.
        std::vector<nn::MixtureRouting> mixture;
        logits = impl.net->step(step.token_id, position, kv, fo.causalRule(), &step.processed,
                                &step.predictor_prob, &mixture);
        step.expert.assign(static_cast<std::size_t>(cfg.n_layers), -1);
        for (int li = 0; li < cfg.n_layers; ++li)
            if (mixture[li].expert.defined()) step.expert[li] = static_cast<int>(mixture[li].expert.item<std::int64_t>());
        ++position;
        std::int64_t bytes = 0;
        for (const auto& layer : kv) bytes += layer.bytes();
        step.kv_cache_bytes = bytes;
        step.dense_kv_cache_bytes = kv_per_token_layer * cfg.n_layers * position;
        step.step_ms = msSince(ts);
        result.kv_cache_bytes = step.kv_cache_bytes;
        result.dense_kv_cache_bytes = step.dense_kv_cache_bytes;
        result.steps.push_back(step);
        if (on_step && !on_step(result.steps.back())) break;
        if (step.token_id == options.eos_id) break;
    }
    const double secs = msSince(gen_start) / 1000.0;
    result.tokens_per_second = secs > 0 ? result.generated_ids.size() / secs : 0.0;
    return result;
}

}  // namespace modscope
