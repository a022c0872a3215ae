// The engine's measurements for modscope-bench (profiling.h): each layer's time inside the forward, the
// stage-by-stage timing of one routed layer, the matmul peak and the build information.
//
// A routed layer's stages are the steps of ModTransformerImpl::hidden (nn/transformer.cpp) called one after
// another on the model's own modules, with a clock read between them: timed here rather than instrumented
// there. The layers' times are hidden()'s own, a clock read between layers when ForwardOptions::layer_ms
// asks.
#include "modscope/profiling.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/version.h>
#ifdef MODSCOPE_CPU_KERNELS
#include <dnnl.h>

#include "cpu/cpu_matmul.h"
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <regex>
#include <string>
#include <vector>

#include "adaptive_threads.h"
#include "model_impl.h"

namespace modscope {

namespace {

double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const auto n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double quantile(std::vector<double> v, double q) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const double pos = q * double(v.size() - 1);
    const auto lo = static_cast<std::size_t>(pos);
    const auto hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

// Times fn reps times (after one untimed call that warms caches and allocator) and returns each call's ms.
template <typename Fn>
std::vector<double> timeCalls(int reps, Fn&& fn) {
    fn();
    std::vector<double> ms;
    ms.reserve(reps);
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        ms.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return ms;
}

void checkSeqLen(const ModelConfig& cfg, int seq_len) {
    if (seq_len < 1 || seq_len > cfg.max_seq_len)
        throw Error("sequence length " + std::to_string(seq_len) + " outside 1.." +
                    std::to_string(cfg.max_seq_len));
}

}  // namespace

LayerProfile profileLayers(const Model& model, int seq_len, int reps, double capacity, std::uint64_t seed) {
    auto& impl = internals(model);
    backend::Use use(*impl.backend);
    const auto& cfg = impl.config;
    if (!impl.device.is_cpu()) throw Error("profileLayers times CPU models only, not " + model.device());
    checkSeqLen(cfg, seq_len);
    reps = std::max(reps, 1);
    const double cap = capacity < 0 ? cfg.capacity : std::min(capacity, 1.0);

    torch::InferenceMode guard;
    torch::manual_seed(seed);
    const auto ids = torch::randint(cfg.vocab_size, {1, seq_len}, torch::TensorOptions().dtype(torch::kLong));
    nn::ForwardOptions options;  // top-k, nothing collected: Model::run's forward without a trace
    options.capacity = cap;
    std::vector<double> layer_ms;
    options.layer_ms = &layer_ms;

    LayerProfile p;
    p.seq_len = seq_len;
    p.reps = reps;
    p.capacity = cap;
    for (int i = 0; i < cfg.n_layers; ++i)
        p.tokens.push_back(cfg.isRouted(i) ? static_cast<int>(capacityToK(cap, seq_len)) : seq_len);
    auto& per_layer = p.layer_samples_ms;
    per_layer.assign(static_cast<std::size_t>(cfg.n_layers), {});
    auto& whole = p.forward_samples_ms;
    using Clock = std::chrono::steady_clock;
    for (int i = -1; i < reps; ++i) {  // i = -1: warm-up
        const auto t0 = Clock::now();
        (void)impl.net->hidden(ids, options);
        const auto t1 = Clock::now();
        if (i < 0) continue;
        whole.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        for (std::size_t l = 0; l < per_layer.size() && l < layer_ms.size(); ++l)
            per_layer[l].push_back(layer_ms[l]);
    }
    for (const auto& v : per_layer) p.layer_ms.push_back(median(v));
    p.forward_ms = median(whole);
    return p;
}

RoutedLayerProfile profileRoutedLayer(const Model& model, int seq_len, int reps, double capacity, int layer,
                                      std::uint64_t seed) {
    auto& impl = internals(model);
    backend::Use use(*impl.backend);
    const auto& cfg = impl.config;
    if (layer < 0) {
        if (cfg.routed_layers.empty()) throw Error("the model has no routed layer to profile");
        layer = *std::min_element(cfg.routed_layers.begin(), cfg.routed_layers.end());
    }
    if (layer >= cfg.n_layers || !cfg.isRouted(layer))
        throw Error("layer " + std::to_string(layer) + " is not routed");
    checkSeqLen(cfg, seq_len);
    reps = std::max(reps, 1);

    torch::InferenceMode guard;
    auto& block = *impl.net->blocks[static_cast<std::size_t>(layer)];
    const auto& positions = impl.net->positions;
    const double cap = capacity < 0 ? cfg.capacity : std::min(capacity, 1.0);
    const auto k = capacityToK(cap, seq_len);
    nn::ForwardOptions causal;
    causal.capacity = cap;
    causal.setCausalRule(cfg);
    const auto rule = causal.causalRule();

    // The layer's input: what the layers before it make of seeded random ids.
    torch::manual_seed(seed);
    const auto opts = torch::TensorOptions().device(impl.device);
    const auto ids = torch::randint(cfg.vocab_size, {1, seq_len}, opts.dtype(torch::kLong));
    std::vector<torch::Tensor> residuals;  // [i]: the input of layer i
    nn::ForwardOptions before;
    before.capacity = cap;
    before.residuals = &residuals;
    (void)impl.net->hidden(ids, before);
    const auto x = residuals[static_cast<std::size_t>(layer)].contiguous();  // [1, T, d]
    // hidden() updates x in place; the stages run on this copy, refreshed from x before each pass.
    auto work = x.clone();

    RoutedLayerProfile p;
    p.layer = layer;
    p.seq_len = seq_len;
    p.k = static_cast<int>(k);
    p.reps = reps;
    // Each repetition runs the routed layer as hidden() does, with a clock read between stages, so each stage
    // finds the caches as the forward leaves them: x just written by the layer before (the copy), the
    // selected rows just read by the router. Timed alone in turn instead, the gather read x back from L3
    // after the block had evicted it: 7.4 us against 3.1 in sequence at T = 512 (the router and causal
    // selection came within 15% of their figures in sequence, the gated scatter 20% under).
    enum Stage { kRouter, kTopk, kPredictor, kCausal, kGather, kBlock, kScatter, kLayer, kStages };
    std::vector<double> ms[kStages];
    using Clock = std::chrono::steady_clock;
    const auto between = [](Clock::time_point a, Clock::time_point b) {
        return std::chrono::duration<double, std::milli>(b - a).count();
    };
    for (int i = -1; i < reps; ++i) {  // i = -1: warm-up
        // Top-k mode with the routing collected for a trace (Model::run): the predictor reads every token.
        work.copy_(x);
        const auto t0 = Clock::now();
        const auto r = block.routerLogits(work);
        const auto t1 = Clock::now();
        const auto idx = nn::topkIndices(r, k);
        const auto t2 = Clock::now();
        (void)block.predictor(work);
        const auto t3 = Clock::now();
        const auto xs = nn::gatherRows(work, idx);
        const auto t4 = Clock::now();
        const auto delta = block.delta(xs, idx, positions);
        const auto t5 = Clock::now();
        nn::addGatedRows(work, idx, r, delta);
        const auto t6 = Clock::now();
        // Causal mode's selection where top-k mode's stands, after the router on a fresh x.
        work.copy_(x);
        const auto r_causal = block.routerLogits(work);
        std::vector<torch::Tensor> selected;
        const auto c0 = Clock::now();
        (void)nn::causalRouting(block, work, r_causal, rule, nullptr, &selected);
        const auto c1 = Clock::now();
        if (i < 0) continue;
        ms[kRouter].push_back(between(t0, t1));
        ms[kTopk].push_back(between(t1, t2));
        ms[kPredictor].push_back(between(t2, t3));
        ms[kGather].push_back(between(t3, t4));
        ms[kBlock].push_back(between(t4, t5));
        ms[kScatter].push_back(between(t5, t6));
        ms[kLayer].push_back(between(t0, t6));
        ms[kCausal].push_back(between(c0, c1));
    }
    p.router_ms = median(ms[kRouter]);
    p.topk_ms = median(ms[kTopk]);
    p.predictor_ms = median(ms[kPredictor]);
    p.causal_select_ms = median(ms[kCausal]);
    p.gather_ms = median(ms[kGather]);
    p.block_ms = median(ms[kBlock]);
    p.scatter_ms = median(ms[kScatter]);
    const auto& whole = ms[kLayer];
    p.layer_ms = median(whole);
    p.layer_p10_ms = quantile(whole, 0.1);
    p.layer_p90_ms = quantile(whole, 0.9);
    return p;
}

MatmulPeak measureMatmulPeak(int n, int reps, MatmulLibrary library) {
    torch::InferenceMode guard;
    torch::manual_seed(7);
    const auto a = torch::randn({n, n});
    const auto b = torch::randn({n, n});
    auto c = torch::empty({n, n});
    MatmulPeak m;
    // Into a preallocated output: no allocation in the timed loop, only the product.
    std::vector<double> ms;
    if (library == MatmulLibrary::Engine) {
#ifdef MODSCOPE_CPU_KERNELS
        // oneDNN's sgemm is only safe where configureRuntime enabled the kernels (their signal shield).
        if (!cpuKernelsEnabled()) throw Error("the kernel backend is off here, so there is no oneDNN sgemm to time");
        m.threads = at::get_num_threads();
        ms = timeCalls(std::max(reps, 1), [&] { cpu::gemmInto(a, b, c, 0.f); });
#else
        throw Error("this build has no kernel backend (MODSCOPE_CPU_KERNELS=OFF), so no oneDNN sgemm to time");
#endif
    } else {
        using cpu::openBlasThreads, cpu::setOpenBlasThreads;
        const int before = openBlasThreads();
        if (before == 0) throw Error("the BLAS LibTorch loaded is not OpenBLAS");
        setOpenBlasThreads(cpu::allCores());
        m.threads = openBlasThreads();
        try {
            ms = timeCalls(std::max(reps, 1), [&] { torch::mm_out(c, a, b); });
        } catch (...) {
            setOpenBlasThreads(before);
            throw;
        }
        setOpenBlasThreads(before);
    }
    m.library = library;
    m.n = n;
    m.reps = static_cast<int>(ms.size());
    m.best_ms = *std::min_element(ms.begin(), ms.end());
    m.median_ms = median(ms);
    const double flops = 2.0 * double(n) * double(n) * double(n);
    m.best_gflops = flops / (m.best_ms * 1e6);
    m.median_gflops = flops / (m.median_ms * 1e6);
    return m;
}

EngineBuildInfo engineBuildInfo() {
    EngineBuildInfo info;
    info.torch_version = TORCH_VERSION;
    const std::string config = at::show_config();
    std::smatch m;
    if (std::regex_search(config, m, std::regex("BLAS_INFO=([^,\\s]+)")))
        info.blas = m[1];
    else
        info.blas = "unknown";
    info.torch_threads = at::get_num_threads();
    info.openblas_threads_now = cpu::openBlasThreads();
    // The kernel backend's products are oneDNN's sgemm; the ops backend's, LibTorch's own (OpenBLAS here).
    info.matmul_library = "LibTorch (at::mm)";
#ifdef MODSCOPE_CPU_KERNELS
    if (cpuKernelsEnabled())
        info.matmul_library = "oneDNN " + std::to_string(dnnl_version()->major) + "." +
                              std::to_string(dnnl_version()->minor) + "." +
                              std::to_string(dnnl_version()->patch) + " sgemm";
#endif
    if (const char* env = std::getenv("OPENBLAS_NUM_THREADS")) info.openblas_threads = env;
    return info;
}

}  // namespace modscope
