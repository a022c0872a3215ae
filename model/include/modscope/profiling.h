// ModScope profiling: measurements of the engine's internals for modscope-bench (docs/PERFORMANCE.md).
//
// Plain C++ types only, like engine.h: the benchmark tool (which also links Qt) never sees LibTorch. Every
// time here is wall-clock on the calling thread, under torch::InferenceMode, in milliseconds; the device
// is the model's (timings on a CUDA device would need synchronisation and are CPU-only for now).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

// One routed layer of a top-k forward split into its stages, each the median over reps of timing that
// stage alone on the same inputs (round-robin: each repetition times every stage once). The stages are what
// ModTransformerImpl::hidden does for a routed layer in Model::run (top-k mode, routing collected for the
// trace):
//   router     r = router(x)                           [1, T]
//   topk       nn::topkIndices(r, k)                   the k selected positions, ascending
//   predictor  predictor(x)                            the causal predictor on every token, for the trace
//   causal     causal mode's selection instead of top-k: the rule's walk along the row, the predictor read
//              for the tokens it can process (all of them, or with the prefix top-k only the candidates)
//   gather     the selected rows of x, copied out      [1, k, d]
//   block      block.delta on the k gathered tokens    attention + SwiGLU, the useful work
//   scatter    x[idx] += sigmoid(r[idx]) * delta       the gated update added into x's selected rows in place
//              (nn::addGatedRows: the update and the write-back are one pass)
// layer_ms times all of them in sequence, as one call; it is the denominator of the share.
struct RoutedLayerProfile {
    int layer = 0;
    int seq_len = 0;
    int k = 0;
    int reps = 0;
    double router_ms = 0, topk_ms = 0, predictor_ms = 0, causal_select_ms = 0, gather_ms = 0, block_ms = 0,
           scatter_ms = 0;
    double layer_ms = 0;  // median of the whole routed layer
    double layer_p10_ms = 0, layer_p90_ms = 0;

    // What routing adds around the block: router, top-k, predictor, gather and scatter.
    double routingMs() const { return router_ms + topk_ms + predictor_ms + gather_ms + scatter_ms; }
    double routingShare() const { return layer_ms > 0 ? routingMs() / layer_ms : 0.0; }

    // What each mode needs to route, as a share of that mode's routed layer (sums of stage medians):
    // top-k mode without a trace has no predictor; causal mode replaces top-k and the predictor with its
    // own selection (the block timed on k tokens, about what causal mode processes). The gated update counts
    // as routing, although a dense block adds its update to the residual stream too.
    double topkModeShare() const {
        const double routing = router_ms + topk_ms + gather_ms + scatter_ms;
        const double total = routing + block_ms;
        return total > 0 ? routing / total : 0.0;
    }
    double causalModeShare() const {
        const double routing = router_ms + causal_select_ms + gather_ms + scatter_ms;
        const double total = routing + block_ms;
        return total > 0 ? routing / total : 0.0;
    }
};

// Profiles routed layer `layer` (-1: the first routed layer) of model at seq_len tokens and the given
// capacity (< 0: the model's), on the embeddings of seeded random token ids. Throws Error when the model
// has no routed layer, the layer is not routed, or seq_len is outside 1 … max_seq_len.
RoutedLayerProfile profileRoutedLayer(const Model& model, int seq_len, int reps, double capacity = -1.0,
                                      int layer = -1, std::uint64_t seed = 1);

// Each layer's time inside the forward: ModTransformerImpl::hidden, in top-k mode without a trace
// (Model::run's forward alone), reads a clock between its layers; medians over reps of one call each, after
// one warm-up call. A layer's time runs from the end of the one before: for a routed layer it holds the
// router, top-k, gather, block and gated scatter. Throws Error as profileRoutedLayer does, and for a model
// not on the CPU (a device runs asynchronously: its layers would time their launches).
struct LayerProfile {
    int seq_len = 0;
    int reps = 0;
    double capacity = 0;
    std::vector<int> tokens;       // [n_layers] the tokens each layer's block processed: T, or k where routed
    std::vector<double> layer_ms;  // [n_layers] medians
    double forward_ms = 0;         // median of the whole call: the embedding, the layers and the final norm
    // Every timed call's figures, for merging the profiles of several calls: [n_layers][reps] and [reps].
    std::vector<std::vector<double>> layer_samples_ms;
    std::vector<double> forward_samples_ms;
};
LayerProfile profileLayers(const Model& model, int seq_len, int reps, double capacity = -1.0,
                           std::uint64_t seed = 1);

// A large float32 matmul (n x n by n x n on the CPU), as the machine's practical peak, by the library the
// engine multiplies with (oneDNN's sgemm, on LibTorch's threads) or by OpenBLAS, given every core for the
// measurement (the engine leaves it one thread otherwise: docs/CPU_BACKEND.md, Threads and matmuls).
enum class MatmulLibrary { Engine, OpenBlas };
struct MatmulPeak {
    int n = 0;
    int reps = 0;
    MatmulLibrary library = MatmulLibrary::Engine;
    int threads = 0;  // the threads the product ran on
    double best_ms = 0, median_ms = 0;
    double best_gflops = 0, median_gflops = 0;  // 2 n^3 FLOPs per product
};
MatmulPeak measureMatmulPeak(int n, int reps, MatmulLibrary library = MatmulLibrary::Engine);

// What the engine was built and runs with.
struct EngineBuildInfo {
    std::string torch_version;     // e.g. "1.13.1"
    std::string blas;              // LibTorch's BLAS_INFO; Debian's says "generic" (the selected libblas.so.3)
    int torch_threads = 0;         // LibTorch's intra-op threads now (RuntimeOptions::forTools() sets every core)
    std::string openblas_threads;  // $OPENBLAS_NUM_THREADS when set, else empty
    int openblas_threads_now = 0;  // OpenBLAS's thread count now (RuntimeOptions::single_thread_blas sets 1); 0: not OpenBLAS
    std::string matmul_library;    // what the engine's CPU matmuls run on, e.g. "oneDNN 2.6.3 sgemm"
};
EngineBuildInfo engineBuildInfo();

}  // namespace modscope
