// Fused CPU loops (cpu_kernels.h). Each is built for AVX2 (x86-64-v3, with FMA, where exp is evaluated:
// SwiGLU's activation at 16 x 512 took 3.9 us against 6.4 without) and for the baseline, and each call takes the
// build of cpu::isaLevel() (MODSCOPE_ISA_BUILDS, cpu_loops.h), so that one host runs and tests both. From 256
// rows the row loops split their rows over LibTorch's threads (OpenMP, this file only): the router's logits at
// 512 x 192 took 6.8 us on one thread and 4.3 on two, reading x produced by a two-thread add as in the forward;
// the reference forward at T = 128 (no loop that long) did not change.
#include "cpu/cpu_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "nn/attention_blocks.h"
#include "cpu/cpu_loops.h"
#include "cpu/cpu_matmul.h"
#include "cpu/cpu_signals.h"

namespace modscope::cpu {

namespace {

// Values from which SwiGLU's activation is split: an exp each makes its rows dearer. 16 x 512 took 3.9-4.5 us
// split against 5.9 on one thread, 128 x 512 22-27 against 39.
constexpr std::int64_t kParallelSwiGluValues = 4096;
// The rows from which SwiGLU's loops (forward and backward) split, for f gate values per row.
std::int64_t swiGluSplitRows(std::int64_t f) {
    return std::max<std::int64_t>(2, kParallelSwiGluValues / std::max<std::int64_t>(f, 1));
}
// The predictor splits its rows over the team from this many (16 rows: 6.2 us on one thread, 5.1 on two).
constexpr std::int64_t kParallelPredictorRows = 16;
// The feed's room (a row's tokens, any of which may be a router candidate) from which predictorLogitsFed
// takes the team. Causal selection on the bundled model, in alternating processes, split from 64 against never:
// 2.7 us against 3.2-3.3 at 64 tokens, 3.5 against 4.2-4.4 at 128, 7.5-7.6 against 11.5 at 512.
constexpr std::int64_t kParallelFedRows = 64;
// Hidden units per block of the predictor's first weight, and rows per pass over a block: 32 x d 192 floats
// (24 KB) stay in a 32 KB L1 for the AVX2 build's three rows; the AVX-512 build holds four rows x 64 units
// in its 32 registers (48 KB of w1 at d 192). Single-threaded, 50 rows x d 192 x h 64 on an AVX-512 Zen 5:
// 5.4 us against 11.2 for the AVX2 build; 3 x 32 and 6 x 32 wide measured 15.4 and 6.1.
constexpr std::int64_t kPredictorUnitBlock = 32, kPredictorRowsPerPass = 3;
constexpr std::int64_t kPredictorUnitBlockWide = 64, kPredictorRowsPerPassWide = 4;

// The AVX-512 attention (attendHeadWide) holds a head's keys as columns on the stack: heads up to this size.
constexpr std::int64_t kWideAttentionHeadDim = 128;
// Query rows from which it splits over the team (alternate groups of rows): in alternating processes,
// 64 rows x 3 heads took 10.9-16.2 us on two threads against 15.9-17.1 on one, 32 rows 4.9-6.3 against 6.1-7.0.
constexpr std::int64_t kParallelWideAttentionRows = 32;
// smallBlockDelta takes a block on up to this many tokens. Beyond, the wide attention still serves the
// operator-level block: at 128 tokens the one-buffer block (single-threaded norms, rotary and update) gave back
// what the attention saved, and the operator-level block with it took the reference forward at T = 128 from
// 4.03-4.13 to 3.84-3.94 ms (in one process, alternating, 400 runs each, a slow spell).
constexpr std::int64_t kSmallBlockTokens = 64;

// This thread's number in its parallel region (0 outside one, and in builds without OpenMP).
int myThread() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// The levels are the features that the compiler may use in a function built for x86-64-v3 or x86-64-v4.
Isa detectIsa() {
    __builtin_cpu_init();  // the builtins' table, in case this runs before libgcc's constructor
#ifdef __clang__
    // Clang 14 knows no level names: AVX2, FMA and BMI2 stand for x86-64-v3 on the CPUs that exist.
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512cd");
#else
    const bool v3 = __builtin_cpu_supports("x86-64-v3");
    const bool v4 = __builtin_cpu_supports("x86-64-v4");
#endif
    return v4 ? Isa::Avx512 : v3 ? Isa::Avx2 : Isa::Baseline;
}

struct IsaEnvironment {
    Isa cap = Isa::Avx512;
    std::string error;
};

IsaEnvironment readIsaEnvironment() {
    IsaEnvironment env;
    const char* value = std::getenv("MODSCOPE_CPU_ISA");
    if (value == nullptr || *value == '\0') return env;
    if (const auto isa = isaFromName(value)) {
        env.cap = *isa;
    } else {
        // No cap, since nothing here can throw to a caller; but not silently: a cap that did nothing would pass
        // the tests of a level that never ran. backend::resolve refuses the kernel backend with the message.
        env.error = std::string("MODSCOPE_CPU_ISA='") + value + "' in the environment is not baseline, avx2 or avx512";
        std::fprintf(stderr, "modscope: %s: the kernel backend refuses models until it names a level\n",
                     env.error.c_str());
    }
    return env;
}

const IsaEnvironment& isaEnvironment() {
    static const IsaEnvironment env = readIsaEnvironment();
    return env;
}

std::mutex g_isa_cap_mutex;
Isa g_isa_cap = Isa::Avx512;  // setIsaCap's, under g_isa_cap_mutex

// RMSNorm of rows x (plus rows a, when a is not null: the norm of a sum that is never stored).
template <Isa kIsa>
inline __attribute__((always_inline)) void rmsNormRowsBody(const float* x, std::int64_t ldx, const float* a,
                                                           std::int64_t lda, const float* w, float* y,
                                                           std::int64_t rows, std::int64_t d, float eps) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * ldx;
        const float* ar = a != nullptr ? a + r * lda : nullptr;
        float* yr = y + r * d;
        if (ar != nullptr)
            for (std::int64_t k = 0; k < d; ++k) yr[k] = xr[k] + ar[k];
        const float* in = ar != nullptr ? yr : xr;
        // Eight partial sums: a vector accumulator, where one sum would be a serial chain.
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; ++j) acc[j] += in[i + j] * in[i + j];
        float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < d; ++i) ss += in[i] * in[i];
        const float s = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
        for (std::int64_t k = 0; k < d; ++k) yr[k] = in[k] * s * w[k];
    }
}
MODSCOPE_ISA_BUILDS(void, rmsNormRows, "avx2",
                    (const float* x, std::int64_t ldx, const float* a, std::int64_t lda, const float* w, float* y,
                     std::int64_t rows, std::int64_t d, float eps),
                    (x, ldx, a, lda, w, y, rows, d, eps))

// The gradient of y = x r w, r = 1 / sqrt(mean(x^2) + eps), for rows x and their output gradients dy:
// dx = r w dy - x r^3 (x . (w dy)) / d into dx (rows d apart), and dw += r x dy into dw.
template <Isa kIsa>
inline __attribute__((always_inline)) void rmsNormBackwardRowsBody(const float* x, std::int64_t ldx,
                                                                   const float* dy, const float* w, float* dx,
                                                                   float* dw, std::int64_t rows, std::int64_t d,
                                                                   float eps) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * ldx;
        const float* gr = dy + r * d;
        float* o = dx + r * d;
        float sq[8] = {0, 0, 0, 0, 0, 0, 0, 0}, dot[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; ++j) {
                sq[j] += xr[i + j] * xr[i + j];
                dot[j] += xr[i + j] * w[i + j] * gr[i + j];
            }
        float ss = ((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((sq[4] + sq[5]) + (sq[6] + sq[7]));
        float c = ((dot[0] + dot[1]) + (dot[2] + dot[3])) + ((dot[4] + dot[5]) + (dot[6] + dot[7]));
        for (; i < d; ++i) {
            ss += xr[i] * xr[i];
            c += xr[i] * w[i] * gr[i];
        }
        const float rs = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
        const float k = rs * rs * rs * c / static_cast<float>(d);
        for (std::int64_t j = 0; j < d; ++j) {
            o[j] = rs * w[j] * gr[j] - xr[j] * k;
            dw[j] += rs * xr[j] * gr[j];
        }
    }
}
MODSCOPE_ISA_BUILDS(void, rmsNormBackwardRows, "arch=x86-64-v3",
                    (const float* x, std::int64_t ldx, const float* dy, const float* w, float* dx, float* dw,
                     std::int64_t rows, std::int64_t d, float eps),
                    (x, ldx, dy, w, dx, dw, rows, d, eps))

}  // namespace

// (cpu_loops.h)
template <Isa kIsa>
inline __attribute__((always_inline)) void rotateHeadBody(const float* x, const float* c, const float* s, float* y,
                                                          std::int64_t hd) {
    const std::int64_t half = hd / 2;
    for (std::int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] + x[i + half] * s[i];
    for (std::int64_t i = half; i < hd; ++i) y[i] = x[i] * c[i] + x[i - half] * s[i];
}
MODSCOPE_ISA_BUILDS(void, rotateHead, "avx2",
                    (const float* x, const float* c, const float* s, float* y, std::int64_t hd),
                    (x, c, s, y, hd))

namespace {

// Four rows at a time: four independent accumulators where one row's would be a serial chain of additions,
// and each load of w serves four rows (1.3x faster than one row with two accumulators at 512 x 192).
template <Isa kIsa>
inline __attribute__((always_inline)) void rowDotsBody(const float* x, std::int64_t ldx, std::int64_t rows,
                                                       const float* w, std::int64_t d, float* out) {
    std::int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float* x0 = x + r * ldx;
        const float *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        std::int64_t i = 0;
        for (; i + 8 <= d; i += 8) {
            const Float8 wi = MODSCOPE_LOAD8(w + i);
            a0 += MODSCOPE_LOAD8(x0 + i) * wi;
            a1 += MODSCOPE_LOAD8(x1 + i) * wi;
            a2 += MODSCOPE_LOAD8(x2 + i) * wi;
            a3 += MODSCOPE_LOAD8(x3 + i) * wi;
        }
        float s0 = MODSCOPE_SUM8(a0), s1 = MODSCOPE_SUM8(a1), s2 = MODSCOPE_SUM8(a2), s3 = MODSCOPE_SUM8(a3);
        for (; i < d; ++i) {
            s0 += x0[i] * w[i];
            s1 += x1[i] * w[i];
            s2 += x2[i] * w[i];
            s3 += x3[i] * w[i];
        }
        out[r] = s0;
        out[r + 1] = s1;
        out[r + 2] = s2;
        out[r + 3] = s3;
    }
    for (; r < rows; ++r) {
        const float* xr = x + r * ldx;
        Float8 a = {};
        std::int64_t i = 0;
        for (; i + 8 <= d; i += 8) a += MODSCOPE_LOAD8(xr + i) * MODSCOPE_LOAD8(w + i);
        float s = MODSCOPE_SUM8(a);
        for (; i < d; ++i) s += xr[i] * w[i];
        out[r] = s;
    }
}
MODSCOPE_ISA_BUILDS(void, rowDots, "avx2",
                    (const float* x, std::int64_t ldx, std::int64_t rows, const float* w, std::int64_t d,
                     float* out),
                    (x, ldx, rows, w, d, out))

template <Isa kIsa>
inline __attribute__((always_inline)) void addScaledRowBody(float* y, const float* x, float scale,
                                                            std::int64_t d) {
    for (std::int64_t i = 0; i < d; ++i) y[i] += scale * x[i];
}
MODSCOPE_ISA_BUILDS(void, addScaledRow, "avx2",
                    (float* y, const float* x, float scale, std::int64_t d),
                    (y, x, scale, d))

float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace

// (cpu_loops.h) y[i] = exp(scale * x[i] - shift), eight at a time: Cephes' expf (x = n ln 2 + r, a degree-5
// polynomial for e^r, 2^n built from exponent bits in two halves so that denormal results and 2^128 are
// reachable). SiLU built on it stays within 1.5e-7 relative of double precision across [-87, 88]
// (engine_cpu_paths_test); inf above 88.72, at most float's smallest denormal below -103; NaN stays NaN. x and
// y may be the same row.
template <Isa kIsa>
inline __attribute__((always_inline)) void expRowBody(const float* x, float scale, float shift, float* y,
                                                      std::int64_t n) {
    typedef int Int8 __attribute__((vector_size(32)));
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        Float8 v;
        std::memcpy(&v, x + i, sizeof v);
        v = v * scale - shift;
        v = v < -104.0f ? -104.0f : v;
        v = v > 88.8f ? 88.8f : v;
        // Round to nearest by adding 1.5 * 2^23: the integer lands in the mantissa's low bits.
        const Float8 t = v * 1.44269504088896341f + 12582912.0f;
        const Float8 nf = t - 12582912.0f;
        const Float8 r = (v - nf * 0.693359375f) + nf * 2.12194440e-4f;
        Float8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * (r * r) + r + 1.0f;
        const Int8 ni = __builtin_convertvector(nf, Int8), half = ni >> 1;
        // A same-sized vector cast keeps the bits: 2^half and 2^(n - half), each a normal float.
        const Float8 out = (p * (Float8)((half + 127) << 23)) * (Float8)((ni - half + 127) << 23);
        std::memcpy(y + i, &out, sizeof out);
    }
    for (; i < n; ++i) y[i] = std::exp(scale * x[i] - shift);
}
MODSCOPE_ISA_BUILDS(void, expRow, "arch=x86-64-v3",
                    (const float* x, float scale, float shift, float* y, std::int64_t n),
                    (x, scale, shift, y, n))

namespace {

}  // namespace

// (cpu_loops.h) out[j] = exp(row[j] - the max of row[0, visible)), written for j < exp_len (>= visible: a
// caller whose row has room rounds it up to whole vectors, so expRow takes no scalar tail); returns their sum
// over [0, visible), and the max through max_out when given. row and out may be the same. Max and sum in eight
// lanes: a serial sum of a 512-key row waited on each add.
template <Isa kIsa>
inline __attribute__((always_inline)) float softmaxNumeratorsBody(const float* row, float* out,
                                                                  std::int64_t visible, std::int64_t exp_len,
                                                                  float* max_out) {
    std::int64_t j = 0;
    float max = row[0];
    if (visible >= 8) {
        Float8 m;
        std::memcpy(&m, row, sizeof m);
        for (j = 8; j + 8 <= visible; j += 8) {
            Float8 v;
            std::memcpy(&v, row + j, sizeof v);
            m = v > m ? v : m;
        }
        for (int u = 0; u < 8; ++u) max = m[u] > max ? m[u] : max;
    }
    for (; j < visible; ++j) max = row[j] > max ? row[j] : max;
    expRowAt<kIsa>(row, 1.0f, max, out, exp_len);
    Float8 acc = {};
    for (j = 0; j + 8 <= visible; j += 8) acc += MODSCOPE_LOAD8(out + j);
    float sum = MODSCOPE_SUM8(acc);
    for (; j < visible; ++j) sum += out[j];
    if (max_out != nullptr) *max_out = max;
    return sum;
}
MODSCOPE_ISA_BUILDS(float, softmaxNumerators, "arch=x86-64-v3",
                    (const float* row, float* out, std::int64_t visible, std::int64_t exp_len, float* max_out),
                    (row, out, visible, exp_len, max_out))

namespace {

// row[0, visible) = softmax of itself, row[visible, n) = 0: one row of causal attention's probabilities in
// place.
template <Isa kIsa>
inline __attribute__((always_inline)) void causalSoftmaxRowBody(float* row, std::int64_t visible, std::int64_t n) {
    const float inv = 1.0f / softmaxNumeratorsAt<kIsa>(row, row, visible, visible, nullptr);
    for (std::int64_t j = 0; j < visible; ++j) row[j] *= inv;
    std::fill(row + visible, row + n, 0.0f);
}
MODSCOPE_ISA_BUILDS(void, causalSoftmaxRow, "arch=x86-64-v3",
                    (float* row, std::int64_t visible, std::int64_t n),
                    (row, visible, n))

// Rows of a matrix: row i at data + i * ld.
template <typename T>
struct Rows {
    T* data;
    std::int64_t ld;
};

// One head's causal attention for S queries after `prior` keys: query i (scaled) against keys 0 .. prior + i,
// softmax, the weighted sum of their values. scores: room for the keys rounded up to 8. The scores are one
// rowDots call per query; the weighted sum stays in this function: called per key, a weighted add cost more
// than its arithmetic.
template <Isa kIsa>
inline __attribute__((always_inline)) void attendHeadBody(Rows<const float> q, Rows<const float> k,
                                                          Rows<const float> v, Rows<float> out, std::int64_t S,
                                                          std::int64_t prior, std::int64_t hd, float* scores) {
    for (std::int64_t i = 0; i < S; ++i) {
        const float* qi = q.data + i * q.ld;
        const auto visible = prior + i + 1;  // its own key and every earlier one
        rowDotsAt<kIsa>(k.data, k.ld, visible, qi, hd, scores);
        const float inv = 1.0f / softmaxNumeratorsAt<kIsa>(scores, scores, visible, (visible + 7) / 8 * 8, nullptr);
        float* o = out.data + i * out.ld;
        // The weighted sum of values 64 columns at a time in eight vector registers: summed in memory
        // instead, each key's add waits for the previous key's store (most of this function's time, perf).
        std::int64_t c0 = 0;
        for (; c0 + 64 <= hd; c0 += 64) {
            Float8 acc[8] = {};
            for (std::int64_t j = 0; j < visible; ++j) {
                const float* vj = v.data + j * v.ld + c0;
                const float p = scores[j] * inv;
                for (int u = 0; u < 8; ++u) acc[u] += p * MODSCOPE_LOAD8(vj + 8 * u);
            }
            for (int u = 0; u < 8; ++u) std::memcpy(o + c0 + 8 * u, &acc[u], sizeof(Float8));
        }
        for (std::int64_t c = c0; c < hd; ++c) o[c] = 0.0f;
        for (std::int64_t j = 0; j < visible && c0 < hd; ++j) {
            const float* vj = v.data + j * v.ld;
            const float p = scores[j] * inv;
            for (std::int64_t c = c0; c < hd; ++c) o[c] += p * vj[c];
        }
    }
}
MODSCOPE_ISA_BUILDS(void, attendHead, "arch=x86-64-v3",
                    (Rows<const float> q, Rows<const float> k, Rows<const float> v, Rows<float> out,
                     std::int64_t S, std::int64_t prior, std::int64_t hd, float* scores),
                    (q, k, v, out, S, prior, hd, scores))

// x = silu(x) = x / (1 + exp(-x)) over n, in place: exp of a chunk at a time into a buffer.
template <Isa kIsa>
inline __attribute__((always_inline)) void siluInPlaceBody(float* x, std::int64_t n) {
    float e[64];
    for (std::int64_t i = 0; i < n; i += 64) {
        const auto m = std::min<std::int64_t>(64, n - i);
        expRowAt<kIsa>(x + i, -1.0f, 0.0f, e, m);
        for (std::int64_t j = 0; j < m; ++j) x[i + j] = x[i + j] / (1.0f + e[j]);
    }
}
MODSCOPE_ISA_BUILDS(void, siluInPlace, "arch=x86-64-v3", (float* x, std::int64_t n), (x, n))

// y = silu(g) * u = g / (1 + exp(-g)) * u over n.
template <Isa kIsa>
inline __attribute__((always_inline)) void siluTimesBody(const float* g, const float* u, float* y,
                                                         std::int64_t n) {
    expRowAt<kIsa>(g, -1.0f, 0.0f, y, n);
    for (std::int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + y[i]) * u[i];
}
MODSCOPE_ISA_BUILDS(void, siluTimes, "arch=x86-64-v3",
                    (const float* g, const float* u, float* y, std::int64_t n),
                    (g, u, y, n))

// The gradient of y = silu(g) * u over n: dg = dy u s (1 + g (1 - s)) and du = dy g s, s = sigmoid(g), as
// autograd's silu_backward and mul's backward give them, in one pass. e: room for n floats.
template <Isa kIsa>
inline __attribute__((always_inline)) void siluTimesBackwardBody(const float* g, const float* u, const float* dy,
                                                                 float* dg, float* du, float* e, std::int64_t n) {
    expRowAt<kIsa>(g, -1.0f, 0.0f, e, n);
    for (std::int64_t i = 0; i < n; ++i) {
        const float s = 1.0f / (1.0f + e[i]);
        du[i] = dy[i] * (g[i] * s);
        dg[i] = dy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
    }
}
MODSCOPE_ISA_BUILDS(void, siluTimesBackward, "arch=x86-64-v3",
                    (const float* g, const float* u, const float* dy, float* dg, float* du, float* e,
                     std::int64_t n),
                    (g, u, dy, dg, du, e, n))

// The causal predictor's first layer for three rows at once (repeat a row for fewer): hidden units [j0, j1)
// of x w1 + b1 for w1 [d, h] row-major, into y0, y1 and y2. Each unit is one chain of fused multiply-adds over
// x in order, whichever rows share the pass, so a row's value has the same bits in a trace's every-token run
// and in causal mode's candidates, and in this build and the AVX-512 one. The fusing is written out: left to
// the compiler, the products were fused at -O3 but not in the Debug build, nor in a tail loop GCC vectorised.
// 32 units at a time: the rows share each load of w1 (twelve chains in flight), and the caller keeps a
// 32-unit block of w1 in L1 (24 KB at d 192) across all its rows.
__attribute__((target("arch=x86-64-v3")))
void predictorHiddenRowsFma(const float* const* x, std::int64_t d, const float* w1, std::int64_t h,
                            const float* b1, std::int64_t j0, std::int64_t j1, float* const* y) {
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2];
    std::int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
        __m256 a0[4], a1[4], a2[4];
        for (int u = 0; u < 4; ++u) a0[u] = a1[u] = a2[u] = _mm256_loadu_ps(b1 + j + 8 * u);
        for (std::int64_t k = 0; k < d; ++k) {
            const float* w = w1 + k * h + j;
            const __m256 s0 = _mm256_set1_ps(x0[k]), s1 = _mm256_set1_ps(x1[k]), s2 = _mm256_set1_ps(x2[k]);
            for (int u = 0; u < 4; ++u) {
                const __m256 wu = _mm256_loadu_ps(w + 8 * u);
                a0[u] = _mm256_fmadd_ps(s0, wu, a0[u]);
                a1[u] = _mm256_fmadd_ps(s1, wu, a1[u]);
                a2[u] = _mm256_fmadd_ps(s2, wu, a2[u]);
            }
        }
        for (int u = 0; u < 4; ++u) {
            _mm256_storeu_ps(y[0] + j + 8 * u, a0[u]);
            _mm256_storeu_ps(y[1] + j + 8 * u, a1[u]);
            _mm256_storeu_ps(y[2] + j + 8 * u, a2[u]);
        }
    }
    for (; j + 8 <= j1; j += 8) {
        __m256 a0 = _mm256_loadu_ps(b1 + j), a1 = a0, a2 = a0;
        for (std::int64_t k = 0; k < d; ++k) {
            const __m256 w = _mm256_loadu_ps(w1 + k * h + j);
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(x0[k]), w, a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(x1[k]), w, a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(x2[k]), w, a2);
        }
        _mm256_storeu_ps(y[0] + j, a0);
        _mm256_storeu_ps(y[1] + j, a1);
        _mm256_storeu_ps(y[2] + j, a2);
    }
    for (; j < j1; ++j) {
        float a0 = b1[j], a1 = b1[j], a2 = b1[j];
        for (std::int64_t k = 0; k < d; ++k) {
            const float w = w1[k * h + j];
            a0 = __builtin_fmaf(x0[k], w, a0);
            a1 = __builtin_fmaf(x1[k], w, a1);
            a2 = __builtin_fmaf(x2[k], w, a2);
        }
        y[0][j] = a0;
        y[1][j] = a1;
        y[2][j] = a2;
    }
}

// predictorHiddenRowsFma for CPUs without FMA: the same passes with the products rounded before each add.
void predictorHiddenRowsBaseline(const float* const* x, std::int64_t d, const float* w1, std::int64_t h,
                                 const float* b1, std::int64_t j0, std::int64_t j1, float* const* y) {
    for (std::int64_t j = j0; j < j1; ++j) {
        float a0 = b1[j], a1 = b1[j], a2 = b1[j];
        for (std::int64_t k = 0; k < d; ++k) {
            const float w = w1[k * h + j];
            a0 += x[0][k] * w;
            a1 += x[1][k] * w;
            a2 += x[2][k] * w;
        }
        y[0][j] = a0;
        y[1][j] = a1;
        y[2][j] = a2;
    }
}

// The predictor's output from a row's pre-activations: silu(hidden) . w2 + b2, SiLU in place, the dot
// rowDots' one-row reduction.
float predictorOutput(float* hidden, std::int64_t h, const float* w2, float b2) {
    siluInPlace(hidden, h);
    float t = 0.0f;
    rowDots(hidden, h, 1, w2, h, &t);
    return t + b2;
}

// predictorHiddenRowsFma for four rows in the AVX-512 build: the same chains (one fused multiply-add per
// unit and element of x, in order, from b1), 64 units at a time, so its values have the bits of the AVX2
// build's.
__attribute__((target("arch=x86-64-v4")))
void predictorHiddenRowsWide(const float* const* x, std::int64_t d, const float* w1, std::int64_t h,
                             const float* b1, std::int64_t j0, std::int64_t j1, float* const* y) {
    constexpr int kRows = kPredictorRowsPerPassWide;
    std::int64_t j = j0;
    for (; j + 64 <= j1; j += 64) {
        __m512 a[kRows][4];
        for (int u = 0; u < 4; ++u) {
            a[0][u] = _mm512_loadu_ps(b1 + j + 16 * u);
            for (int r = 1; r < kRows; ++r) a[r][u] = a[0][u];
        }
        for (std::int64_t k = 0; k < d; ++k) {
            const float* w = w1 + k * h + j;
            __m512 wu[4];
            for (int u = 0; u < 4; ++u) wu[u] = _mm512_loadu_ps(w + 16 * u);
            for (int r = 0; r < kRows; ++r) {
                const __m512 s = _mm512_set1_ps(x[r][k]);
                for (int u = 0; u < 4; ++u) a[r][u] = _mm512_fmadd_ps(s, wu[u], a[r][u]);
            }
        }
        for (int r = 0; r < kRows; ++r)
            for (int u = 0; u < 4; ++u) _mm512_storeu_ps(y[r] + j + 16 * u, a[r][u]);
    }
    for (; j + 16 <= j1; j += 16) {
        __m512 a[kRows];
        a[0] = _mm512_loadu_ps(b1 + j);
        for (int r = 1; r < kRows; ++r) a[r] = a[0];
        for (std::int64_t k = 0; k < d; ++k) {
            const __m512 w = _mm512_loadu_ps(w1 + k * h + j);
            for (int r = 0; r < kRows; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r][k]), w, a[r]);
        }
        for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(y[r] + j, a[r]);
    }
    for (; j < j1; ++j)
        for (int r = 0; r < kRows; ++r) {
            float a = b1[j];
            for (std::int64_t k = 0; k < d; ++k) a = __builtin_fmaf(x[r][k], w1[k * h + j], a);
            y[r][j] = a;
        }
}

// GCC 12's AVX-512 headers start some intrinsics from a self-initialised "undefined" vector (max, the
// reductions, conversions), which -Wuninitialized reports; nothing here reads an undefined lane.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// exp(v) for v <= 0, sixteen at a time: expRow's arithmetic (Cephes' expf, 2^n in two halves) in AVX-512.
__attribute__((target("arch=x86-64-v4")))
inline __m512 expNonPositive16(__m512 v) {
    v = _mm512_max_ps(v, _mm512_set1_ps(-104.0f));
    const __m512 big = _mm512_set1_ps(12582912.0f);
    const __m512 nf = _mm512_sub_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), big), big);
    const __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), v));
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i ni = _mm512_cvtps_epi32(nf), half = _mm512_srai_epi32(ni, 1);
    const __m512i bias = _mm512_set1_epi32(127);
    const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, bias), 23));
    const __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, half), bias), 23));
    return _mm512_mul_ps(_mm512_mul_ps(p, a), b);
}

// R query rows of one head against Blocks x 16 keys (AVX-512): scores from the transposed keys kt
// ([hd][kWideAttentionKeys], a key's column), each row's softmax over its own visible keys, then the weighted
// sum of values. All R rows' scores stay in registers (R x Blocks of them, 16 at most); a row past the last
// (fewer rows left than R) repeats it.
template <int R, int Blocks>
__attribute__((target("arch=x86-64-v4")))
void attendRowsWide(const float* const* q, const float* kt, Rows<const float> v, float* const* out,
                    const std::int64_t* visible, std::int64_t hd, float* p) {
    __m512 s[R][Blocks];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < Blocks; ++b) s[r][b] = _mm512_setzero_ps();
    for (std::int64_t c = 0; c < hd; ++c) {
        __m512 kc[Blocks];
        for (int b = 0; b < Blocks; ++b) kc[b] = _mm512_loadu_ps(kt + c * kWideAttentionKeys + 16 * b);
        for (int r = 0; r < R; ++r) {
            const __m512 qc = _mm512_set1_ps(q[r][c]);
            for (int b = 0; b < Blocks; ++b) s[r][b] = _mm512_fmadd_ps(qc, kc[b], s[r][b]);
        }
    }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const std::int64_t width = 16 * Blocks;
    for (int r = 0; r < R; ++r) {
        __mmask16 seen[Blocks];
        __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int b = 0; b < Blocks; ++b) {
            seen[b] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * b)),
                                              _mm512_set1_epi32(static_cast<int>(visible[r])));
            m = _mm512_mask_max_ps(m, seen[b], m, s[r][b]);
        }
        const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        __m512 sum = _mm512_setzero_ps();
        for (int b = 0; b < Blocks; ++b) {
            s[r][b] = _mm512_maskz_mov_ps(seen[b], expNonPositive16(_mm512_sub_ps(s[r][b], max)));
            sum = _mm512_add_ps(sum, s[r][b]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int b = 0; b < Blocks; ++b) _mm512_storeu_ps(p + r * width + 16 * b, _mm512_mul_ps(s[r][b], inv));
    }
    // Keys past a row's own weigh 0 in it, so the group's rows share one pass over the last row's keys.
    const std::int64_t keys = visible[R - 1];
    for (std::int64_t c0 = 0; c0 < hd; c0 += 64) {
        const int units = static_cast<int>(std::min<std::int64_t>(64, hd - c0) / 16);
        __m512 o[R][4];
        for (int r = 0; r < R; ++r)
            for (int u = 0; u < 4; ++u) o[r][u] = _mm512_setzero_ps();
        for (std::int64_t j = 0; j < keys; ++j) {
            const float* vj = v.data + j * v.ld + c0;
            __m512 vu[4];
            for (int u = 0; u < 4; ++u) vu[u] = u < units ? _mm512_loadu_ps(vj + 16 * u) : _mm512_setzero_ps();
            for (int r = 0; r < R; ++r) {
                const __m512 pj = _mm512_set1_ps(p[r * width + j]);
                for (int u = 0; u < 4; ++u) o[r][u] = _mm512_fmadd_ps(pj, vu[u], o[r][u]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int u = 0; u < units; ++u) _mm512_storeu_ps(out[r] + c0 + 16 * u, o[r][u]);
    }
}

// dst[c][j] = src[j][c] for a 16 x 16 tile: `rows` rows of 16 floats at src, ld apart (zeros for the rest),
// written as 16 rows of 16 at dst, ldd apart. Moves bits only.
__attribute__((target("arch=x86-64-v4")))
void transposeTile16(const float* src, std::int64_t ld, std::int64_t rows, float* dst, std::int64_t ldd) {
    __m512 r[16], t[16];
    for (int j = 0; j < 16; ++j) r[j] = j < rows ? _mm512_loadu_ps(src + j * ld) : _mm512_setzero_ps();
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Within each 128-bit lane L: r[4i + k] holds column 4L + k of rows 4i .. 4i + 3.
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // Column 4L + k gathers lane L of r[k], r[4 + k], r[8 + k] and r[12 + k].
    for (int k = 0; k < 4; ++k) {
        const __m512 lo01 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 hi01 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 lo23 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512 hi23 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(3, 2, 3, 2));
        _mm512_storeu_ps(dst + k * ldd, _mm512_shuffle_f32x4(lo01, hi01, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_shuffle_f32x4(lo01, hi01, _MM_SHUFFLE(3, 1, 3, 1)));
        _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_shuffle_f32x4(lo23, hi23, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_shuffle_f32x4(lo23, hi23, _MM_SHUFFLE(3, 1, 3, 1)));
    }
}

// One head's causal attention for S query rows after `prior` keys (prior + S at most kWideAttentionKeys; hd
// a multiple of 16) in AVX-512, a group of rows at a time (four up to 64 keys, two beyond), every `stride`-th
// group from group `first` (threads take alternate groups: later rows see more keys). kt: room for hd x
// kWideAttentionKeys floats, p for 2 x kWideAttentionKeys (four rows of 64 keys, or two of 128).
__attribute__((target("arch=x86-64-v4")))
void attendHeadWide(Rows<const float> q, Rows<const float> k, Rows<const float> v, Rows<float> out,
                    std::int64_t S, std::int64_t prior, std::int64_t hd, std::int64_t first, std::int64_t stride,
                    float* kt, float* p) {
    // The keys as columns, zero past the last: a row of 16 scores is then sixteen multiply-adds per element
    // of q, where key-by-key dot products each end in a horizontal sum. Transposed in 16 x 16 tiles in
    // registers: element by element, the transposition took about a fifth of a 128-key head.
    const std::int64_t keys = prior + S;
    for (std::int64_t j0 = 0; j0 < keys; j0 += 16)
        for (std::int64_t c0 = 0; c0 < hd; c0 += 16)
            transposeTile16(k.data + j0 * k.ld + c0, k.ld, std::min<std::int64_t>(16, keys - j0),
                            kt + c0 * kWideAttentionKeys + j0, kWideAttentionKeys);
    // Four rows a group up to 64 keys, two beyond: a group's scores, rows x keys / 16, fill 16 registers at
    // most, beside the 8 of a row of keys.
    const int R = keys <= 64 ? 4 : 2;
    for (std::int64_t g = first; R * g < S; g += stride) {
        const float* qs[4];
        float* os[4];
        std::int64_t visible[4];
        for (int r = 0; r < R; ++r) {
            const auto i = std::min(R * g + r, S - 1);
            qs[r] = q.data + i * q.ld;
            os[r] = out.data + i * out.ld;
            visible[r] = prior + i + 1;
        }
        const auto blocks = (visible[R - 1] + 15) / 16;
        if (R == 4) {
            switch (blocks) {
            case 1: attendRowsWide<4, 1>(qs, kt, v, os, visible, hd, p); break;
            case 2: attendRowsWide<4, 2>(qs, kt, v, os, visible, hd, p); break;
            case 3: attendRowsWide<4, 3>(qs, kt, v, os, visible, hd, p); break;
            default: attendRowsWide<4, 4>(qs, kt, v, os, visible, hd, p); break;
            }
        } else {
            switch (blocks) {
            case 1: attendRowsWide<2, 1>(qs, kt, v, os, visible, hd, p); break;
            case 2: attendRowsWide<2, 2>(qs, kt, v, os, visible, hd, p); break;
            case 3: attendRowsWide<2, 3>(qs, kt, v, os, visible, hd, p); break;
            case 4: attendRowsWide<2, 4>(qs, kt, v, os, visible, hd, p); break;
            case 5: attendRowsWide<2, 5>(qs, kt, v, os, visible, hd, p); break;
            case 6: attendRowsWide<2, 6>(qs, kt, v, os, visible, hd, p); break;
            case 7: attendRowsWide<2, 7>(qs, kt, v, os, visible, hd, p); break;
            default: attendRowsWide<2, 8>(qs, kt, v, os, visible, hd, p); break;
            }
        }
    }
}

#pragma GCC diagnostic pop

#undef MODSCOPE_LOAD8
#undef MODSCOPE_SUM8

}  // namespace

const char* isaName(Isa isa) {
    switch (isa) {
    case Isa::Baseline: return "baseline";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    }
    return "unknown";
}

std::optional<Isa> isaFromName(const std::string& name) {
    std::string lower(name);
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    for (const Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512})
        if (lower == isaName(isa)) return isa;
    return std::nullopt;
}

Isa cpuIsa() {
    static const Isa isa = detectIsa();
    return isa;
}

Isa environmentIsaCap() { return isaEnvironment().cap; }

std::string environmentIsaError() { return isaEnvironment().error; }

// Set at start-up, before main(): a kernel that some other file's static initialiser ran earlier would have
// taken the baseline build, which runs on any CPU.
std::atomic<Isa> g_isa_level{std::min(cpuIsa(), environmentIsaCap())};

Isa isaLevel() { return isaNow(); }

Isa setIsaCap(Isa cap) {
    std::lock_guard<std::mutex> lock(g_isa_cap_mutex);
    const Isa before = g_isa_cap;
    g_isa_cap = cap;
    g_isa_level.store(std::min({cpuIsa(), environmentIsaCap(), cap}), std::memory_order_relaxed);
    return before;
}

bool wideAttentionFits(std::int64_t S, std::int64_t prior, std::int64_t hd) {
    return S > 1 && prior + S <= kWideAttentionKeys && hd % 16 == 0 && hd <= kWideAttentionHeadDim &&
           isaNow() >= Isa::Avx512;
}

bool appliesTo(const torch::Tensor& t) { return applies(t) && t.dim() > 0 && (t.stride(-1) == 1 || t.size(-1) == 1); }

torch::Tensor rmsNorm(const torch::Tensor& x_in, const torch::Tensor& weight, double eps,
                      const torch::Tensor& plus) {
    TORCH_CHECK(appliesTo(x_in) && appliesTo(weight) && weight.dim() == 1 && weight.size(0) == x_in.size(-1),
                "cpu::rmsNorm: float32 CPU x [..., d] and weight [d] expected");
    TORCH_CHECK(!plus.defined() || (appliesTo(plus) && plus.sizes() == x_in.sizes()),
                "cpu::rmsNorm: the added rows must be float32 CPU and shaped as x");
    const auto d = x_in.size(-1);
    const auto x = x_in.reshape({-1, d});  // a view whenever the rows allow one, whatever their spacing
    const auto a = plus.defined() ? plus.reshape({-1, d}) : plus;
    const auto w = weight.contiguous();
    auto y = torch::empty(x_in.sizes(), x_in.options());
    const auto rows = x.size(0), ldx = rows > 1 ? x.stride(0) : d;
    const auto lda = a.defined() && rows > 1 ? a.stride(0) : d;
    const float* xp = x.data_ptr<float>();
    const float* ap = a.defined() ? a.data_ptr<float>() : nullptr;
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    forRowShares(rows, [&](std::int64_t r0, std::int64_t r1) {
        rmsNormRows(xp + r0 * ldx, ldx, ap != nullptr ? ap + r0 * lda : nullptr, lda, wp, yp + r0 * d,
                    r1 - r0, d, static_cast<float>(eps));
    });
    return y;
}

std::pair<torch::Tensor, torch::Tensor> rmsNormBackward(const torch::Tensor& x_in,
                                                        const torch::Tensor& weight, double eps,
                                                        const torch::Tensor& grad) {
    TORCH_CHECK(appliesTo(x_in) && appliesTo(weight) && weight.dim() == 1 && weight.size(0) == x_in.size(-1),
                "cpu::rmsNormBackward: float32 CPU x [..., d] and weight [d] expected");
    TORCH_CHECK(applies(grad) && grad.sizes() == x_in.sizes(),
                "cpu::rmsNormBackward: the gradient must be shaped as x");
    const auto d = x_in.size(-1);
    const auto x = x_in.reshape({-1, d});
    const auto dy = grad.contiguous();
    const auto w = weight.contiguous();
    auto dx = torch::empty(x_in.sizes(), x_in.options());
    const auto rows = x.size(0), ldx = rows > 1 ? x.stride(0) : d;
    const float *xp = x.data_ptr<float>(), *gp = dy.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* op = dx.data_ptr<float>();
    // dw summed over fixed blocks of rows, then block after block: the same bits on any number of threads
    // (training resumed from a checkpoint repeats the uninterrupted run's losses; trainer_test).
    constexpr std::int64_t kBlock = 64;
    const auto blocks = (rows + kBlock - 1) / kBlock;
    std::vector<float> partial(static_cast<std::size_t>(blocks * d), 0.0f);
    forRowShares(
        blocks,
        [&](std::int64_t b0, std::int64_t b1) {
            for (auto b = b0; b < b1; ++b) {
                const auto r0 = b * kBlock, n = std::min(kBlock, rows - r0);
                rmsNormBackwardRows(xp + r0 * ldx, ldx, gp + r0 * d, wp, op + r0 * d, partial.data() + b * d,
                                    n, d, static_cast<float>(eps));
            }
        },
        kParallelRows / kBlock);
    auto dw = torch::zeros({d}, weight.options());
    float* dwp = dw.data_ptr<float>();
    for (std::int64_t b = 0; b < blocks; ++b)
        for (std::int64_t j = 0; j < d; ++j) dwp[j] += partial[static_cast<std::size_t>(b * d + j)];
    return {dx, dw};
}

namespace {

// Token t's q and k rotated: head h of q (which 0) or k (which 1) read at src + which * sw + h * sh, written
// to dst as [2, H, hd]; f: the position's factors in PositionTables::rope ([cos, sin] x [q, k], hd each).
void rotateToken(const float* src, std::int64_t sw, std::int64_t sh, const float* f, std::int64_t H,
                 std::int64_t hd, float* dst) {
    for (std::int64_t which = 0; which < 2; ++which) {
        const float* c = f + which * hd;
        const float* sn = f + (2 + which) * hd;
        for (std::int64_t h = 0; h < H; ++h) rotateHead(src + which * sw + h * sh, c, sn, dst + (which * H + h) * hd, hd);
    }
}

// n tokens' q and k rotated into dst [n, 2, H, hd]: token t's heads read at src(t) as rotateToken reads them
// (sw, sh), by the factors (PositionTables::rope [L, 2, 2, 1, hd]) of its position pos[t] (pos: n integers,
// each checked to be in [0, L) by rotary()). `caller` names the entry point in the messages.
template <typename Source>
void rotateTokens(Source&& src, std::int64_t n, std::int64_t sw, std::int64_t sh, const torch::Tensor& pos_in,
                  const torch::Tensor& rope_in, std::int64_t H, std::int64_t hd, float* dst, const char* caller) {
    const auto r = rotary(pos_in, rope_in, n, hd, caller);
    forRowShares(n, [&](std::int64_t t0, std::int64_t t1) {
        for (auto t = t0; t < t1; ++t) rotateToken(src(t), sw, sh, r.factors(t, hd), H, hd, dst + t * 2 * H * hd);
    });
}

// silu(gate) * up for rows of [gate, up] (2 f, rows ld apart) into rows of f.
void swiGluRows(const float* src, std::int64_t ld, float* dst, std::int64_t rows, std::int64_t f) {
    forRowShares(
        rows,
        [&](std::int64_t r0, std::int64_t r1) {
            for (auto r = r0; r < r1; ++r) siluTimes(src + r * ld, src + r * ld + f, dst + r * f, f);
        },
        swiGluSplitRows(f));
}

// Heads of rows: head h's row i at data + h * hs + i * ld.
template <typename T>
struct HeadRows {
    T* data;
    std::int64_t hs, ld;
    Rows<T> head(std::int64_t h) const { return {data + h * hs, ld}; }
};

// attendHeadWide for N heads, this thread's alternate groups of rows (all of them outside a parallel region).
void attendHeadsWideShare(HeadRows<const float> q, HeadRows<const float> k, HeadRows<const float> v,
                          HeadRows<float> out, std::int64_t N, std::int64_t S, std::int64_t prior,
                          std::int64_t hd) {
#ifdef _OPENMP
    const std::int64_t first = omp_get_thread_num(), stride = omp_get_num_threads();
#else
    const std::int64_t first = 0, stride = 1;
#endif
    alignas(64) float kt[kWideAttentionHeadDim * kWideAttentionKeys];
    alignas(64) float p[2 * kWideAttentionKeys];  // four rows of 64 keys, or two of 128
    for (std::int64_t h = 0; h < N; ++h)
        attendHeadWide(q.head(h), k.head(h), v.head(h), out.head(h), S, prior, hd, first, stride, kt, p);
}

// smallCausalAttention on raw heads: N heads, S queries after `prior` keys.
void attendHeads(HeadRows<const float> q, HeadRows<const float> k, HeadRows<const float> v, HeadRows<float> out,
                 std::int64_t N, std::int64_t S, std::int64_t prior, std::int64_t hd) {
    if (wideAttentionFits(S, prior, hd)) {
        // Threads take alternate groups of rows of every head, from kParallelWideAttentionRows rows.
        const int team = S >= kParallelWideAttentionRows ? at::get_num_threads() : 1;
        MODSCOPE_TEAM_REGION(team)
        attendHeadsWideShare(q, k, v, out, N, S, prior, hd);
        return;
    }
    // Rounded up to whole vectors: expRow then takes no scalar tail; scores past the last visible key are
    // never read.
    std::vector<float> scores(static_cast<std::size_t>((prior + S + 7) / 8 * 8));
    for (std::int64_t h = 0; h < N; ++h) attendHead(q.head(h), k.head(h), v.head(h), out.head(h), S, prior, hd, scores.data());
}

}  // namespace

torch::Tensor rotateQK(const torch::Tensor& qk, const torch::Tensor& pos_in, const torch::Tensor& rope_in) {
    TORCH_CHECK(appliesTo(qk) && qk.dim() == 5 && qk.size(2) == 2 && qk.size(-1) % 2 == 0,
                "cpu::rotateQK: float32 CPU qk [B, S, 2, H, hd] expected");
    const auto B = qk.size(0), S = qk.size(1), H = qk.size(3), hd = qk.size(4);
    auto out = torch::empty({B, S, 2, H, hd}, qk.options());
    const float* xp = qk.data_ptr<float>();
    const auto sb = qk.stride(0), ss = qk.stride(1);
    rotateTokens([&](std::int64_t t) { return xp + (t / S) * sb + (t % S) * ss; }, B * S, qk.stride(2),
                 qk.stride(3), pos_in, rope_in, H, hd, out.data_ptr<float>(), "cpu::rotateQK");
    return out;
}

namespace {

// Rows [i0, i1) of x through units [j0, j1) of the predictor's first layer, in the build chosen: one pass, so at
// most its rows (fewer: the last one again, into its own place). row(i): row i's x; out(i): where its
// pre-activations go.
template <typename Row, typename Out>
void predictorHiddenPass(bool wide, bool fma, std::int64_t i0, std::int64_t i1, Row&& row, Out&& out,
                         std::int64_t d, const float* w1, std::int64_t h, const float* b1, std::int64_t j0,
                         std::int64_t j1) {
    const auto rows_per_pass = wide ? kPredictorRowsPerPassWide : kPredictorRowsPerPass;
    const float* xs[kPredictorRowsPerPassWide];
    float* ys[kPredictorRowsPerPassWide];
    for (std::int64_t p = 0; p < rows_per_pass; ++p) {
        const auto ip = std::min(i0 + p, i1 - 1);
        xs[p] = row(ip);
        ys[p] = out(ip);
    }
    if (wide)
        predictorHiddenRowsWide(xs, d, w1, h, b1, j0, j1, ys);
    else if (fma)
        predictorHiddenRowsFma(xs, d, w1, h, b1, j0, j1, ys);
    else
        predictorHiddenRowsBaseline(xs, d, w1, h, b1, j0, j1, ys);
}

// The rows of a row copy: x [N, d] with rows [k], or x [B, T, d] with rows [B, k] (each batch row's own
// positions), read off sizes and strides without a tensor op: at a routed layer's 64 rows the views and
// reshapes of the flattened form cost as much as the copy (below).
struct RowSet {
    std::int64_t batches = 1, T = 0, k = 0, d = 0;
    std::int64_t batch_stride = 0, row_stride = 0;  // of x, in floats
    const std::int64_t* rows = nullptr;             // [batches * k]
    // Where row i of the set (batch i / k) lies, counted from x's first float.
    std::int64_t offset(std::int64_t i) const { return (i / k) * batch_stride + rows[i] * row_stride; }
};

RowSet rowSet(const torch::Tensor& x, const torch::Tensor& rows, const char* what) {
    TORCH_CHECK(appliesTo(x) && ((x.dim() == 2 && rows.dim() == 1) ||
                                 (x.dim() == 3 && rows.dim() == 2 && rows.size(0) == x.size(0))),
                what, ": float32 CPU x [N, d] with rows [k], or x [B, T, d] with rows [B, k], expected");
    TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kLong && rows.is_contiguous(),
                what, ": rows must be contiguous CPU int64");
    RowSet set;
    set.batches = x.dim() == 3 ? x.size(0) : 1;
    set.T = x.size(-2);
    set.d = x.size(-1);
    set.k = rows.size(-1);
    set.batch_stride = x.dim() == 3 ? x.stride(0) : 0;
    set.row_stride = x.stride(-2);
    set.rows = rows.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < set.batches * set.k; ++i)
        TORCH_CHECK(set.rows[i] >= 0 && set.rows[i] < set.T, what, ": row ", set.rows[i], " out of range");
    return set;
}

}  // namespace

torch::Tensor gatherRows(const torch::Tensor& x, const torch::Tensor& rows) {
    const auto set = rowSet(x, rows, "cpu::gatherRows");
    const auto n = set.batches * set.k, d = set.d;
    auto out = x.dim() == 3 ? torch::empty({set.batches, set.k, d}, x.options()) : torch::empty({n, d}, x.options());
    const float* src = x.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    // The rows a few copies ahead are requested before they are needed: the embedding table's rows come from
    // memory, and a copy that waits for each row's first line in turn took 24.5 us for 128 of them with the
    // table out of cache, 20.3 this way.
    const auto fetch = [&](std::int64_t i) {
        const char* row = reinterpret_cast<const char*>(src + set.offset(i));
        for (std::int64_t b = 0; b < d * std::int64_t(sizeof(float)); b += 64)
            __builtin_prefetch(row + b, 0, 3);
    };
    constexpr std::int64_t kAhead = 8;
    forRowShares(n, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < std::min(i0 + kAhead, i1); ++i) fetch(i);
        for (std::int64_t i = i0; i < i1; ++i) {
            if (i + kAhead < i1) fetch(i + kAhead);
            std::memcpy(dst + i * d, src + set.offset(i), sizeof(float) * d);
        }
    });
    return out;
}

torch::Tensor rowDot(const torch::Tensor& x, const torch::Tensor& w) {
    TORCH_CHECK(appliesTo(x) && applies(w) && w.is_contiguous() && w.numel() == x.size(-1),
                "cpu::rowDot: float32 CPU x [..., d] and a contiguous w of d floats expected");
    const auto d = x.size(-1);
    auto out = torch::empty(x.sizes().slice(0, x.dim() - 1), x.options());
    // A contiguous x needs no reshape: its rows follow each other every d floats.
    const auto x2d = x.is_contiguous() ? x : x.reshape({-1, d});
    const auto ldx = x.is_contiguous() || x2d.size(0) <= 1 ? d : x2d.stride(0);
    const float* xp = x2d.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    forRowShares(out.numel(), [&](std::int64_t r0, std::int64_t r1) {
        rowDots(xp + r0 * ldx, ldx, r1 - r0, wp, d, op + r0);
    });
    return out;
}

void addGatedRows(torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& logits,
                  const torch::Tensor& delta) {
    const auto set = rowSet(x, rows, "cpu::addGatedRows");
    TORCH_CHECK(x.is_contiguous(), "cpu::addGatedRows: x must be contiguous");
    const auto n = set.batches * set.k, d = set.d;
    TORCH_CHECK(applies(delta) && delta.is_contiguous() && delta.numel() == n * d,
                "cpu::addGatedRows: delta must be a contiguous float32 [k, d] or [B, k, d]");
    TORCH_CHECK(applies(logits) && logits.is_contiguous() && logits.numel() == set.batches * set.T,
                "cpu::addGatedRows: logits must be a contiguous float32 [N] or [B, T]");
    const float* l = logits.data_ptr<float>();
    const float* from = delta.data_ptr<float>();
    float* to = x.data_ptr<float>();
    for (std::int64_t i = 0; i < n; ++i) {
        const auto at = set.offset(i);  // x is contiguous: the row's logit is at the same position / d
        addScaledRow(to + at, from + i * d, sigmoid(l[at / d]), d);
    }
}

void causalSoftmax(torch::Tensor& scores, std::int64_t first) {
    TORCH_CHECK(appliesTo(scores) && scores.dim() == 3 && first >= 0,
                "cpu::causalSoftmax: float32 CPU [P, n, keys] expected");
    const auto P = scores.size(0), n = scores.size(1), keys = scores.size(2);
    const auto sp = scores.stride(0), sr = scores.stride(1);
    float* base = scores.data_ptr<float>();
    forRowShares(P * n, [&](std::int64_t r0, std::int64_t r1) {
        for (auto r = r0; r < r1; ++r) {
            const auto p = r / n, i = r % n;
            causalSoftmaxRow(base + p * sp + i * sr, std::min(keys, first + i + 1), keys);
        }
    });
}

torch::Tensor predictorLogits(const torch::Tensor& x, const torch::Tensor& fc1_t_in,
                              const torch::Tensor& b1_in, const torch::Tensor& w2_in, const torch::Tensor& b2,
                              const torch::Tensor& rows) {
    TORCH_CHECK(appliesTo(x) && x.dim() == 2 && applies(fc1_t_in) && fc1_t_in.dim() == 2 &&
                    fc1_t_in.size(0) == x.size(1),
                "cpu::predictorLogits: float32 CPU x [N, d] and fc1_t [d, h] expected");
    const auto d = x.size(1), h = fc1_t_in.size(1);
    const auto fc1_t = fc1_t_in.contiguous(), b1 = b1_in.contiguous(), w2 = w2_in.contiguous().view({-1});
    TORCH_CHECK(
        applies(b1) && b1.numel() == h && applies(w2) && w2.numel() == h && applies(b2) && b2.numel() == 1,
        "cpu::predictorLogits: b1 [h], w2 [h] and b2 [1] expected");
    const std::int64_t* r = rows.defined() ? rowSet(x, rows, "cpu::predictorLogits").rows : nullptr;
    const auto n = rows.defined() ? rows.numel() : x.size(0);
    auto out = torch::empty({n}, x.options());
    if (n == 0) return out;
    const float* xp = x.data_ptr<float>();
    const auto ld = x.size(0) > 1 ? x.stride(0) : d;
    const float *w1 = fc1_t.data_ptr<float>(), *b1p = b1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
    const float bias = *b2.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const auto row = [&](std::int64_t i) { return xp + (r != nullptr ? r[i] : i) * ld; };
    const Isa isa = isaNow();
    const bool wide = isa >= Isa::Avx512, fma = isa >= Isa::Avx2;
    const auto unit_block = wide ? kPredictorUnitBlockWide : kPredictorUnitBlock;
    const auto rows_per_pass = wide ? kPredictorRowsPerPassWide : kPredictorRowsPerPass;
    forRowShares(
        n,
        [&](std::int64_t i0, std::int64_t i1) {
            std::vector<float> hidden(static_cast<std::size_t>((i1 - i0) * h));
            const auto out = [&](std::int64_t i) { return hidden.data() + (i - i0) * h; };
            // Block by block of w1, every row of the share through each block while it sits in L1.
            for (std::int64_t j0 = 0; j0 < h; j0 += unit_block) {
                const auto j1 = std::min(h, j0 + unit_block);
                for (auto i = i0; i < i1; i += rows_per_pass)
                    predictorHiddenPass(wide, fma, i, std::min(i1, i + rows_per_pass), row, out, d, w1, h, b1p,
                                        j0, j1);
            }
            for (auto i = i0; i < i1; ++i) o[i] = predictorOutput(out(i), h, w2p, bias);
        },
        kParallelPredictorRows);
    return out;
}

RowFeed::RowFeed(std::int64_t capacity) : rows_(static_cast<std::size_t>(std::max<std::int64_t>(capacity, 0))) {}

void RowFeed::push(std::int64_t row) {
    TORCH_CHECK(pushed_ < static_cast<std::int64_t>(rows_.size()), "RowFeed: more rows than its room");
    rows_[static_cast<std::size_t>(pushed_++)] = row;
    published_.store(pushed_, std::memory_order_release);
}

void RowFeed::close() { closed_.store(true, std::memory_order_release); }

bool RowFeed::claim(std::int64_t most, std::int64_t& i0, std::int64_t& i1) {
    for (int spins = 0;; ++spins) {
        // closed_ before published_: a feed seen closed has published its last row.
        const bool closed = closed_.load(std::memory_order_acquire);
        const auto ready = published_.load(std::memory_order_acquire);
        auto from = claimed_.load(std::memory_order_relaxed);
        const auto waiting = ready - from;
        if (waiting >= most || (closed && waiting > 0)) {
            const auto take = std::min(most, waiting);
            if (claimed_.compare_exchange_weak(from, from + take, std::memory_order_relaxed)) {
                i0 = from;
                i1 = from + take;
                return true;
            }
            continue;
        }
        if (closed) return false;
        // A producer the kernel has preempted gets this core back after a while, rather than a time slice.
        if (spins % 1024 == 1023)
            std::this_thread::yield();
        else
            _mm_pause();
    }
}

void predictorLogitsFed(const PredictorParams& params, const float* x, std::int64_t ld, RowFeed& feed,
                        const std::function<void()>& produce, float* logits) {
    const auto d = params.d, h = params.h;
    const Isa isa = isaNow();
    const bool wide = isa >= Isa::Avx512, fma = isa >= Isa::Avx2;
    const auto unit_block = wide ? kPredictorUnitBlockWide : kPredictorUnitBlock;
    const auto pass = wide ? kPredictorRowsPerPassWide : kPredictorRowsPerPass;
    // Claims a pass of rows at a time: a pass costs the same whether it holds one row or all of them.
    const auto take = [&] {
        std::vector<float> hidden(static_cast<std::size_t>(pass * h));
        std::int64_t i0 = 0, i1 = 0;
        const auto row = [&](std::int64_t i) { return x + feed.rows()[i] * ld; };
        while (feed.claim(pass, i0, i1)) {
            const auto out = [&](std::int64_t i) { return hidden.data() + (i - i0) * h; };
            for (std::int64_t j0 = 0; j0 < h; j0 += unit_block)
                predictorHiddenPass(wide, fma, i0, i1, row, out, d, params.fc1_t, h, params.b1, j0,
                                    std::min(h, j0 + unit_block));
            for (auto i = i0; i < i1; ++i)
                logits[i] = predictorOutput(out(i), h, params.w2, params.b2);
        }
    };
    std::exception_ptr error;
    const int team = feed.capacity() >= kParallelFedRows ? at::get_num_threads() : 1;
    MODSCOPE_TEAM_REGION(team)
    {
        if (myThread() == 0) {
            try {
                produce();
            } catch (...) {
                error = std::current_exception();
            }
            feed.close();
        }
        take();
    }
    if (error) std::rethrow_exception(error);
}

torch::Tensor swiGlu(const torch::Tensor& gate_up) {
    TORCH_CHECK(appliesTo(gate_up) && gate_up.size(-1) % 2 == 0,
                "cpu::swiGlu: float32 CPU [..., 2 f] expected");
    const auto f = gate_up.size(-1) / 2;
    const auto gu = gate_up.reshape({-1, 2 * f});
    auto sizes = gate_up.sizes().vec();
    sizes.back() = f;
    auto out = torch::empty(sizes, gate_up.options());
    const auto rows = gu.size(0), ld = rows > 1 ? gu.stride(0) : 2 * f;
    swiGluRows(gu.data_ptr<float>(), ld, out.data_ptr<float>(), rows, f);
    return out;
}

torch::Tensor swiGluBackward(const torch::Tensor& gate_up, const torch::Tensor& grad_in) {
    TORCH_CHECK(appliesTo(gate_up) && gate_up.size(-1) % 2 == 0,
                "cpu::swiGluBackward: float32 CPU [..., 2 f] expected");
    const auto f = gate_up.size(-1) / 2;
    const auto gu = gate_up.reshape({-1, 2 * f});
    const auto rows = gu.size(0), ld = rows > 1 ? gu.stride(0) : 2 * f;
    const auto grad = grad_in.contiguous();
    TORCH_CHECK(applies(grad) && grad.numel() == rows * f,
                "cpu::swiGluBackward: the gradient must be [..., f]");
    auto out = torch::empty(gate_up.sizes(), gate_up.options());
    const float* src = gu.data_ptr<float>();
    const float* dy = grad.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    forRowShares(
        rows,
        [&](std::int64_t r0, std::int64_t r1) {
            std::vector<float> e(static_cast<std::size_t>(f));
            for (auto r = r0; r < r1; ++r)
                siluTimesBackward(src + r * ld, src + r * ld + f, dy + r * f, dst + r * 2 * f,
                                  dst + r * 2 * f + f, e.data(), f);
        },
        swiGluSplitRows(f));
    return out;
}

void smallCausalAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          std::int64_t prior, torch::Tensor& out) {
    TORCH_CHECK(appliesTo(q) && appliesTo(k) && appliesTo(v) && appliesTo(out) && q.dim() == 3 &&
                    k.dim() == 3 && v.dim() == 3 && out.dim() == 3,
                "cpu::smallCausalAttention: float32 CPU [N, rows, hd] tensors expected");
    const auto N = q.size(0), S = q.size(1), hd = q.size(2), keys = k.size(1);
    TORCH_CHECK(
        k.size(0) == N && v.size(0) == N && out.size(0) == N && k.size(2) == hd && v.size(2) == hd &&
            out.size(2) == hd && v.size(1) == keys && out.size(1) == S && prior >= 0 && keys == prior + S,
        "cpu::smallCausalAttention: q [N, S, hd], k and v [N, prior + S, hd], out [N, S, hd] expected");
    attendHeads({q.data_ptr<float>(), q.stride(0), q.stride(1)}, {k.data_ptr<float>(), k.stride(0), k.stride(1)},
                {v.data_ptr<float>(), v.stride(0), v.stride(1)}, {out.data_ptr<float>(), out.stride(0), out.stride(1)},
                N, S, prior, hd);
}

namespace {

// x [S, d] as the fused blocks read it (contiguous float32, d = heads * head_dim): returns S.
std::int64_t blockRowsChecked(const torch::Tensor& x, const BlockWeights& w, const char* caller) {
    TORCH_CHECK(
        appliesTo(x) && x.dim() == 2 && x.size(1) == w.d && x.is_contiguous() && w.heads * w.head_dim == w.d,
        caller, ": contiguous float32 CPU x [S, d] expected");
    return x.size(0);
}

// Floats that only grow, left uninitialised. One vector that both fused blocks resized zero-filled 1.5 MB on
// the calling thread whenever a full layer followed a routed layer's 16 rows, and the other thread then
// fetched its half from that core: the full layers after routed ones took 930-980 us against 735-760 for the
// first (T = 128, cores far apart; about 650 against 630 near).
class StageBuffer {
public:
    float* atLeast(std::size_t n) {
        if (n > size_) {
            data_.reset(new float[n]);
            size_ = n;
        }
        return data_.get();
    }

private:
    std::unique_ptr<float[]> data_;
    std::size_t size_ = 0;
};

// A fused block's rows of each stage, one after another in `buffer`: h [S, d], qkv [S, 3d], qk [S, 2, H, hd],
// heads merged [S, d], a [S, d], the norm of x + a [S, d], gate_up [S, 2ff], silu(gate) * up [S, ff], the
// MLP's output m [S, d].
struct BlockStages {
    float *h, *qkv, *qk, *merged, *a, *n2, *gu, *act, *m;

    static BlockStages of(std::int64_t S, const BlockWeights& w, StageBuffer& buffer) {
        const auto d = w.d, ff = w.ff;
        BlockStages st{};
        st.h = buffer.atLeast(static_cast<std::size_t>(S * (10 * d + 3 * ff)));
        st.qkv = st.h + S * d;
        st.qk = st.qkv + S * 3 * d;
        st.merged = st.qk + S * 2 * d;
        st.a = st.merged + S * d;
        st.n2 = st.a + S * d;
        st.gu = st.n2 + S * d;
        st.act = st.gu + S * 2 * ff;
        st.m = st.act + S * ff;
        return st;
    }
};

}  // namespace

bool smallBlockFits(std::int64_t S, std::int64_t hd) {
    return S >= 1 && (S <= kSmallAttentionQueries || (S <= kSmallBlockTokens && wideAttentionFits(S, 0, hd)));
}

torch::Tensor smallBlockDelta(const torch::Tensor& x, const torch::Tensor& pos_in, const torch::Tensor& rope_in,
                              const BlockWeights& w) {
    const auto d = w.d, H = w.heads, hd = w.head_dim, ff = w.ff;
    const auto S = blockRowsChecked(x, w, "cpu::smallBlockDelta");
    TORCH_CHECK(smallBlockFits(S, hd), "cpu::smallBlockDelta: ", S, " tokens is beyond the small attention");
    // This thread's own buffer, apart from the full layers': their rows stay in the cache of the thread that
    // owns them. m is unused: the MLP's output goes into the returned tensor.
    thread_local StageBuffer buffer;
    const auto st = BlockStages::of(S, w, buffer);
    float *h = st.h, *qkv = st.qkv, *qk = st.qk, *merged = st.merged, *a = st.a, *n2 = st.n2, *gu = st.gu,
          *act = st.act;
    const float* xp = x.data_ptr<float>();
    const auto norm = [&](const float* plus, const float* weight, float eps, float* y) {
        forRowShares(S, [&](std::int64_t r0, std::int64_t r1) {
            rmsNormRows(xp + r0 * d, d, plus != nullptr ? plus + r0 * d : nullptr, d, weight, y + r0 * d, r1 - r0, d, eps);
        });
    };
    norm(nullptr, w.attn_norm, w.attn_eps, h);
    gemmRows(h, d, w.qkv_t, 3 * d, qkv, 3 * d, S, 3 * d, d, 0.f);
    rotateTokens([&](std::int64_t t) { return qkv + t * 3 * d; }, S, d, hd, pos_in, rope_in, H, hd, qk,
                 "cpu::smallBlockDelta");
    attendHeads({qk, hd, 2 * d}, {qk + d, hd, 2 * d}, {qkv + 2 * d, hd, 3 * d}, {merged, hd, d}, H, S, 0, hd);
    gemmRows(merged, d, w.proj_t, d, a, d, S, d, d, 0.f);
    norm(a, w.mlp_norm, w.mlp_eps, n2);
    gemmRows(n2, d, w.gate_up_t, 2 * ff, gu, 2 * ff, S, 2 * ff, d, 0.f);
    swiGluRows(gu, 2 * ff, act, S, ff);
    auto out = torch::empty({S, d}, x.options());
    float* m = out.data_ptr<float>();
    gemmRows(act, ff, w.down_t, d, m, d, S, d, ff, 0.f);
    for (std::int64_t i = 0; i < S * d; ++i) m[i] += a[i];
    return out;
}

bool teamBlockFits(std::int64_t S, std::int64_t hd) {
    return S >= kTeamBlockRows && wideAttentionFits(S, 0, hd);
}

void addBlockInPlace(torch::Tensor& x, const torch::Tensor& pos, const torch::Tensor& rope,
                     const BlockWeights& w) {
    const auto d = w.d, H = w.heads, hd = w.head_dim, ff = w.ff;
    const auto S = blockRowsChecked(x, w, "cpu::addBlockInPlace");
    TORCH_CHECK(teamBlockFits(S, hd), "cpu::addBlockInPlace: ", S, " tokens do not fit the team block");
    const auto r = rotary(pos, rope, S, hd, "cpu::addBlockInPlace");
    // Every thread's rows in the calling thread's buffer.
    thread_local StageBuffer buffer;
    const auto st = BlockStages::of(S, w, buffer);
    float *h = st.h, *qkv = st.qkv, *qk = st.qk, *merged = st.merged, *a = st.a, *n2 = st.n2, *gu = st.gu,
          *act = st.act, *m = st.m;
    float* xp = x.data_ptr<float>();

    // A failing stage (an sgemm status) is kept and rethrown after the region; the barriers are still met.
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    const auto guarded = [&](auto&& stage) {
        if (failed.load(std::memory_order_relaxed)) return;
        try {
            stage();
        } catch (...) {
            if (!failed.exchange(true)) error = std::current_exception();
        }
    };
    keepSignalsOffThisThread();  // the team's threads, before the products run inside the region
    const int team = at::get_num_threads();
    MODSCOPE_TEAM_REGION(team) {
        // Not a structured binding: the stages' lambdas capture these (clang refuses in C++17).
        const auto share = myShare(S, 4);
        const auto r0 = share.first, r1 = share.second, n = r1 - r0;
        guarded([&] {
            if (n == 0) return;
            rmsNormRows(xp + r0 * d, d, nullptr, 0, w.attn_norm, h + r0 * d, n, d, w.attn_eps);
            gemmRows(h + r0 * d, d, w.qkv_t, 3 * d, qkv + r0 * 3 * d, 3 * d, n, 3 * d, d, 0.f);
            for (auto t = r0; t < r1; ++t)
                rotateToken(qkv + t * 3 * d, d, hd, r.factors(t, hd), H, hd, qk + t * 2 * d);
        });
        MODSCOPE_TEAM_BARRIER
        // Every row's keys and values are in; the threads attend alternate groups of rows.
        guarded([&] {
            attendHeadsWideShare({qk, hd, 2 * d}, {qk + d, hd, 2 * d}, {qkv + 2 * d, hd, 3 * d},
                                 {merged, hd, d}, H, S, 0, hd);
        });
        MODSCOPE_TEAM_BARRIER
        guarded([&] {
            if (n == 0) return;
            gemmRows(merged + r0 * d, d, w.proj_t, d, a + r0 * d, d, n, d, d, 0.f);
            rmsNormRows(xp + r0 * d, d, a + r0 * d, d, w.mlp_norm, n2 + r0 * d, n, d, w.mlp_eps);
            gemmRows(n2 + r0 * d, d, w.gate_up_t, 2 * ff, gu + r0 * 2 * ff, 2 * ff, n, 2 * ff, d, 0.f);
            for (auto t = r0; t < r1; ++t) siluTimes(gu + t * 2 * ff, gu + t * 2 * ff + ff, act + t * ff, ff);
            gemmRows(act + r0 * ff, ff, w.down_t, d, m + r0 * d, d, n, d, ff, 0.f);
            // x + (m + a): the operator path's m.add_(a), then x.add_(m).
            for (auto i = r0 * d; i < r1 * d; ++i) xp[i] += m[i] + a[i];
        });
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace modscope::cpu
