// How causal attention is tiled into query blocks: shared by the backends (backend/ops_backend.cpp,
// cpu/cpu_kernels_backend.cpp) and the FLOP count (flops.cpp), which reports the score products as computed.
#pragma once

#include <algorithm>
#include <cstdint>

namespace modscope {

// Query block length: a block's scores [heads, 128, visible] stay cache-sized, and blocks above the
// diagonal are never computed. A sequence of at most one block is one square product.
constexpr std::int64_t kAttentionQueryBlock = 128;

// Up to this many queries, a CPU forward without autograd attends row by row (cpu::smallCausalAttention):
// each query's scores stop at its own key, the triangle rather than the square block. The count below takes
// the triangle there for every path; autograd's and the GPU's square block computes at most 1.3% more of such
// a layer's FLOPs (d 192, 32 queries; docs/MODEL.md).
constexpr std::int64_t kSmallAttentionQueries = 32;

// Up to this many keys, cached and new, a CPU with AVX-512 attends a few query rows at a time with their
// scores in registers (cpu::smallCausalAttention: four rows up to 64 keys, two beyond), the triangle as well.
// The count below takes the triangle up to here; a CPU without AVX-512 computes the square block for 33 to
// 128 queries, at most 5.2% more of such a layer's FLOPs (d 192, SwiGLU 512, 128 queries; 2.7% at 64).
constexpr std::int64_t kWideAttentionKeys = 128;

// Query-key pairs whose scores a causal forward of n new tokens after `prior` cached ones computes.
inline double attentionScorePairs(double n, double prior = 0.0) {
    if (n <= kSmallAttentionQueries || prior + n <= kWideAttentionKeys) return n * prior + n * (n + 1) / 2;
    double pairs = 0.0;
    for (double s = 0; s < n; s += kAttentionQueryBlock) {
        const double m = std::min<double>(kAttentionQueryBlock, n - s);
        pairs += m * (prior + s + m);
    }
    return pairs;
}

}  // namespace modscope
