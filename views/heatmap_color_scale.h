// HeatmapColorScale: how the routing heatmap maps router logits to colours.
//
// One scale for all layers (the default) shows which layers have large logits, but a layer with large
// logits then flattens the others into one colour; each layer on its own range shows the order within every
// layer; a fixed range keeps colours comparable across runs. Beside a pinned run, both heatmaps use the
// range of both runs, so that a colour means the same logit in each.
#pragma once

namespace modscope {

struct HeatmapColorScale {
    enum class Mode { Shared, PerLayer, Fixed };
    Mode mode = Mode::Shared;
    double fixed_min = -10.0;  // Fixed: the logits at the ends of the gradient (beyond: the end colours)
    double fixed_max = 10.0;

    bool operator==(const HeatmapColorScale& o) const {
        return mode == o.mode && fixed_min == o.fixed_min && fixed_max == o.fixed_max;
    }
    bool operator!=(const HeatmapColorScale& o) const { return !(*this == o); }
};

}  // namespace modscope
