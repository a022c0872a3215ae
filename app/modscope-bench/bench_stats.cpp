#include "bench_stats.h"

#include <algorithm>

namespace modscope::bench {

namespace {

// Linear interpolation between the two closest ranks (numpy's default).
double quantileOfSorted(const std::vector<double>& v, double q) {
    const double pos = q * double(v.size() - 1);
    const auto lo = static_cast<std::size_t>(pos);
    const auto hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

}  // namespace

Summary Summary::of(std::vector<double> samples) {
    Summary s;
    if (samples.empty()) return s;
    std::sort(samples.begin(), samples.end());
    s.n = static_cast<int>(samples.size());
    s.median = quantileOfSorted(samples, 0.5);
    s.p10 = quantileOfSorted(samples, 0.1);
    s.p90 = quantileOfSorted(samples, 0.9);
    s.min = samples.front();
    s.max = samples.back();
    return s;
}

nlohmann::json Summary::toJson() const {
    return {{"median", median}, {"p10", p10}, {"p90", p90}, {"min", min}, {"max", max}, {"n", n}};
}

Summary timeRepeated(int warmup, int reps, const std::function<void()>& fn) {
    for (int i = 0; i < warmup; ++i) fn();
    std::vector<double> ms;
    ms.reserve(reps);
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        ms.push_back(msSince(t0));
    }
    return Summary::of(std::move(ms));
}

std::vector<TurnSummary> timeInTurns(int warmup, int reps, const std::vector<std::function<void()>>& fns) {
    for (int i = 0; i < warmup; ++i)
        for (const auto& fn : fns) fn();
    std::vector<std::vector<double>> first(fns.size()), steady(fns.size());
    for (int i = 0; i < reps; ++i)
        for (std::size_t f = 0; f < fns.size(); ++f)
            for (auto* samples : {&first[f], &steady[f]}) {
                const auto t0 = std::chrono::steady_clock::now();
                fns[f]();
                samples->push_back(msSince(t0));
            }
    std::vector<TurnSummary> out;
    for (std::size_t f = 0; f < fns.size(); ++f)
        out.push_back({Summary::of(first[f]), Summary::of(steady[f]), first[f], steady[f]});
    return out;
}

Summary pairedRatios(const std::vector<double>& num, const std::vector<double>& den) {
    std::vector<double> ratios;
    for (std::size_t i = 0; i < std::min(num.size(), den.size()); ++i)
        if (den[i] > 0) ratios.push_back(num[i] / den[i]);
    return Summary::of(std::move(ratios));
}

}  // namespace modscope::bench
