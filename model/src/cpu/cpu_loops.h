// Helpers shared by the CPU kernel files (cpu_kernels.cpp, cpu_training.cpp): the instruction-set level their
// dispatchers read, team regions on LibTorch's OpenMP threads, row shares, GCC's 8-float vector, the vector exp
// and the rotary positions' checked tables. Internal linkage (an anonymous namespace): a file built without
// OpenMP gets its own single-threaded copies.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_matmul.h"

#ifdef _OPENMP
#include <omp.h>
// A parallel region over `team` threads, when the file is built with OpenMP.
#define MODSCOPE_TEAM_REGION(team) _Pragma("omp parallel num_threads(team) if (team > 1)")
#define MODSCOPE_TEAM_BARRIER _Pragma("omp barrier")
#else
#define MODSCOPE_TEAM_REGION(team)
#define MODSCOPE_TEAM_BARRIER
#endif

namespace modscope::cpu {

// isaLevel() (cpu_kernels.cpp), read inline by the loops' dispatchers: under -fPIC a call to isaLevel() is not
// inlined, and the rotation dispatches once per head and token. Hidden: read without the GOT, and only the
// kernel files, in one library, read it.
extern std::atomic<Isa> g_isa_level __attribute__((visibility("hidden")));

// isaLevel() inlined.
inline Isa isaNow() { return g_isa_level.load(std::memory_order_relaxed); }

// Whether a loop with a baseline and an AVX2 build takes the AVX2 one on this call: one relaxed load and a
// predictable branch.
inline bool avx2Build() { return isaNow() >= Isa::Avx2; }

// A loop's two builds and its dispatcher, from its body `name##Body<kIsa>`, a template on the level that is
// always_inline: GCC compiles an always_inline body for the target of the function it is inlined into, so
// name##At<Isa::Avx2> (target TARGET: "arch=x86-64-v3", or "avx2" for a loop without products to fuse) is the
// AVX2 loop and name##At<Isa::Baseline> the x86-64 one. A body calls another loop's build of its own level,
// name##At<kIsa>, not its dispatcher. The builds are noinline: a loop calling another calls it, and neither is
// compiled into the other (GCC would fuse a product of one with a sum of the other: other bits). `name` itself,
// with the loop's signature, takes the build of isaLevel(); `params` and `args` are the parenthesised parameter
// and argument lists.
#define MODSCOPE_ISA_BUILDS(Ret, name, TARGET, params, args)                                                    \
    template <Isa kIsa>                                                                                        \
    Ret name##At params;                                                                                       \
    template <>                                                                                                \
    __attribute__((target(TARGET), noinline)) Ret name##At<Isa::Avx2> params {                                 \
        return name##Body<Isa::Avx2> args;                                                                     \
    }                                                                                                          \
    template <>                                                                                                \
    __attribute__((noinline)) Ret name##At<Isa::Baseline> params {                                             \
        return name##Body<Isa::Baseline> args;                                                                 \
    }                                                                                                          \
    Ret name params { return avx2Build() ? name##At<Isa::Avx2> args : name##At<Isa::Baseline> args; }

// y[i] = exp(scale * x[i] - shift) for n floats (cpu_kernels.cpp); x and y may be the same row.
void expRow(const float* x, float scale, float shift, float* y, std::int64_t n);
// The numerators of a softmax over row[0, visible), exp(row[j] - max), into out[0, exp_len) (exp_len >=
// visible; row and out may be the same); returns their sum, and the max through max_out when given
// (cpu_kernels.cpp).
float softmaxNumerators(const float* row, float* out, std::int64_t visible, std::int64_t exp_len,
                        float* max_out = nullptr);
// One head of hd (even) floats rotated by a position's factors: y = x * c + swap_halves(x) * s
// (cpu_kernels.cpp).
void rotateHead(const float* x, const float* c, const float* s, float* y, std::int64_t hd);

namespace {

// Rows from which a row loop is split over LibTorch's threads; below, a region's start-up is a good part of
// the loop. 128 rather than 256: on a Zen 4 EPYC the reference forward at T = 128 took 3.15-3.17 ms against
// 3.22-3.23 (in one process, alternating, 400 runs each; 32 and 64 the same, T = 32 and 512 unchanged), where
// on the Zen 5 machine before, 128 had measured no better.
constexpr std::int64_t kParallelRows = 128;

// This thread's contiguous share of rows, in multiples of `align`, inside a parallel region (all of them
// outside one, and in builds without OpenMP).
std::pair<std::int64_t, std::int64_t> myShare(std::int64_t rows, std::int64_t align) {
#ifdef _OPENMP
    const std::int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
#else
    const std::int64_t n = 1, i = 0;
#endif
    const auto per = (rows + n * align - 1) / (n * align) * align;
    return {std::min(rows, i * per), std::min(rows, (i + 1) * per)};
}

// fn(r0, r1) over [0, rows): one share per thread of LibTorch's team from `split_from` rows, all of them on
// the calling thread below.
template <typename Fn>
void forRowShares(std::int64_t rows, Fn&& fn, std::int64_t split_from = kParallelRows) {
    const int team = rows >= split_from ? at::get_num_threads() : 1;
    MODSCOPE_TEAM_REGION(team) {
        const auto [r0, r1] = myShare(rows, 4);
        fn(r0, r1);
    }
}

// GCC's vector type: AVX registers in the AVX2 build, pairs of SSE registers in the baseline one. Unaligned
// (aligned(4)): rows start wherever a view puts them.
typedef float Float8 __attribute__((vector_size(32), aligned(4)));

// No helpers taking or returning Float8: outside the AVX2 build their ABI would differ (-Wpsabi).
#define MODSCOPE_LOAD8(p) (*reinterpret_cast<const Float8*>(p))
#define MODSCOPE_SUM8(a) (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))

// Positions (one per token, checked against the table) and the rotary table (PositionTables::rope [L, 2, 2,
// 1, hd]), kept alive for raw reads. `caller` names the entry point in the messages.
struct Rotary {
    torch::Tensor pos, rope;
    const std::int64_t* p = nullptr;
    const float* f = nullptr;
    // Token t's factors [2 (cos, sin), 2 (q, k), hd]; for q (which 0) or k (which 1), its cos and its sin.
    const float* factors(std::int64_t t, std::int64_t hd) const { return f + p[t] * 4 * hd; }
    const float* cos(std::int64_t t, std::int64_t which, std::int64_t hd) const {
        return factors(t, hd) + which * hd;
    }
    const float* sin(std::int64_t t, std::int64_t which, std::int64_t hd) const {
        return factors(t, hd) + (2 + which) * hd;
    }
};

Rotary rotary(const torch::Tensor& pos_in, const torch::Tensor& rope_in, std::int64_t tokens, std::int64_t hd,
              const char* caller) {
    Rotary r;
    r.pos = pos_in.to(torch::kCPU, torch::kLong).contiguous().view({-1});
    TORCH_CHECK(r.pos.numel() == tokens, caller, ": one position per token expected");
    r.rope = rope_in.contiguous();
    TORCH_CHECK(applies(r.rope) && r.rope.dim() == 5 && r.rope.size(1) == 2 && r.rope.size(2) == 2 &&
                    r.rope.size(3) == 1 && r.rope.size(4) == hd,
                caller, ": rope must be float32 [L, 2, 2, 1, hd]");
    r.p = r.pos.data_ptr<std::int64_t>();
    for (std::int64_t t = 0; t < tokens; ++t)
        TORCH_CHECK(r.p[t] >= 0 && r.p[t] < r.rope.size(0), caller, ": position ", r.p[t], " out of range");
    r.f = r.rope.data_ptr<float>();
    return r;
}

}  // namespace

}  // namespace modscope::cpu
