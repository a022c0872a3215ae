// Helpers shared by the CPU kernel files (cpu_kernels.cpp, cpu_training.cpp): team regions on LibTorch's
// OpenMP threads, row shares, GCC's 8-float vector and the vector exp. Internal linkage (an anonymous
// namespace): a file built without OpenMP (the fuzz build's) gets its own single-threaded copies.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
// A parallel region over `team` threads, when the file is built with OpenMP (the fuzz build's copy is not).
#define MODSCOPE_TEAM_REGION(team) _Pragma("omp parallel num_threads(team) if (team > 1)")
#else
#define MODSCOPE_TEAM_REGION(team)
#endif

namespace modscope::cpu {

// y[i] = exp(scale * x[i] - shift) for n floats (cpu_kernels.cpp); x and y may be the same row.
void expRow(const float* x, float scale, float shift, float* y, std::int64_t n);
// The numerators of a softmax over row[0, visible), exp(row[j] - max), into out[0, exp_len) (exp_len >= visible;
// row and out may be the same); returns their sum, and the max through max_out when given (cpu_kernels.cpp).
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

}  // namespace

}  // namespace modscope::cpu
