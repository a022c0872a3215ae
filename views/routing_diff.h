// RoutingDiff: where two runs' processed/skipped decisions differ, cell by cell (the compare view's data).
//
// Plain data computed from two snapshots in the views, so the diff needs no engine code. Runs of different
// sizes compare over what they share: the first min(T) positions and the first min(L) layers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "routing_snapshot.h"

namespace modscope {

struct RoutingDiff {
    // Cell codes, row-major by layer: kFull where neither run routes the layer (both process every token,
    // so there is no decision to compare); otherwise bit 0 = live processed, bit 1 = pinned processed.
    // kExpertChanged: both processed the token (or neither routes the layer), and in a layer that is a
    // mixture in both runs a different expert ran its MLP, or an expert in one run and none in the other.
    static constexpr std::int8_t kFull = -1, kNeither = 0, kLiveOnly = 1, kPinnedOnly = 2, kBoth = 3,
                                 kExpertChanged = 4;

    int tokens = 0, layers = 0;                // the common prefix compared
    int live_tokens = 0, pinned_tokens = 0;    // each run's own size
    int live_layers = 0, pinned_layers = 0;
    std::vector<std::int8_t> cells;            // layers x tokens
    std::int64_t routed_cells = 0;             // cells of layers routed in either run
    std::int64_t differing = 0;                // of them, processed in exactly one run
    std::int64_t live_processed = 0, pinned_processed = 0;  // of them, processed per run
    std::int64_t expert_cells = 0;      // cells of layers that are mixtures in both runs, processed in both
    std::int64_t expert_differing = 0;  // of them, kExpertChanged

    std::int8_t at(int layer, int token) const { return cells[std::size_t(layer) * tokens + token]; }
    bool tokensTruncated() const { return live_tokens != pinned_tokens; }
    bool layersTruncated() const { return live_layers != pinned_layers; }

    static RoutingDiff of(const RoutingSnapshot& live, const RoutingSnapshot& pinned) {
        RoutingDiff d;
        d.live_tokens = live.tokens(), d.pinned_tokens = pinned.tokens();
        d.live_layers = live.layers(), d.pinned_layers = pinned.layers();
        d.tokens = std::min(d.live_tokens, d.pinned_tokens);
        d.layers = std::min(d.live_layers, d.pinned_layers);
        d.cells.assign(std::size_t(d.tokens) * d.layers, kFull);
        for (int l = 0; l < d.layers; ++l) {
            const LayerTrace& a = live.trace.layers[l];
            const LayerTrace& b = pinned.trace.layers[l];
            const bool experts = a.moe && b.moe && a.expert.size() >= std::size_t(d.tokens) &&
                                 b.expert.size() >= std::size_t(d.tokens);
            const auto compareExperts = [&](int t) {
                ++d.expert_cells;
                if (a.expert[t] == b.expert[t]) return false;
                ++d.expert_differing;
                d.cells[std::size_t(l) * d.tokens + t] = kExpertChanged;
                return true;
            };
            // A layer routed in one run and full in the other still has decisions that can differ.
            if (!a.routed && !b.routed) {
                for (int t = 0; experts && t < d.tokens; ++t) compareExperts(t);
                continue;
            }
            for (int t = 0; t < d.tokens; ++t) {
                const bool x = a.selected[t] != 0, y = b.selected[t] != 0;
                d.cells[std::size_t(l) * d.tokens + t] = std::int8_t((x ? 1 : 0) | (y ? 2 : 0));
                ++d.routed_cells;
                d.differing += x != y ? 1 : 0;
                d.live_processed += x ? 1 : 0;
                d.pinned_processed += y ? 1 : 0;
                if (experts && x && y) compareExperts(t);
            }
        }
        return d;
    }
};

}  // namespace modscope
