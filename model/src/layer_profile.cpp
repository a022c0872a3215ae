// Each layer's time inside the forward (profiling.h, profileLayers).
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "model_impl.h"
#include "modscope/profiling.h"

namespace modscope {

namespace {

double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const auto n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

LayerProfile profileLayers(const Model& model, int seq_len, int reps, double capacity, std::uint64_t seed) {
    auto& impl = model.impl();
    const auto& cfg = impl.config;
    if (!impl.device.is_cpu()) throw Error("profileLayers times CPU models only, not " + model.device());
    if (seq_len < 1 || seq_len > cfg.max_seq_len)
        throw Error("sequence length " + std::to_string(seq_len) + " outside 1.." +
                    std::to_string(cfg.max_seq_len));
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
        for (std::size_t l = 0; l < per_layer.size() && l < layer_ms.size(); ++l) per_layer[l].push_back(layer_ms[l]);
    }
    for (const auto& v : per_layer) p.layer_ms.push_back(median(v));
    p.forward_ms = median(whole);
    return p;
}

}  // namespace modscope
