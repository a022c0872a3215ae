// Samples of one measurement and their summary: median with p10–p90 and min–max (docs/PERFORMANCE.md).
#pragma once

#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <vector>

namespace modscope::bench {

struct Summary {
    int n = 0;
    double median = 0, p10 = 0, p90 = 0, min = 0, max = 0;
    static Summary of(std::vector<double> samples);
    // {"median", "p10", "p90", "min", "max", "n"}
    nlohmann::json toJson() const;
};

// Milliseconds since t0.
inline double msSince(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Calls fn `warmup` times untimed (first-call allocations, caches, OpenBLAS thread start-up), then `reps`
// times timed, one sample per call.
Summary timeRepeated(int warmup, int reps, const std::function<void()>& fn);

// The same for several measurements taken in turn, such as two models compared: each repetition calls every
// fn twice in a row, so load from other processes on a shared machine falls on all of them alike, and each is
// timed both right after another fn ran (`first`: its weights may have left the caches meanwhile) and run
// after run as an app re-runs its one model (`steady`).
struct TurnSummary {
    Summary first, steady;
    std::vector<double> first_ms, steady_ms;  // the samples, one per repetition, in order
};
std::vector<TurnSummary> timeInTurns(int warmup, int reps, const std::vector<std::function<void()>>& fns);

// The ratios num[i] / den[i] of two measurements' samples taken in the same repetition (timeInTurns): their
// median is a speed-up that a change of the machine's speed between repetitions leaves alone, where the
// ratio of the two medians mixes repetitions from before and after it (docs/PERFORMANCE.md, "How it
// measures").
Summary pairedRatios(const std::vector<double>& num, const std::vector<double>& den);

}  // namespace modscope::bench
