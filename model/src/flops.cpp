// FLOP accounting of a forward pass, the formula of docs/MODEL.md "FLOPs".
#include "nn/attention_blocks.h"
#include "modscope/engine.h"

namespace modscope {

namespace {

// A block on n tokens that attend among themselves: projections, the score and value products of the
// query blocks as computed (attention_blocks.h), and the SwiGLU MLP. One multiply-add counts 2.
// A mixture layer's MLP counts its router on the n tokens and the experts on the mlp_rows they ran.
double blockFlops(const ModelConfig& c, double n, double mlp_rows, bool moe) {
    const double d = c.d_model, ff = c.d_ff;
    const double projections = 2 * n * d * (3 * d) + 2 * n * d * d;
    const double attention = 2 * (2 * attentionScorePairs(n) * d);
    const double mlp = 2 * mlp_rows * d * (2 * ff) + 2 * mlp_rows * ff * d;
    const double expert_router = moe ? 2 * n * d * c.routerChoices() : 0.0;
    return projections + attention + mlp + expert_router;
}

double routingFlops(const ModelConfig& c, double T, double predictor_rows) {
    const double d = c.d_model, h = c.predictor_hidden;
    return 2 * T * d + 2 * predictor_rows * (d * h + h);  // router, predictor
}

double headFlops(const ModelConfig& c, double T) { return 2 * T * double(c.d_model) * c.vocab_size; }

}  // namespace

double forwardFlops(const ModelConfig& config, int seq_len, const std::vector<int>& processed,
                    int head_positions, const std::vector<int>& predictor_rows, const std::vector<int>& expert_rows) {
    double total = headFlops(config, head_positions < 0 ? seq_len : head_positions);
    for (int i = 0; i < config.n_layers; ++i) {
        const double n = i < static_cast<int>(processed.size()) ? processed[i] : seq_len;
        const bool moe = config.isMoe(i);
        const double mlp_rows = moe && i < static_cast<int>(expert_rows.size()) ? expert_rows[i] : n;
        total += blockFlops(config, n, mlp_rows, moe);
        const double rows = i < static_cast<int>(predictor_rows.size()) ? predictor_rows[i] : seq_len;
        if (config.isRouted(i)) total += routingFlops(config, seq_len, rows);
    }
    return total;
}

double denseForwardFlops(const ModelConfig& config, int seq_len, int head_positions) {
    return headFlops(config, head_positions < 0 ? seq_len : head_positions) +
           config.n_layers * blockFlops(config, seq_len, seq_len, false);
}

}  // namespace modscope
