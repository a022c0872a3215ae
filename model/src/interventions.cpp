// Interventions (interventions.h): per-token loss, top predictions and decision values.
#include "interventions.h"

#include <algorithm>
#include <limits>

namespace modscope {

std::vector<float> tokenLosses(const torch::Tensor& logits, const std::vector<int>& ids, int first) {
    const auto n = logits.size(0);
    if (n == 0) return {};
    TORCH_CHECK(first >= 0 && first + n < static_cast<std::int64_t>(ids.size()), "token losses of positions ",
                first, "..", first + n - 1, " of ", ids.size(), " tokens");
    std::vector<std::int64_t> next(ids.begin() + first + 1, ids.begin() + first + 1 + n);
    const auto targets = torch::tensor(next, torch::kLong).to(logits.device()).unsqueeze(1);   // [n, 1]
    const auto nll = -torch::log_softmax(logits.to(torch::kFloat32), -1).gather(1, targets);  // [n, 1]
    const auto host = nll.view(-1).to(torch::kCPU).contiguous();
    return std::vector<float>(host.data_ptr<float>(), host.data_ptr<float>() + n);
}

void topPredictions(const torch::Tensor& logits, int n, RunTrace& trace) {
    n = std::min<int>(n, static_cast<int>(logits.size(1)));
    trace.top_n = n;
    trace.top_ids.clear();
    trace.top_probs.clear();
    if (n <= 0) return;
    const auto top = torch::softmax(logits.to(torch::kFloat32), -1).topk(n, -1);  // sorted, best first
    const auto probs = std::get<0>(top).to(torch::kCPU).contiguous();
    const auto ids = std::get<1>(top).to(torch::kCPU, torch::kInt32).contiguous();
    trace.top_probs.assign(probs.data_ptr<float>(), probs.data_ptr<float>() + probs.numel());
    trace.top_ids.assign(ids.data_ptr<int>(), ids.data_ptr<int>() + ids.numel());
}

namespace {

// The first n cached tokens of a run's layer as a cache of their own: appending to it copies them into new
// storage, so the run's cache stays as it was for the next flip.
nn::LayerKV cachePrefix(const nn::LayerKV& kv, std::int64_t n) {
    nn::LayerKV out;
    if (n > 0) {
        out.k = kv.k.narrow(2, 0, n);
        out.v = kv.v.narrow(2, 0, n);
    }
    return out;
}

// What a mixture layer had done with the tokens before t0 in the run: where a flip's suffix continues it.
nn::MixtureState mixtureStateAt(const LayerTrace& layer, std::int64_t t0) {
    nn::MixtureState state;
    state.taken.assign(static_cast<std::size_t>(layer.n_experts), 0);
    for (std::int64_t t = 0; t < t0; ++t) {
        const auto i = static_cast<std::size_t>(t);
        if (layer.expert_choice[i] >= 0) ++state.tokens;
        if (layer.expert[i] >= 0) ++state.taken[static_cast<std::size_t>(layer.expert[i])];
    }
    return state;
}

std::int64_t firstDifference(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
    const auto it = std::mismatch(a.begin(), a.end(), b.begin());
    return static_cast<std::int64_t>(it.first - a.begin());
}

class FlipRunner {
public:
    FlipRunner(Model::Impl& impl, const std::vector<int>& ids, const nn::ForwardOptions& fo,
               const std::vector<nn::ForcedDecisions>& forced, const CapturedRun& run, const RunTrace& trace)
        : impl_(impl), net_(*impl.net), ids_(ids), fo_(fo), forced_(forced), run_(run), trace_(trace),
          T_(static_cast<std::int64_t>(ids.size())) {
        loss_before_.assign(static_cast<std::size_t>(T_) + 1, 0.0);
        for (std::int64_t t = 0; t < T_; ++t) {
            const float v = run.token_loss[static_cast<std::size_t>(t)];
            loss_before_[static_cast<std::size_t>(t) + 1] = loss_before_[static_cast<std::size_t>(t)] + (std::isnan(v) ? 0.0 : v);
        }
    }

    double runLoss() const { return loss_before_.back(); }

    // The run's summed token loss with layer l's decision on token t flipped.
    double lossWithFlip(int l, std::int64_t t) {
        const auto& base = trace_.layers[static_cast<std::size_t>(l)];
        nn::ForcedDecisions flipped = forced_[static_cast<std::size_t>(l)];
        if (flipped.empty()) flipped.assign(static_cast<std::size_t>(T_), nn::kFree);
        flipped[static_cast<std::size_t>(t)] = base.selected[static_cast<std::size_t>(t)] ? nn::kSkip : nn::kProcess;
        const auto& r = run_.routing[static_cast<std::size_t>(l)];
        auto selection = select(l, r.router_logits, r.predictor_logits, flipped.data());
        std::int64_t t0 = firstDifference(selection, base.selected);
        if (t0 == T_) return runLoss();  // a flip the selection cannot show (keep capacity at k = T)

        auto x = run_.residuals[static_cast<std::size_t>(l)].narrow(1, t0, T_ - t0).contiguous().clone();  // [1, n, d]
        for (int li = l; li < static_cast<int>(net_.blocks.size()); ++li) {
            auto& block = *net_.blocks[static_cast<std::size_t>(li)];
            const auto& layer = trace_.layers[static_cast<std::size_t>(li)];
            const auto& captured = run_.routing[static_cast<std::size_t>(li)];
            torch::Tensor router;  // [1, T]: the run's logits before t0, this flip's from t0 on
            if (block.routed && li != l) {
                router = torch::cat({captured.router_logits.narrow(1, 0, t0), block.routerLogits(x)}, 1);
                torch::Tensor predictor;
                if (fo_.mode == RoutingMode::Causal)
                    predictor = torch::cat({captured.predictor_logits.narrow(1, 0, t0), block.predictor(x)}, 1);
                const auto& f = forced_[static_cast<std::size_t>(li)];
                selection = select(li, router, predictor, f.empty() ? nullptr : f.data());
                // A top-k layer may change its mind about a token before t0 (one after it crossed the k-th
                // logit): that token and every one after it then change from this layer on.
                const auto p = std::min(firstDifference(selection, layer.selected), t0);
                if (p < t0) {
                    x = torch::cat({run_.residuals[static_cast<std::size_t>(li)].narrow(1, p, t0 - p), x}, 1);
                    t0 = p;
                }
            } else if (block.routed) {
                router = captured.router_logits;
            }
            const auto n = T_ - t0;
            if (block.routed) {
                std::vector<std::int64_t> local;  // the suffix's processed tokens, as offsets from t0
                std::int64_t before = 0;          // the run's processed tokens before t0: the cache's prefix
                for (std::int64_t p = 0; p < T_; ++p) {
                    if (!selection[static_cast<std::size_t>(p)]) continue;
                    if (p < t0)
                        ++before;
                    else
                        local.push_back(p - t0);
                }
                if (local.empty()) continue;
                auto kv = cachePrefix(run_.kv[static_cast<std::size_t>(li)], before);
                if (block.moe) kv.mixture = mixtureStateAt(layer, t0);
                auto idx = torch::tensor(local, torch::kLong).to(x.device()).unsqueeze(0);  // [1, c]
                const auto xs = nn::gatherRows(x, idx);                                      // [1, c, d]
                const auto delta = block.delta(xs, idx + t0, net_.positions, &kv);
                nn::addGatedRows(x, idx, router.narrow(1, t0, n).contiguous(), delta);
            } else {
                auto kv = cachePrefix(run_.kv[static_cast<std::size_t>(li)], t0);
                if (block.moe) kv.mixture = mixtureStateAt(layer, t0);
                const auto pos = torch::arange(t0, T_, torch::TensorOptions().dtype(torch::kLong).device(x.device()))
                                     .unsqueeze(0);
                x.add_(block.delta(x, pos, net_.positions, &kv));
            }
        }
        double loss = loss_before_[static_cast<std::size_t>(t0)];
        if (T_ - t0 > 1) {
            const auto h = net_.norm_f(x)[0].narrow(0, 0, T_ - t0 - 1);  // [n - 1, d]: the last has no target
            for (float v : tokenLosses(net_.logits(h), ids_, static_cast<int>(t0))) loss += v;
        }
        return loss;
    }

private:
    // Layer li's selection [T] from its router logits and (causal mode) predictor logits [1, T], as the forward
    // decides it.
    std::vector<std::uint8_t> select(int li, const torch::Tensor& router, const torch::Tensor& predictor,
                                     const std::int8_t* forced) const {
        std::vector<std::uint8_t> out(static_cast<std::size_t>(T_), 0);
        if (fo_.mode == RoutingMode::Causal) {
            const auto mask =
                nn::causalSelection(predictor, router, fo_.causalRule(static_cast<std::size_t>(li)), nullptr, forced)
                    .to(torch::kCPU)
                    .contiguous();
            std::copy(mask.data_ptr<bool>(), mask.data_ptr<bool>() + T_, out.begin());
            return out;
        }
        const auto k = capacityToK(fo_.capacityOf(static_cast<std::size_t>(li)), static_cast<int>(T_));
        const auto top = nn::topkIndices(router, k);  // [1, k]
        if (forced != nullptr) {
            for (auto p : nn::forcedTopk(router, top, k, forced, fo_.keep_capacity)) out[static_cast<std::size_t>(p)] = 1;
            return out;
        }
        const auto host = top.to(torch::kCPU).contiguous();
        for (std::int64_t i = 0; i < host.size(1); ++i) out[static_cast<std::size_t>(host.data_ptr<std::int64_t>()[i])] = 1;
        return out;
    }

    Model::Impl& impl_;
    nn::ModTransformerImpl& net_;
    const std::vector<int>& ids_;
    const nn::ForwardOptions& fo_;
    const std::vector<nn::ForcedDecisions>& forced_;
    const CapturedRun& run_;
    const RunTrace& trace_;
    std::int64_t T_;
    std::vector<double> loss_before_;  // [T + 1]: the run's summed loss of the positions before t
};

}  // namespace

void computeDecisionValues(Model::Impl& impl, const std::vector<int>& ids, const nn::ForwardOptions& run_options,
                           const std::vector<nn::ForcedDecisions>& forced, const CapturedRun& run, RunTrace& trace,
                           const std::function<void(int, int)>& progress, const std::atomic<bool>* cancel) {
    FlipRunner flips(impl, ids, run_options, forced, run, trace);
    const auto T = static_cast<int>(ids.size());
    int cells = 0;
    for (const auto& layer : trace.layers) cells += layer.routed ? T : 0;
    int done = 0;
    if (progress) progress(0, cells);
    for (auto& layer : trace.layers) {
        if (!layer.routed) continue;
        layer.decision_value.assign(static_cast<std::size_t>(T), 0.0f);
        for (int t = 0; t < T; ++t) {
            if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) throw Cancelled();
            layer.decision_value[static_cast<std::size_t>(t)] =
                static_cast<float>(flips.lossWithFlip(layer.index, t) - flips.runLoss());
            if (progress) progress(++done, cells);
        }
    }
    trace.decision_values = true;
}

}  // namespace modscope
