// Routing (routing.h): top-k and causal selection, and a routed block run on its selected tokens.
#include "nn/routing.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace modscope::nn {

torch::Tensor topkIndices(const torch::Tensor& router_logits, std::int64_t k) {
    return backend::current().topkIndices(router_logits, k);
}

torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& idx) {
    return backend::current().gatherRows(x, idx);
}

torch::Tensor scatterRows(const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& rows) {
    const auto B = x.size(0), T = x.size(1), d = x.size(2);
    const auto flat = backend::flatRows(idx, T);
    return x.reshape({B * T, d}).index_copy(0, flat, rows.reshape({-1, d})).view({B, T, d});
}

void addGatedRows(torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& router_logits,
                  const torch::Tensor& delta) {
    backend::current().addGatedRows(x, idx, router_logits, delta);
}

namespace {

// |sigmoid(r_t) f(x)_t| / |x_t| for the k processed rows, scattered into [B, T] zeros. On the CPU in float32 a
// loop over those k rows alone: the operators' dispatch would cost more than the arithmetic here.
torch::Tensor routedUpdateRatio(const torch::Tensor& xs, const torch::Tensor& delta, const torch::Tensor& router_logits,
                                const torch::Tensor& idx) {
    torch::NoGradGuard no_grad;
    const auto B = xs.size(0), k = xs.size(1), d = xs.size(2), T = router_logits.size(1);
    auto out = torch::zeros({B, T}, router_logits.options().requires_grad(false));
    const bool fast = xs.device().is_cpu() && xs.scalar_type() == torch::kFloat32 &&
                      delta.scalar_type() == torch::kFloat32 && router_logits.scalar_type() == torch::kFloat32;
    if (!fast) {
        const auto gate = torch::sigmoid(router_logits.detach().gather(1, idx));
        const auto r = gate * delta.detach().norm(2, -1) / xs.detach().norm(2, -1).clamp_min(1e-30);
        return out.scatter_(1, idx, r.to(out.scalar_type()));
    }
    const auto xc = xs.detach().contiguous(), dc = delta.detach().contiguous();
    const auto rc = router_logits.detach().contiguous();
    const auto ic = idx.to(torch::kLong).contiguous();
    const float *xp = xc.data_ptr<float>(), *dp = dc.data_ptr<float>(), *rp = rc.data_ptr<float>();
    const std::int64_t* ip = ic.data_ptr<std::int64_t>();
    float* op = out.data_ptr<float>();
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t i = 0; i < k; ++i) {
            const float* xr = xp + (b * k + i) * d;
            const float* dr = dp + (b * k + i) * d;
            float xx[4] = {0, 0, 0, 0}, dd[4] = {0, 0, 0, 0};  // independent sums: vectorisable
            std::int64_t j = 0;
            for (; j + 4 <= d; j += 4)
                for (int l = 0; l < 4; ++l) xx[l] += xr[j + l] * xr[j + l], dd[l] += dr[j + l] * dr[j + l];
            float sx = (xx[0] + xx[1]) + (xx[2] + xx[3]), sd = (dd[0] + dd[1]) + (dd[2] + dd[3]);
            for (; j < d; ++j) sx += xr[j] * xr[j], sd += dr[j] * dr[j];
            const std::int64_t t = ip[b * k + i];
            const float gate = 1.0f / (1.0f + std::exp(-rp[b * T + t]));
            op[b * T + t] = gate * std::sqrt(sd) / std::max(std::sqrt(sx), 1e-30f);
        }
    return out;
}

}  // namespace

MixtureRouting spreadMixture(const MixtureRouting& selected, const torch::Tensor& idx, std::int64_t T) {
    const auto B = idx.size(0);
    const auto opts = idx.options().dtype(torch::kLong);
    const auto fopts = selected.prob.defined() ? selected.prob.options() : idx.options().dtype(torch::kFloat32);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    MixtureRouting all;
    all.choice = torch::full({B, T}, std::int64_t{-1}, opts);
    all.second = torch::full({B, T}, std::int64_t{-1}, opts);
    all.expert = torch::full({B, T}, std::int64_t{-1}, opts);
    all.prob = torch::full({B, T}, nan, fopts);
    all.second_prob = torch::full({B, T}, nan, fopts);
    if (idx.size(1) > 0) {
        all.choice.scatter_(1, idx, selected.choice);
        all.second.scatter_(1, idx, selected.second);
        all.expert.scatter_(1, idx, selected.expert);
        all.prob.scatter_(1, idx, selected.prob.detach());
        all.second_prob.scatter_(1, idx, selected.second_prob.detach());
    }
    all.balance_loss = selected.balance_loss;
    all.expert_rows = selected.expert_rows;
    all.tokens = selected.tokens;
    return all;
}

MixtureRouting catMixture(const std::vector<MixtureRouting>& rows) {
    MixtureRouting all;
    std::vector<torch::Tensor> choice, prob, second, second_prob, expert;
    for (const auto& r : rows) {
        choice.push_back(r.choice);
        prob.push_back(r.prob);
        second.push_back(r.second);
        second_prob.push_back(r.second_prob);
        expert.push_back(r.expert);
        all.expert_rows += r.expert_rows;
        all.tokens += r.tokens;
    }
    all.choice = torch::cat(choice, 0);
    all.prob = torch::cat(prob, 0);
    all.second = torch::cat(second, 0);
    all.second_prob = torch::cat(second_prob, 0);
    all.expert = torch::cat(expert, 0);
    return all;
}

torch::Tensor processSelected(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                              const torch::Tensor& idx, const PositionTables& positions, LayerKV* kv,
                              bool in_place, torch::Tensor* update_ratio, MixtureRouting* mixture) {
    if (!block.moe) mixture = nullptr;
    if (idx.size(1) == 0) {
        if (mixture != nullptr) *mixture = spreadMixture({}, idx, router_logits.size(1));
        if (update_ratio != nullptr) *update_ratio = torch::zeros(router_logits.sizes(), router_logits.options());
        if (kv != nullptr) {
            const auto B = x.size(0);
            const auto H = block.attn->n_heads, hd = block.attn->head_dim;
            kv->k = torch::zeros({B, H, 0, hd}, x.options());
            kv->v = torch::zeros({B, H, 0, hd}, x.options());
        }
        return x;
    }
    const auto xs = gatherRows(x, idx);  // [B, k, d]
    // A token keeps its own position: the selected positions are the indices themselves.
    MixtureRouting selected_mixture;
    const auto delta = block.delta(xs, idx, positions, kv, mixture != nullptr ? &selected_mixture : nullptr);
    if (mixture != nullptr) *mixture = spreadMixture(selected_mixture, idx, router_logits.size(1));
    // Before the update below, which may write into xs.
    if (update_ratio != nullptr) *update_ratio = routedUpdateRatio(xs, delta, router_logits, idx);
    if (in_place) {
        auto target = x;  // a handle to x's storage, which addGatedRows writes (it checks the conditions)
        addGatedRows(target, idx, router_logits, delta);
        return x;
    }
    const auto gate = torch::sigmoid(router_logits.gather(1, idx)).unsqueeze(-1);  // [B, k, 1]
    // Without autograd xs is this call's own copy and nothing reads it after delta(): update it in place.
    const auto updated = torch::GradMode::is_enabled() ? xs + gate * delta : xs.addcmul_(gate, delta);
    return scatterRows(x, idx, updated);
}

bool CausalRule::decide(double predictor_logit, std::int64_t position, std::int64_t processed_before,
                        std::int64_t higher_before) const {
    if (prefix_topk && !inPrefixTopk(capacity, position, higher_before)) return false;
    return passes(predictor_logit, position, processed_before);
}

bool CausalRule::passes(double predictor_logit, std::int64_t position, std::int64_t processed_before) const {
    const double shortfall = capacity * double(position + 1) - double(processed_before);
    return 1.0 / (1.0 + std::exp(-(predictor_logit + budget_gain * shortfall))) > threshold;
}

std::int64_t countAbove(const std::vector<float>& history, float value) {
    // NaN counts as -inf, as in prefixTopkCandidates, so a generation step ranks a token as the full forward
    // does.
    const float at = rankKey(value);
    return std::count_if(history.begin(), history.end(), [&](float h) { return rankKey(h) > at; });
}

std::vector<std::int64_t> prefixTopkCandidates(const float* logits, std::int64_t T, double capacity) {
    std::vector<std::int64_t> out;
    out.reserve(static_cast<std::size_t>(T));
    walkPrefixTopk(logits, T, capacity, [&out](std::int64_t t) { out.push_back(t); });
    return out;
}

namespace {

torch::Tensor cpuFloat(const torch::Tensor& t) {
    if (t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && !t.requires_grad())
        return t;  // already what the loops below read: three dispatches saved per routed layer
    return t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
}

// t on device, where it was made on the CPU.
torch::Tensor onDevice(const torch::Tensor& t, const torch::Device& device) {
    return device.is_cpu() ? t : t.to(device);
}

// rule.passes() for a token that the prefix top-k lets through. sigmoid(v) > threshold is
// v > log(threshold / (1 - threshold)): one comparison per token where passes() takes an exp. Within 1e-6 of
// that point passes() itself decides, so the decisions stay a generation step's, whose rule.decide() calls
// it.
class RulePasses {
public:
    explicit RulePasses(const CausalRule& rule)
        : rule_(rule),
          inside_(rule.threshold > 0.0 && rule.threshold < 1.0),
          point_(inside_ ? std::log(rule.threshold / (1.0 - rule.threshold)) : 0.0),
          near_(1e-6 * (1.0 + std::abs(point_))) {}
    // Token t with predictor logit l after n processed tokens.
    bool operator()(double l, std::int64_t t, std::int64_t n) const {
        const double v = l + rule_.budget_gain * (rule_.capacity * double(t + 1) - double(n));
        return inside_ && std::abs(v - point_) > near_ ? v > point_ : rule_.passes(l, t, n);
    }

private:
    const CausalRule& rule_;
    bool inside_;
    double point_, near_;
};

// The rule along one row of T tokens, in order: each decision depends on the ones before it, the same
// arithmetic as a generation step's. candidates[0, n_candidates): the prefix top-k's, ascending (unused
// without it); logit(): the predictor logit of the next token that can be processed, asked once per such
// token, in order.
template <typename Logit>
void decideRow(const CausalRule& rule, std::int64_t T, const std::int64_t* candidates,
               std::size_t n_candidates, Logit&& logit, bool* sel, const std::int8_t* forced = nullptr) {
    const RulePasses passes(rule);
    std::int64_t n = 0;
    std::size_t next = 0;
    for (std::int64_t t = 0; t < T; ++t) {
        bool open = true;
        if (rule.prefix_topk) {
            open = next < n_candidates && candidates[next] == t;
            next += open ? 1 : 0;
        }
        if (forced != nullptr && forced[t] != kFree)
            sel[t] = forced[t] == kProcess;
        else
            sel[t] = open && passes(logit(t), t, n);
        n += sel[t] ? 1 : 0;
    }
}

// decideRow with the prefix top-k, visiting its candidates only: every other token is skipped and leaves the
// count of processed tokens as it is, so each candidate's decision is decideRow's. sel [T] is written whole;
// the processed positions go to chosen (room for n_candidates), ascending; returns how many.
template <typename Logit>
std::int64_t decideCandidates(const CausalRule& rule, std::int64_t T, const std::int64_t* candidates,
                              std::size_t n_candidates, Logit&& logit, bool* sel, std::int64_t* chosen) {
    const RulePasses passes(rule);
    std::fill(sel, sel + T, false);
    std::int64_t n = 0;
    for (std::size_t i = 0; i < n_candidates; ++i) {
        const auto t = candidates[i];
        sel[t] = passes(logit(t), t, n);
        if (sel[t]) chosen[n++] = t;
    }
    return n;
}

// Positions [n] as a [1, n] int64 row on device: a row's selection as the forward takes it.
torch::Tensor positionsRow(const std::int64_t* positions, std::int64_t n, const torch::Device& device) {
    auto row = torch::empty({1, n}, torch::kLong);
    std::copy(positions, positions + n, row.data_ptr<std::int64_t>());
    return onDevice(row, device);
}

// Each row's selected positions (ascending) as [1, n_b] int64 on device.
void selectedRows(const torch::Tensor& mask, const torch::Device& device, std::vector<torch::Tensor>* out) {
    if (out == nullptr) return;
    const auto B = mask.size(0), T = mask.size(1);
    out->clear();
    const bool* m = mask.data_ptr<bool>();
    std::vector<std::int64_t> rows;
    for (std::int64_t b = 0; b < B; ++b) {
        rows.clear();
        for (std::int64_t t = 0; t < T; ++t)
            if (m[b * T + t]) rows.push_back(t);
        out->push_back(positionsRow(rows.data(), static_cast<std::int64_t>(rows.size()), device));
    }
}

}  // namespace

torch::Tensor causalSelection(const torch::Tensor& predictor_logits, const torch::Tensor& router_logits,
                              const CausalRule& rule, std::vector<torch::Tensor>* selected,
                              const std::int8_t* forced) {
    const auto logits = cpuFloat(predictor_logits);
    const auto router = cpuFloat(router_logits);
    const auto B = logits.size(0), T = logits.size(1);
    TORCH_CHECK(forced == nullptr || B == 1, "forced decisions apply to one row");
    auto out = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBool));
    std::vector<std::int64_t> candidates;
    for (std::int64_t b = 0; b < B; ++b) {
        if (rule.prefix_topk)
            candidates = prefixTopkCandidates(router.data_ptr<float>() + b * T, T, rule.capacity);
        const float* row = logits.data_ptr<float>() + b * T;
        const auto logit = [row](std::int64_t t) { return double(row[t]); };
        decideRow(rule, T, candidates.data(), candidates.size(), logit, out.data_ptr<bool>() + b * T, forced);
    }
    selectedRows(out, predictor_logits.device(), selected);
    return onDevice(out, predictor_logits.device());
}

torch::Tensor causalRouting(BlockImpl& block, const torch::Tensor& x, const torch::Tensor& router_logits,
                            const CausalRule& rule, std::int64_t* predictor_rows,
                            std::vector<torch::Tensor>* selected) {
    if (!rule.prefix_topk) {
        if (predictor_rows != nullptr) *predictor_rows = x.size(0) * x.size(1);
        return causalSelection(block.predictor(x.detach()), router_logits, rule, selected);
    }
    // A token outside the router's top k of the tokens so far is skipped whatever the predictor says, so the
    // predictor reads only the others: about capacity x T rows instead of T.
    const auto router = cpuFloat(router_logits);
    const auto B = router.size(0), T = router.size(1);
    const auto& be = backend::current();
    const auto input = x.requires_grad() ? x.detach() : x;
    auto out = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kBool));
    thread_local std::vector<std::int64_t> candidates, chosen;
    thread_local std::vector<float> logits;
    chosen.resize(static_cast<std::size_t>(T));
    if (selected != nullptr) selected->clear();
    std::int64_t read = 0;
    for (std::int64_t b = 0; b < B; ++b) {
        be.prefixCandidateLogits(block.predictor->weights(), input, b, router.data_ptr<float>() + b * T,
                                 rule.capacity, candidates, logits);
        const float* logit = logits.data();
        const auto next_logit = [&logit](std::int64_t) { return double(*logit++); };
        const auto n = decideCandidates(rule, T, candidates.data(), candidates.size(), next_logit,
                                        out.data_ptr<bool>() + b * T, chosen.data());
        read += static_cast<std::int64_t>(candidates.size());
        if (selected != nullptr) selected->push_back(positionsRow(chosen.data(), n, router_logits.device()));
    }
    if (predictor_rows != nullptr) *predictor_rows = read;
    return onDevice(out, router_logits.device());
}

std::vector<std::int64_t> forcedTopk(const torch::Tensor& router_logits, const torch::Tensor& topk_idx, std::int64_t k,
                                     const std::int8_t* forced, bool keep_capacity) {
    const auto T = router_logits.size(1);
    TORCH_CHECK(router_logits.size(0) == 1, "forced decisions apply to one row");
    const auto r = router_logits[0].detach().to(torch::kCPU, torch::kFloat32).contiguous();
    const auto top = topk_idx[0].to(torch::kCPU, torch::kLong).contiguous();
    std::unique_ptr<bool[]> in_topk(new bool[static_cast<std::size_t>(T)]());
    for (std::int64_t i = 0; i < top.size(0); ++i) in_topk[top.data_ptr<std::int64_t>()[i]] = true;
    return forcedTopk(r.data_ptr<float>(), in_topk.get(), T, k, forced, keep_capacity);
}

}  // namespace modscope::nn

namespace modscope::nn {

std::vector<ForcedDecisions> resolveOverrides(const ModelConfig& config, const std::vector<RoutingOverride>& overrides,
                                              std::int64_t T) {
    std::vector<ForcedDecisions> forced(static_cast<std::size_t>(config.n_layers));
    // Whole-layer overrides first, so that a single position's wins whatever the order given.
    for (int pass = 0; pass < 2; ++pass)
        for (const auto& o : overrides) {
            if (o.layer < 0 || o.layer >= config.n_layers)
                throw Error("override of layer " + std::to_string(o.layer) + ": the model has layers 0-" +
                            std::to_string(config.n_layers - 1));
            if (!config.isRouted(o.layer))
                throw Error("override of layer " + std::to_string(o.layer) +
                            ": not a routed layer (only a routed layer's decisions can be forced)");
            const bool whole = o.position == RoutingOverride::kAllPositions;
            if (!whole && (o.position < 0 || o.position >= T))
                throw Error("override of layer " + std::to_string(o.layer) + " at position " +
                            std::to_string(o.position) + ": the run has positions 0-" + std::to_string(T - 1));
            if (whole != (pass == 0)) continue;
            auto& f = forced[static_cast<std::size_t>(o.layer)];
            if (f.empty()) f.assign(static_cast<std::size_t>(T), kFree);
            const auto value = o.process ? kProcess : kSkip;
            if (whole)
                std::fill(f.begin(), f.end(), value);
            else
                f[static_cast<std::size_t>(o.position)] = value;
        }
    return forced;
}

std::vector<std::int64_t> forcedTopk(const float* router_logits, const bool* topk, std::int64_t T, std::int64_t k,
                                     const std::int8_t* forced, bool keep_capacity) {
    std::vector<std::int64_t> out;
    if (!keep_capacity) {
        for (std::int64_t t = 0; t < T; ++t)
            if (forced[t] == kProcess || (forced[t] == kFree && topk[t])) out.push_back(t);
        return out;
    }
    std::vector<std::int64_t> free;
    std::int64_t forced_in = 0;
    for (std::int64_t t = 0; t < T; ++t) {
        if (forced[t] == kFree) free.push_back(t);
        forced_in += forced[t] == kProcess ? 1 : 0;
    }
    const auto places = std::clamp<std::int64_t>(k - forced_in, 0, static_cast<std::int64_t>(free.size()));
    // topkIndices' order: NaN above everything, then the larger logit, then the earlier position.
    const auto above = [router_logits](std::int64_t a, std::int64_t b) {
        const float x = router_logits[a], y = router_logits[b];
        if (std::isnan(x) != std::isnan(y)) return std::isnan(x);
        if (!std::isnan(x) && x != y) return x > y;
        return a < b;
    };
    std::partial_sort(free.begin(), free.begin() + places, free.end(), above);
    std::vector<bool> take(static_cast<std::size_t>(T), false);
    for (std::int64_t i = 0; i < places; ++i) take[static_cast<std::size_t>(free[i])] = true;
    for (std::int64_t t = 0; t < T; ++t)
        if (forced[t] == kProcess || take[static_cast<std::size_t>(t)]) out.push_back(t);
    return out;
}

}  // namespace modscope::nn
