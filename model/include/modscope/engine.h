// ModScope engine: the one public header of the Mixture-of-Depths engine.
//
// Plain C++ types only: no LibTorch, no Qt. The app, the views and every tool include this header and
// nothing under model/src. docs/MODEL.md specifies the model these types describe.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace modscope {

// Every failure the engine reports to its callers: a message a user can act on.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Thrown out of run()/generate() when the caller's cancel flag was raised.
class Cancelled : public Error {
public:
    Cancelled() : Error("run cancelled") {}
};

struct ModelConfig {
    std::string name = "modscope";
    int vocab_size = 2048;
    int d_model = 192;
    int n_layers = 6;
    int n_heads = 3;
    int d_ff = 512;
    int max_seq_len = 256;
    double capacity = 0.125;            // fraction of tokens a routed block processes (top-k mode)
    std::vector<int> routed_layers{1, 3, 5};
    int predictor_hidden = 64;
    double predictor_threshold = 0.5;   // causal mode: a token is processed when its probability > this
    // Causal mode's budget feedback: logits added to a token's predictor logit per token the layer is under
    // capacity × (tokens so far), counting only its own earlier decisions (docs/MODEL.md). 0: each token
    // decides alone, as in the paper.
    double predictor_budget_gain = 0.0;
    // Causal mode's prefix top-k: a token is processed only when its router logit ranks within the top
    // capacity × (tokens so far) of the sequence so far (docs/MODEL.md).
    bool predictor_prefix_topk = false;
    double rope_theta = 10000.0;
    double norm_eps = 1e-5;
    // Mixture of experts (docs/MODEL.md "Mixture layers"): the layers whose MLP is n_experts SwiGLU experts
    // behind a top-1 router. A routed layer in moe_layers is staged MoDE; a full one with noop_experts is
    // integrated MoDE. Empty: every MLP is dense (and the three fields below are not written).
    std::vector<int> moe_layers;
    int n_experts = 0;
    // Each expert takes at most ceil(factor * n / n_experts) of the n tokens that reach the mixture, and at
    // any point of the sequence ceil(factor * (tokens so far) / n_experts): see expertCapacity().
    double expert_capacity_factor = 1.25;
    int noop_experts = 0;  // router choices that skip the MLP (integrated MoDE)

    bool isRouted(int layer) const;
    bool isMoe(int layer) const;
    int routerChoices() const { return n_experts + noop_experts; }
    int headDim() const { return d_model / n_heads; }
    // Throws Error naming the first field out of range (sizes are bounded so nothing absurd allocates).
    void validate() const;
    std::int64_t parameterCount() const;

    // JSON as stored in a checkpoint's config.json. fromJson validates and names what is wrong.
    static ModelConfig fromJson(const std::string& text);
    std::string toJson() const;

    // The paper's default routing: every other layer, starting with layer 1.
    static std::vector<int> everyOtherLayer(int n_layers);
};

enum class RoutingMode { TopK, Causal };
const char* toString(RoutingMode mode);
RoutingMode routingModeFromString(const std::string& text);  // "topk" | "causal", throws Error

// k = clamp(ceil(capacity * T), 1, T): the number of tokens a routed block takes in top-k mode. Inline so that
// the views, which do not link the engine, count as it does.
inline int capacityToK(double capacity, int seq_len) {
    if (seq_len <= 0) return 0;
    if (!(capacity >= 0.0)) capacity = 0.0;  // NaN and negatives
    // The small epsilon keeps exact products such as 0.125 * 256 = 32 from rounding up through float noise.
    const double raw = std::ceil(std::min(capacity, 1.0) * seq_len - 1e-9);
    return std::clamp(static_cast<int>(raw), 1, seq_len);
}

// The most tokens one expert takes of the first n that reach a mixture layer: ceil(factor * n / experts),
// at least 1 (docs/MODEL.md "Mixture layers"). Token j (0-based, in sequence order) is taken by its expert
// when fewer than expertCapacity(j + 1) earlier tokens were, so a token's fate depends on earlier tokens only.
inline int expertCapacity(double factor, int n_experts, int n) {
    if (n <= 0 || n_experts <= 0) return 0;
    const double raw = std::ceil(factor * n / n_experts - 1e-9);
    return std::clamp(static_cast<int>(std::min(raw, double(n))), 1, n);
}

// What one layer did with every token of a run. Per-token vectors have length T (the run's tokens).
struct LayerTrace {
    int index = 0;
    bool routed = false;
    int k = 0;          // top-k size for routed layers, T for full layers
    int processed = 0;  // tokens that went through attention + MLP in this run
    std::vector<float> router_logits;          // r = w.x; empty for full layers
    std::vector<std::uint8_t> selected;        // 1 = processed in this run (top-k or predictor, per mode)
    std::vector<std::uint8_t> topk_selected;   // 1 = in the top-k of router_logits (both modes)
    std::vector<float> predictor_prob;         // causal predictor's probability; empty for full layers
    std::vector<std::uint8_t> predictor_selected;  // predictor_prob > threshold
    std::vector<int> rank;                     // rank of each token's router logit, 0 = highest
    float topk_threshold = 0.0f;               // the k-th largest router logit (routed layers)
    double capacity = -1.0;  // the capacity this routed layer ran at; < 0: the run's (RunTrace::capacity)
    // How much a routed layer changed each token: |x_out - x_in| / |x_in| (Euclidean norms over d), that is
    // |sigmoid(r) f(x)| / |x| for a token it processed and 0 for one it skipped. Empty for full layers and
    // without RunOptions::per_token_routing.
    std::vector<float> update_ratio;
    // Decision values (RunOptions::decision_values), routed layers only: for each token t, the run's summed
    // token loss with this layer's decision on t flipped, minus the summed token loss without the flip.
    // Positive: flipping hurts, so the decision was worth making. See processingValue().
    std::vector<float> decision_value;
    // Mixture layers (ModelConfig::moe_layers); the per-token vectors are empty elsewhere.
    bool moe = false;
    int n_experts = 0;
    int noop_experts = 0;
    int expert_capacity = 0;            // expertCapacity() of the tokens that reached the mixture
    std::vector<int> expert_load;       // [n_experts] tokens each expert took
    int expert_overflow = 0;            // tokens whose expert was full: their MLP did not run
    std::vector<int> expert;            // the expert that ran the token's MLP; -1: none (no-op, overflow, kept out)
    std::vector<int> expert_choice;     // the router's top choice (n_experts and above: a no-op); -1: kept out
    std::vector<float> expert_prob;     // the router's probability of expert_choice; NaN where kept out
    std::vector<int> expert_runner_up;  // its second choice; -1 where kept out or with one choice
    std::vector<float> expert_runner_up_prob;
    // Why a token's MLP did not run in a mixture layer.
    enum class ExpertFate { Ran, NoOp, Overflow, KeptOut };
    ExpertFate expertFate(int token) const {
        const auto i = static_cast<std::size_t>(token);
        if (expert[i] >= 0) return ExpertFate::Ran;
        if (expert_choice[i] < 0) return ExpertFate::KeptOut;
        return expert_choice[i] >= n_experts ? ExpertFate::NoOp : ExpertFate::Overflow;
    }
    // What processing token t in this layer is worth: the loss its skipping adds, decision_value for a token
    // the layer processed and minus it for one it skipped.
    float processingValue(int token) const {
        const auto i = static_cast<std::size_t>(token);
        return selected[i] ? decision_value[i] : -decision_value[i];
    }
    // The gate sigmoid(r) of a routed layer's token (what scales its update), from router_logits.
    float gate(int token) const {
        return 1.0f / (1.0f + std::exp(-router_logits[static_cast<std::size_t>(token)]));
    }
};

// Causal predictor against top-k membership, over the tokens of one layer.
struct Agreement {
    std::int64_t tp = 0, fp = 0, tn = 0, fn = 0;
    std::int64_t total() const { return tp + fp + tn + fn; }
    double accuracy() const;
    double precision() const;
    double recall() const;
    double balancedAccuracy() const;
    Agreement& operator+=(const Agreement& o);
    static Agreement of(const LayerTrace& layer);
};

// A routing decision set by hand (docs/MODEL.md "Interventions"): routed layer `layer` processes (process) or
// skips the token at `position`, or, with position kAllPositions, every token.
struct RoutingOverride {
    static constexpr int kAllPositions = -1;
    int layer = 0;
    int position = kAllPositions;
    bool process = false;
    bool operator==(const RoutingOverride& o) const {
        return layer == o.layer && position == o.position && process == o.process;
    }
};

struct RunTrace {
    RoutingMode mode = RoutingMode::TopK;
    double capacity = 0.0;     // the run's capacity; a layer given its own (RunOptions) has it in LayerTrace
    std::string device;
    std::string backend;       // which backend ran it: "cpu-kernels" or "ops" (Model::backend())
    std::vector<int> token_ids;
    std::vector<LayerTrace> layers;
    double flops = 0.0;        // matmul FLOPs this forward executed (docs/MODEL.md, "FLOPs")
    double dense_flops = 0.0;  // the same forward with every layer processing every token
    double elapsed_ms = 0.0;
    // Logits of the last position [vocab], or of every position [T * vocab] when asked for.
    std::vector<float> logits;
    bool all_logits = false;
    // With RunOptions::token_loss: [T], position t's loss of the next token, -log p(token t+1 | tokens <= t);
    // NaN at the last position, which has no next token.
    std::vector<float> token_loss;
    // With RunOptions::top_predictions = n: each position's n most probable next tokens, best first, and their
    // probabilities, [T * n].
    int top_n = 0;
    std::vector<int> top_ids;
    std::vector<float> top_probs;
    // The overrides the run applied (RunOptions::overrides, as given) and their semantics.
    std::vector<RoutingOverride> overrides;
    bool keep_capacity = false;
    bool decision_values = false;  // every routed layer holds LayerTrace::decision_value
};

// The decision a run's overrides forced on (layer, token): 1 process, 0 skip, -1 none. A position's override
// wins over its layer's; of two alike, the later (as the engine resolves them, docs/MODEL.md "Interventions").
// Inline so that the trace writers and the views, which do not link the engine, resolve them as it does.
inline int forcedDecision(const RunTrace& run, int layer, int token) {
    int whole = -1, single = -1;
    for (const auto& o : run.overrides) {
        if (o.layer != layer) continue;
        if (o.position == RoutingOverride::kAllPositions) whole = o.process ? 1 : 0;
        if (o.position == token) single = o.process ? 1 : 0;
    }
    return single >= 0 ? single : whole;
}

// The summed token loss of a run (its token_loss without the last position's NaN); 0 without token_loss.
inline double totalTokenLoss(const std::vector<float>& token_loss) {
    double sum = 0.0;
    for (float v : token_loss)
        if (!std::isnan(v)) sum += v;
    return sum;
}

// Of the n tokens that processing is worth most to in a routed layer (processingValue, n = the tokens the layer
// processed), how many the layer processed: "layer 3 picked 5 of its 7 most valuable tokens". Ties at the n-th
// value go to the earlier token. -1 without decision values. Inline so that the trace readers and the views,
// which do not link the engine, count as it does.
inline int valuableSelected(const LayerTrace& layer) {
    const std::size_t T = layer.selected.size();
    if (!layer.routed || layer.decision_value.size() != T) return -1;
    std::vector<int> order(T);
    for (std::size_t t = 0; t < T; ++t) order[t] = static_cast<int>(t);
    const auto key = [&](int t) {
        const float v = layer.processingValue(t);
        return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
    };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
    const auto n = static_cast<std::size_t>(std::count(layer.selected.begin(), layer.selected.end(), 1));
    int picked = 0;
    for (std::size_t i = 0; i < n && i < T; ++i) picked += layer.selected[static_cast<std::size_t>(order[i])] ? 1 : 0;
    return picked;
}

// What a mixture layer's per-token arrays add up to (LayerTrace::expert and expert_choice). Inline so that the
// trace readers and the views, which do not link the engine, count as it does.
struct MixtureCounts {
    std::vector<int> load;  // [n_experts] tokens each expert ran
    int reached = 0;        // tokens that reached the mixture (a choice other than -1)
    int noop = 0;           // ... whose top choice was a no-op
    int overflow = 0;       // ... whose expert was full
};
inline MixtureCounts countMixture(const LayerTrace& layer) {
    MixtureCounts c;
    c.load.assign(static_cast<std::size_t>(std::max(layer.n_experts, 0)), 0);
    for (std::size_t t = 0; t < layer.expert.size() && t < layer.expert_choice.size(); ++t) {
        const int choice = layer.expert_choice[t], expert = layer.expert[t];
        if (choice < 0) continue;
        ++c.reached;
        if (expert >= 0 && expert < layer.n_experts) ++c.load[static_cast<std::size_t>(expert)];
        else if (choice >= layer.n_experts) ++c.noop;
        else ++c.overflow;
    }
    return c;
}

// The capacity a routed layer ran at: its own where it was given one (RunOptions::layer_capacity), else the run's.
inline double layerCapacity(const RunTrace& run, const LayerTrace& layer) {
    return layer.capacity >= 0 ? layer.capacity : run.capacity;
}

struct RunOptions {
    RoutingMode mode = RoutingMode::TopK;
    double capacity = -1.0;          // < 0: the model's configured capacity
    // Per layer index: a routed layer's own capacity, in place of capacity (< 0 or beyond the vector's end:
    // capacity). Full layers ignore it. Values above 1 count as 1.
    std::vector<double> layer_capacity;
    enum class Logits { None, Last, All } logits = Logits::Last;
    // false: the forward alone. Each LayerTrace then holds index, routed, k and processed only (the FLOPs
    // and logits are the same); the per-token vectors stay empty, and the predictor runs only where causal
    // mode needs it. What benchmarks time when they compare forwards.
    bool per_token_routing = true;
    const std::atomic<bool>* cancel = nullptr;  // checked between layers; raises Cancelled
    // Interventions (docs/MODEL.md "Interventions"). Overrides name routed layers only (Error otherwise); of two
    // for the same cell the later wins, and one for a single position wins over its layer's kAllPositions one.
    // Exact flip (the default): a top-k layer processes its top k plus the tokens forced in, minus those forced
    // out. keep_capacity: the forced cells are fixed and the layer's other k - (forced in) places go to the
    // highest-ranked tokens not forced out. In causal mode each token not forced decides by the causal rule,
    // counting the forced decisions before it among the layer's earlier decisions; keep_capacity changes nothing
    // there.
    std::vector<RoutingOverride> overrides;
    bool keep_capacity = false;
    bool token_loss = false;   // RunTrace::token_loss
    int top_predictions = 0;   // RunTrace::top_ids and top_probs: this many per position (at most 64)
    // Every routed cell's LayerTrace::decision_value (implies token_loss): one single-flip run per cell on top of
    // the overrides, each reusing what its flip cannot change. progress (may be null) sees (cells done, cells)
    // and cancel is checked between flips.
    bool decision_values = false;
    std::function<void(int, int)> progress;
};

struct GenerationOptions {
    int max_new_tokens = 32;
    float temperature = 0.8f;   // 0 = greedy
    float top_p = 0.95f;
    std::uint64_t seed = 0;
    int eos_id = -1;            // stop when sampled; -1 = never
    const std::atomic<bool>* cancel = nullptr;
};

// One generated token: what each routed layer decided for it, and the KV cache after it.
struct GenerationStep {
    int index = 0;        // 0 for the first generated token
    int position = 0;     // its position in the whole sequence
    int token_id = 0;
    std::vector<std::uint8_t> processed;      // [n_layers] 1 = the layer processed this token
    std::vector<float> predictor_prob;        // [n_layers] NaN for full layers
    std::vector<int> expert;                  // [n_layers] the expert that ran its MLP; -1 none or no mixture
    std::int64_t kv_cache_bytes = 0;          // K/V actually stored, all layers
    std::int64_t dense_kv_cache_bytes = 0;    // a dense model's K/V for the same tokens
    double step_ms = 0.0;
};

struct GenerationResult {
    std::vector<int> prompt_ids;
    std::vector<int> generated_ids;
    std::vector<GenerationStep> steps;
    std::int64_t kv_cache_bytes = 0;
    std::int64_t dense_kv_cache_bytes = 0;
    double tokens_per_second = 0.0;
    bool cancelled = false;
};

// A token of a tokenized text, with its byte range in that text.
struct Token {
    int id = 0;
    std::string piece;
    std::size_t byte_begin = 0;
    std::size_t byte_end = 0;
};

// SentencePiece, loaded into its own linker namespace (DEVELOPERS.md: the protobuf clash).
class Tokenizer {
public:
    ~Tokenizer();
    static std::unique_ptr<Tokenizer> load(const std::string& model_path);
    std::vector<Token> encode(const std::string& text) const;
    std::vector<int> encodeIds(const std::string& text) const;
    std::string decode(const std::vector<int>& ids) const;
    std::string piece(int id) const;
    int vocabSize() const;
    int eosId() const;  // -1 when the model has none
    int bosId() const;
    std::string modelPath() const;

    struct TrainOptions {
        std::vector<std::string> input_files;
        std::string model_prefix;  // writes <prefix>.model and <prefix>.vocab
        int vocab_size = 2048;
        std::string model_type = "bpe";
        double character_coverage = 0.9995;
        std::int64_t input_sentence_size = 2000000;
        std::uint64_t seed = 1;
        int num_threads = 2;
    };
    static void train(const TrainOptions& options);

private:
    Tokenizer();
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Device choice: "auto" takes CUDA when this build and machine have it, else the CPU.
// "cuda" on a build or machine without it raises Error with the reason.
std::string resolveDevice(const std::string& requested);
bool cudaAvailable();
bool cudaCompiledIn();

// Backends: the same model on two implementations of its operations (DEVELOPERS.md, "Backends").
//   "ops"          plain LibTorch operators: any device and dtype; what CUDA runs
//   "cpu-kernels"  fused x86-64 float32 kernels and oneDNN's sgemm, for float32 models on the CPU; only in builds
//                  with the CMake option MODSCOPE_CPU_KERNELS, only once configureRuntime enabled it
//                  (RuntimeOptions::cpu_kernels), and never while MODSCOPE_CPU_KERNELS=0 is in the environment
// "auto" takes cpu-kernels where it can run, else ops.
bool cpuKernelsCompiledIn();
bool cpuKernelsEnabled();  // compiled in, enabled by configureRuntime and not turned off by the environment

// What a process sets up for the engine: one explicit call (configureRuntime), made by each of ModScope's
// executables for itself. The engine changes no process-wide state on its own: linking it or opening a model
// leaves signal masks, the allocator and thread pools as they were. The defaults change nothing.
struct RuntimeOptions {
    // LibTorch's intra-op threads (which also thread the kernel backend's products and loops); 0 leaves them.
    int threads = 0;
    // Before each run, generation step and training step, at most every 0.25 s: read the machine's load from
    // /proc/stat and give other processes the cores they are using (LibTorch's threads, at least one). A
    // parallel region waits for its slowest thread, so one preempted thread stalls every region: a 114-token run
    // took 706 ms instead of 10 ms with two busy processes beside it. Ignored while MODSCOPE_TORCH_THREADS is set.
    bool adapt_threads = false;
    // OpenBLAS at one thread, so that no second pool of threads spins beside LibTorch's for the same cores.
    bool single_thread_blas = false;
    // Keep freed heap blocks for reuse (mallopt) instead of returning them to the kernel: a forward allocates and
    // frees tensors of 0.1-50 MB by the dozen, which glibc would otherwise map and unmap at every run.
    bool keep_freed_memory = false;
    // Enables the cpu-kernels backend. Its products call oneDNN 2.6's sgemm, which corrupts the heap when a
    // signal handler runs on a thread mid-product (model/src/cpu/cpu_signals.h), so this also starts a thread
    // that runs the process's handlers of asynchronous signals (SIGINT, SIGTERM, SIGCHLD, ...), and each thread
    // that runs the kernels' products blocks those signals for good before its first one. Call it first in
    // main(), before other threads start. A process that ran the kernels passes its blocked mask on to the
    // programs it starts. No effect in a build without the kernels.
    bool cpu_kernels = false;

    // What ModScope's executables use: every core (MODSCOPE_TORCH_THREADS=N fixes N), adaptive threads,
    // single-threaded OpenBLAS, freed memory kept, and the kernel backend.
    static RuntimeOptions forTools();
};
// Applies options once per process; later calls change nothing and return false.
bool configureRuntime(const RuntimeOptions& options);
// The options in force (the defaults until configureRuntime was called).
RuntimeOptions runtimeOptions();

class Model {
public:
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    // Opens a checkpoint directory: config.json, weights.pt, tokenizer.model (docs/MODEL.md).
    // Every tensor is checked against the config; Error names what is wrong. backend: "auto", "ops" or
    // "cpu-kernels" (see cpuKernelsCompiledIn); Error where the one asked for cannot run here.
    static std::unique_ptr<Model> open(const std::string& dir, const std::string& device = "auto",
                                       const std::string& backend = "auto");
    // A model with freshly initialised weights (seeded); it has no tokenizer until one is attached.
    static std::unique_ptr<Model> create(const ModelConfig& config, std::uint64_t seed,
                                         const std::string& device = "auto", const std::string& backend = "auto");
    // Writes config.json and weights.pt atomically into dir (created if needed), and copies the
    // tokenizer model when one is attached. half_weights stores the weights as float16 (half the file; they
    // load back into float32, docs/MODEL.md).
    void save(const std::string& dir, bool half_weights = false) const;

    const ModelConfig& config() const;
    std::string device() const;         // "cpu" or "cuda:0"
    std::string backend() const;        // "cpu-kernels" or "ops"
    std::string directory() const;      // empty for a created model
    std::string weightsSha256() const;  // of weights.pt as loaded or last saved; empty otherwise
    std::int64_t parameterCount() const;
    const Tokenizer* tokenizer() const;
    void attachTokenizer(std::unique_ptr<Tokenizer> tokenizer);

    // One forward pass over ids (1 <= T <= max_seq_len) with its full routing trace.
    RunTrace run(const std::vector<int>& ids, const RunOptions& options = {}) const;

    // Autoregressive sampling in causal mode with a KV cache; on_step (may be null) sees each token as it
    // is produced and may return false to stop.
    GenerationResult generate(const std::vector<int>& prompt_ids, const GenerationOptions& options,
                              const std::function<bool(const GenerationStep&)>& on_step = {}) const;

    struct Impl;  // opaque: model/src/model_impl.h

private:
    friend struct ModelInternals;  // model/src/model_impl.h: the trainer and the engine tests reach Impl there
    Model();
    std::unique_ptr<Impl> impl_;
};

// Writes data to path through a temporary file and rename: a failure leaves any earlier file intact and
// no partial file, and raises Error saying so.
void writeFileAtomic(const std::string& path, const std::string& data);

// FLOPs of one forward (matmuls only, docs/MODEL.md "FLOPs"): processed[i] = tokens layer i processed,
// head_positions = positions whose logits were computed (-1: all of them), predictor_rows[i] = tokens whose
// predictor logit routed layer i computed (empty: every token, as a traced run does), expert_rows[i] = tokens
// an expert of mixture layer i ran (absent: every token the layer processed).
double forwardFlops(const ModelConfig& config, int seq_len, const std::vector<int>& processed,
                    int head_positions = -1, const std::vector<int>& predictor_rows = {},
                    const std::vector<int>& expert_rows = {});
double denseForwardFlops(const ModelConfig& config, int seq_len, int head_positions = -1);

}  // namespace modscope
