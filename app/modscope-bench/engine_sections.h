// The engine's sections of modscope-bench: each measures, prints its table(s) and fills its part of the
// JSON report (docs/PERFORMANCE.md describes every one).
#pragma once

#include "bench_context.h"

namespace modscope::bench {

void benchForward(BenchContext& ctx);     // "forward": Model::run + trace at T = 32 … 2048
void benchModVsDense(BenchContext& ctx);  // "mod": forward time against the dense twin, with the ideal
void benchMixtures(BenchContext& ctx);    // "mixtures": MoE and both MoDE variants against dense and MoD
void benchInterventions(BenchContext& ctx);  // "interventions": per-token loss and the decision-value map
void benchStats(BenchContext& ctx);          // "stats": modscope-stats' tokens/s in both modes
void benchLayers(BenchContext& ctx);      // "layers": each layer's time inside the forward, MoD and dense
void benchGeneration(BenchContext& ctx);  // "generation": causal sampling, tokens/s and KV cache
void benchPeak(BenchContext& ctx);        // "peak": matmul GFLOP/s and the engine's share of it
void benchRouting(BenchContext& ctx);     // "routing": router, top-k, gather, scatter, predictor cost
void benchTraining(BenchContext& ctx);    // "training": Trainer tokens/s, MoD against dense
void benchReference(BenchContext& ctx);   // "reference": the reference shape's forward and its targets

}  // namespace modscope::bench
