// How the cores a run gets behave at the moment: on a VM, the hypervisor may place the two vCPUs on one
// physical core (SMT siblings: each gets half its arithmetic) or on different core complexes (every hand-over
// between threads crosses the package), and moves them within minutes. The mod, layers and reference
// sections probe before and after each length, so that a slow figure can be told from a slow machine
// (docs/PERFORMANCE.md, "How it measures").
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace modscope::bench {

struct CoreProbe {
    double fma_one = 0;         // GFLOP/s of vector multiply-adds on one thread alone
    double fma_each_of_two = 0; // the slower of two threads doing the same at once (0: one core only)
    double handover_ns = 0;     // a cache line's round trip between two threads on two CPUs (0: one core only)

    // "near" (two cores sharing a cache), "far" (two cores, hand-overs over 150 ns), "shared" (two threads
    // get under 70% of one's arithmetic each: one physical core) or "single" (one CPU).
    std::string verdict() const;
    // The verdict and fma_one rounded, as a table's cell: "near 116".
    std::string cell() const;
    nlohmann::json toJson() const;
};

// About 0.1 s: a pause for the engine's spinning threads to sleep, multiply-adds on one thread, then on two
// at once, then a ping-pong between two threads pinned to the first two CPUs this process may use.
CoreProbe probeCores();

// What the verdicts in a table's "cores before / after" column mean, for its note.
std::string coreVerdictsNote();

}  // namespace modscope::bench
