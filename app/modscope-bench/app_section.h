// The "app" section of modscope-bench: the real MainWindow, offscreen when there is no display, timed
// from the start of a run (and from an edit) to the heatmap's repaint; and the heatmap's own repaint at
// 2,048 tokens × 32 layers.
#pragma once

#include "bench_context.h"

namespace modscope::bench {

void benchApp(BenchContext& ctx);

}  // namespace modscope::bench
