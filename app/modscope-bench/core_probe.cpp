#include "core_probe.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

namespace modscope::bench {

namespace {

using Clock = std::chrono::steady_clock;

typedef float Float8 __attribute__((vector_size(32)));

// GFLOP/s of `iterations` rounds of ten independent 8-wide multiply-adds: enough chains to fill both FMA
// pipes of a core, nothing read from memory.
__attribute__((target_clones("arch=x86-64-v3", "default"))) double fmaRate(long iterations) {
    Float8 acc[10];
    for (int i = 0; i < 10; ++i) acc[i] = Float8{} + 0.001f * static_cast<float>(i);
    const Float8 b = Float8{} + 0.9999f, c = Float8{} + 0.0001f;
    const auto start = Clock::now();
    for (long n = 0; n < iterations; ++n)
        for (auto& a : acc) a = a * b + c;
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    volatile float sink = 0;
    for (const auto& a : acc) sink = sink + a[0];
    return static_cast<double>(iterations) * 10 * 16 / seconds / 1e9;
}

// The first two CPUs this process may run on; empty when there are fewer.
std::vector<int> twoCpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> cpus;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
    for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
        if (CPU_ISSET(c, &set)) cpus.push_back(c);
    if (cpus.size() < 2) cpus.clear();
    return cpus;
}

void pinTo(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Nanoseconds per round trip of a counter bounced between two threads pinned to two CPUs.
double handoverNs(const std::vector<int>& cpus, int rounds) {
    alignas(64) std::atomic<int> flag{0};
    double ns = 0;
    std::thread echo([&] {
        pinTo(cpus[1]);
        for (int i = 0; i < rounds; ++i) {
            while (flag.load(std::memory_order_acquire) != 2 * i + 1) {
            }
            flag.store(2 * i + 2, std::memory_order_release);
        }
    });
    std::thread serve([&] {
        pinTo(cpus[0]);
        const auto start = Clock::now();
        for (int i = 0; i < rounds; ++i) {
            flag.store(2 * i + 1, std::memory_order_release);
            while (flag.load(std::memory_order_acquire) != 2 * i + 2) {
            }
        }
        ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count() / rounds;
    });
    serve.join();
    echo.join();
    return ns;
}

}  // namespace

std::string CoreProbe::verdict() const {
    if (fma_each_of_two <= 0) return "single";
    if (fma_each_of_two < 0.7 * fma_one) return "shared";
    return handover_ns > 150 ? "far" : "near";
}

std::string CoreProbe::cell() const {
    return verdict() + " " + std::to_string(static_cast<int>(std::lround(fma_one)));
}

nlohmann::json CoreProbe::toJson() const {
    return {{"fma_gflops_one_thread", fma_one},
            {"fma_gflops_each_of_two", fma_each_of_two},
            {"handover_ns", handover_ns},
            {"verdict", verdict()}};
}

std::string coreVerdictsNote() {
    return "Cores, probed before and after each length (a VM's vCPUs move): near = two cores sharing a "
           "cache; far = two cores whose threads hand over in more than 150 ns (different core complexes: "
           "every hand-over between threads crosses the package); shared = two threads get under 70% of one "
           "thread's multiply-adds each (one physical core: half the machine). The number after each "
           "verdict is one thread's multiply-adds alone, in GFLOP/s: it drops when the host runs another VM "
           "on the same physical core.";
}

CoreProbe probeCores() {
    constexpr long kIterations = 400000;  // 64 MFLOP: about 0.6 ms at a Zen 4 core's rate
    // The engine's OpenMP threads spin for a while after their last region, on the CPUs probed here.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CoreProbe p;
    fmaRate(kIterations / 4);  // the clock and the vector unit up to speed
    p.fma_one = fmaRate(kIterations);
    const auto cpus = twoCpus();
    if (cpus.empty()) return p;
    double rate[2] = {0, 0};
    std::atomic<int> ready{0};
    std::vector<std::thread> two;
    for (int t = 0; t < 2; ++t)
        two.emplace_back([&, t] {
            pinTo(cpus[t]);
            ready.fetch_add(1);
            while (ready.load() < 2) {  // both start together: a head start would run alone at full rate
            }
            rate[t] = fmaRate(kIterations * 4);
        });
    for (auto& t : two) t.join();
    p.fma_each_of_two = std::min(rate[0], rate[1]);
    p.handover_ns = handoverNs(cpus, 20000);
    return p;
}

}  // namespace modscope::bench
