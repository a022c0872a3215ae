// How causal attention is tiled into query blocks: shared by the forward (mod_transformer.cpp) and the
// FLOP count (flops.cpp), which reports the score products as computed.
#pragma once

#include <algorithm>
#include <cstdint>

namespace modscope {

// Query block length: a block's scores [heads, 128, visible] stay cache-sized, and blocks above the
// diagonal are never computed. A sequence of at most one block is one square product.
constexpr std::int64_t kAttentionQueryBlock = 128;

// Query-key pairs whose scores a causal forward of n new tokens after `prior` cached ones computes.
inline double attentionScorePairs(double n, double prior = 0.0) {
    if (n <= 1) return n * (prior + n);
    double pairs = 0.0;
    for (double s = 0; s < n; s += kAttentionQueryBlock) {
        const double m = std::min<double>(kAttentionQueryBlock, n - s);
        pairs += m * (prior + s + m);
    }
    return pairs;
}

}  // namespace modscope
