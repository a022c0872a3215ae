// The Mixture-of-Depths transformer's layers as LibTorch modules (internal to model/; docs/MODEL.md is the
// spec).
//
// Registered module and parameter names are the checkpoint keys: never rename one without a migration. Every
// forward here is written once, against the operations of backend/backend.h.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "modscope/engine.h"

namespace modscope::nn {

using backend::TransposedWeight;

struct RmsNormImpl : torch::nn::Module {
    RmsNormImpl(std::int64_t dim, double eps);
    // x [..., d] -> [..., d]; with plus, the norm of x + plus.
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& plus = {});

    torch::Tensor weight;  // [d]
    double eps;
};
TORCH_MODULE(RmsNorm);

// What a mixture layer's earlier tokens did, for a generation step to continue the sequence in order.
struct MixtureState {
    std::vector<std::int64_t> taken;  // [n_experts] tokens each expert ran so far
    std::int64_t tokens = 0;          // tokens that reached the mixture so far
};

// Keys and values a layer keeps for generation: only the tokens it processed.
struct LayerKV {
    torch::Tensor k;  // [B, H, n, hd], rotary already applied: a view of k_store's first n tokens
    torch::Tensor v;  // [B, H, n, hd], of v_store
    // Room for more tokens than n, grown by doubling: a step appends its token's keys and values in place,
    // where concatenating copied the whole cache at every step (quadratic in the generated length).
    torch::Tensor k_store, v_store;  // [B, H, capacity, hd]
    // Routed layers, B = 1, only when the causal rule uses the prefix top-k: every token's router logit so
    // far, processed or not.
    std::vector<float> router_logits;
    MixtureState mixture;  // mixture layers only
    std::int64_t length() const { return k.defined() ? k.size(2) : 0; }
    // Appends k_new and v_new [B, H, S, hd] after the n cached tokens; k and v then view all n + S.
    void append(const torch::Tensor& k_new, const torch::Tensor& v_new);
    // The keys and values of the n cached tokens (the room behind them may hold up to twice as many).
    std::int64_t bytes() const { return k.defined() ? 2 * k.numel() * k.element_size() : 0; }
};

// Tables that depend on positions only, shared by every layer and built once from the config.
struct PositionTables {
    PositionTables() = default;
    PositionTables(std::int64_t max_seq_len, std::int64_t head_dim, double rope_theta);

    // Rotary factors of each position for q and k at once: [max_seq_len, 2 (cos, sin), 2 (q, k), 1, hd],
    // holding (c, c) and (-s, s) over the two halves of a head, q's multiplied by 1/sqrt(hd).
    torch::Tensor rope;
    // Additive causal mask for a query block: [kAttentionQueryBlock, max_seq_len + kAttentionQueryBlock] of 0
    // and -inf (see causalBias).
    torch::Tensor causal_bias;

    // The mask of query rows [start, start + n) (n <= kAttentionQueryBlock) after `prior` cached keys over
    // the keys [0, prior + start + n): [n, prior + start + n], -inf where the key comes after the query.
    torch::Tensor causalBias(std::int64_t prior, std::int64_t start, std::int64_t n) const;
};

struct AttentionImpl : torch::nn::Module {
    explicit AttentionImpl(const ModelConfig& config);
    // x [B, S, d], pos [B, S]; causal over the S tokens in their given (original) order.
    // With kv, the cached keys come first and the new ones are appended to it.
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                          LayerKV* kv = nullptr);

    torch::nn::Linear qkv{nullptr};   // weight [3d, d]: rows q, then k, then v
    torch::nn::Linear proj{nullptr};  // weight [d, d]
    std::int64_t n_heads, head_dim;
    TransposedWeight qkv_t, proj_t;
};
TORCH_MODULE(Attention);

struct SwiGluImpl : torch::nn::Module {
    SwiGluImpl(std::int64_t d_model, std::int64_t d_ff);
    torch::Tensor forward(const torch::Tensor& x);

    torch::nn::Linear gate_up{nullptr};  // weight [2 d_ff, d]: rows gate, then up
    torch::nn::Linear down{nullptr};     // weight [d, d_ff]
    TransposedWeight gate_up_t, down_t;
};
TORCH_MODULE(SwiGlu);

// What a mixture MLP did with each of its S input tokens [B, S] (or, after processSelected, with each of the
// layer's T tokens, -1 and NaN where the MoD router kept a token out).
struct MixtureRouting {
    torch::Tensor choice;       // [B, S] int64: the router's top choice, n_experts and above a no-op
    torch::Tensor prob;         // [B, S] float: its probability
    torch::Tensor second;       // [B, S] int64: the runner-up (-1 with one choice)
    torch::Tensor second_prob;  // [B, S] float
    torch::Tensor expert;       // [B, S] int64: the expert that ran the token; -1 none
    // Switch Transformer's load-balancing loss, choices * sum_i f_i P_i over every router choice (no-ops
    // included): f_i the share of tokens whose top choice is i, P_i the mean probability of i. A scalar.
    torch::Tensor balance_loss;
    std::int64_t expert_rows = 0;      // tokens an expert ran, all rows
    std::int64_t tokens = 0;           // tokens that reached the mixture, all rows
};

// A mixture of SwiGLU experts with a top-1 router (docs/MODEL.md "Mixture layers"): the dense MLP's place in
// a block of ModelConfig::moe_layers. Token j of a row goes to its top choice when that is an expert holding
// fewer than expertCapacity(j + 1) tokens (earlier ones, in order), and comes out scaled by the choice's
// probability; a no-op choice or a full expert gives exactly 0.
struct MixtureMlpImpl : torch::nn::Module {
    MixtureMlpImpl(const ModelConfig& config);
    // x [B, S, d] (normed) -> [B, S, d]. With state (B = 1), the row continues the sequence state describes
    // and state is advanced; with out, what each token did.
    torch::Tensor forward(const torch::Tensor& x, MixtureState* state = nullptr, MixtureRouting* out = nullptr);

    torch::nn::Linear router{nullptr};  // weight [n_experts + noop_experts, d]
    torch::Tensor gate_up;              // [n_experts, 2 d_ff, d]: each expert's rows gate, then up
    torch::Tensor down;                 // [n_experts, d, d_ff]
    std::int64_t n_experts, noop_experts;
    double capacity_factor;
    TransposedWeight router_t;
    std::vector<std::unique_ptr<TransposedWeight>> gate_up_t, down_t;  // per expert
};
TORCH_MODULE(MixtureMlp);

// Causal routing predictor: reads the (stop-gradient) block input, one logit per token.
struct PredictorImpl : torch::nn::Module {
    PredictorImpl(std::int64_t d_model, std::int64_t hidden);
    torch::Tensor forward(const torch::Tensor& x);  // [B, S, d] -> [B, S] logits
    // The logits of rows `rows` (int64 [n]) of x2d [N, d] -> [n].
    torch::Tensor atRows(const torch::Tensor& x2d, const torch::Tensor& rows);
    backend::PredictorWeights weights() { return {fc1->weight, fc1->bias, fc2->weight, fc2->bias, fc1_t}; }

    torch::nn::Linear fc1{nullptr};  // weight [h, d], bias [h]
    torch::nn::Linear fc2{nullptr};  // weight [1, h], bias [1]
    TransposedWeight fc1_t;
};
TORCH_MODULE(Predictor);

struct BlockImpl : torch::nn::Module {
    BlockImpl(const ModelConfig& config, int index);
    // f(x) = a + m with a = attn(attn_norm(x)), m = mlp(mlp_norm(x + a)): the block's residual update. A
    // mixture layer reports its tokens' experts in mixture (when given) and continues kv's mixture state.
    torch::Tensor delta(const torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                        LayerKV* kv = nullptr, MixtureRouting* mixture = nullptr);
    // x += delta(x) for an inference forward's x [1, S, d] (contiguous), the same values.
    void addDeltaInPlace(torch::Tensor& x, const torch::Tensor& pos, const PositionTables& positions,
                         LayerKV* kv = nullptr, MixtureRouting* mixture = nullptr);

    // Routed only: r = w.x for x [B, S, d] -> [B, S].
    torch::Tensor routerLogits(const torch::Tensor& x);

    int index;
    bool routed;
    bool moe;
    RmsNorm attn_norm{nullptr};
    Attention attn{nullptr};
    RmsNorm mlp_norm{nullptr};
    SwiGlu mlp{nullptr};                // dense layers; registered as "mlp"
    MixtureMlp mixture{nullptr};        // mixture layers, in mlp's place: registered as "mlp" too
    torch::nn::Linear router{nullptr};  // routed only: weight [1, d], no bias
    Predictor predictor{nullptr};       // routed only
};
TORCH_MODULE(Block);

}  // namespace modscope::nn
