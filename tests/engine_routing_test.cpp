// Routing behaviour of the MoD engine: k per layer, untouched skipped tokens, causality, dense equivalence.
#include <ATen/Parallel.h>

#include <QScopeGuard>
#include <QTest>
#include <algorithm>
#include <chrono>

#include "modscope/profiling.h"
#include "test_support.h"

using namespace modscope;

namespace {

// The model computed the plain way, with no gather or scatter: every token through every block, routed
// blocks' updates scaled by sigmoid(router logit). Capacity 1.0 must give exactly this.
torch::Tensor denseReferenceLogits(nn::ModTransformerImpl& net, const torch::Tensor& ids) {
    const auto T = ids.size(1);
    const auto pos = torch::arange(T, torch::kLong).unsqueeze(0);
    auto x = net.tok_emb(ids);
    for (auto& block : net.blocks) {
        const auto delta = block->delta(x, pos, net.positions);
        if (block->routed) x = x + torch::sigmoid(block->router(x)) * delta;
        else x = x + delta;
    }
    return net.logits(net.norm_f(x));
}

// The tiny model with the bundled model's causal corrections (budget gain 1.5, prefix top-k) and predictors
// balanced to select about the capacity, so that causal decisions are neither all nor none.
std::unique_ptr<Model> tinyModelWithCausalRule(std::uint64_t seed) {
    auto config = test::tinyConfig();
    config.predictor_budget_gain = 1.5;
    config.predictor_prefix_topk = true;
    auto model = test::createModel(config, seed);
    test::balancePredictors(*model, test::randomIds(64, 300, 3));
    return model;
}

}  // namespace

class EngineRoutingTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void capacityToKRounding() {
        QCOMPARE(capacityToK(0.125, 256), 32);
        QCOMPARE(capacityToK(0.125, 10), 2);  // ceil(1.25)
        QCOMPARE(capacityToK(0.125, 8), 1);
        QCOMPARE(capacityToK(0.0, 5), 1);     // at least one token
        QCOMPARE(capacityToK(1.0, 5), 5);
        QCOMPARE(capacityToK(0.5, 3), 2);
        QCOMPARE(capacityToK(0.3, 10), 3);    // 0.3 * 10 is 3.0000000000000004 in binary
        QCOMPARE(capacityToK(2.0, 7), 7);
    }

    void processesExactlyKTokens() {
        auto model = test::createModel(test::tinyConfig(), 1);
        for (int T : {1, 2, 7, 16, 33, 100, 160}) {
            for (double capacity : {0.0, 0.125, 0.25, 0.5, 0.9, 1.0}) {
                RunOptions opt;
                opt.capacity = capacity;
                const auto trace = model->run(test::randomIds(T, 300, T), opt);
                QCOMPARE(int(trace.layers.size()), 4);
                for (const auto& layer : trace.layers) {
                    const int expected = layer.routed ? capacityToK(capacity, T) : T;
                    QCOMPARE(layer.k, expected);
                    QCOMPARE(layer.processed, expected);
                    QCOMPARE(int(std::count(layer.selected.begin(), layer.selected.end(), 1)), expected);
                    QCOMPARE(int(layer.selected.size()), T);
                    if (layer.routed) {
                        // The selected tokens are exactly those at or above the k-th largest logit.
                        for (int t = 0; t < T; ++t) {
                            QCOMPARE(bool(layer.selected[t]), layer.rank[t] < layer.k);
                            if (layer.selected[t]) QVERIFY(layer.router_logits[t] >= layer.topk_threshold);
                            else QVERIFY(layer.router_logits[t] <= layer.topk_threshold);
                        }
                    }
                }
                // Skipping saves FLOPs whenever a token is skipped; with none skipped the router and
                // predictor are pure overhead.
                if (capacityToK(capacity, T) < T) QVERIFY(trace.flops < trace.dense_flops);
                else QVERIFY(trace.flops > trace.dense_flops);
            }
        }
    }

    void skippedTokensLeaveTheBlockUnchanged() {
        auto model = test::createModel(test::tinyConfig(), 2);
        test::balancePredictors(*model, test::randomIds(64, 300, 5));
        auto& net = *internals(*model).net;
        torch::NoGradGuard guard;
        for (auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            const auto ids = test::idsTensor(test::randomIds(64, 300, 5));
            std::vector<torch::Tensor> residuals;
            std::vector<nn::LayerRouting> routing;
            nn::ForwardOptions fo;
            fo.mode = mode;
            fo.capacity = 0.25;
            fo.collect = true;
            fo.residuals = &residuals;
            net.hidden(ids, fo, &routing);
            QCOMPARE(int(residuals.size()), 5);
            for (int layer : {1, 3}) {
                const auto before = residuals[layer][0], after = residuals[layer + 1][0];
                const auto selected = routing[layer].selected_mask[0];
                int skipped = 0, changed = 0;
                for (int t = 0; t < 64; ++t) {
                    if (selected[t].item<bool>()) {
                        changed += !torch::equal(before[t], after[t]);
                    } else {
                        ++skipped;
                        QVERIFY2(torch::equal(before[t], after[t]),
                                 qPrintable(QString("layer %1 token %2 changed while skipped").arg(layer).arg(t)));
                    }
                }
                QVERIFY(skipped > 0);
                QVERIFY(changed > 0);  // and the processed ones did go through the block
            }
        }
    }

    // A traced run's update_ratio is |x_out - x_in| / |x_in| per routed layer and token, computed here from the
    // residual stream in double: 0 exactly where the layer skipped the token, positive where it processed it.
    void updateRatioMeasuresEachLayersChange() {
        auto model = test::createModel(test::tinyConfig(), 4);
        test::balancePredictors(*model, test::randomIds(48, 300, 6));
        auto& net = *internals(*model).net;
        const auto ids = test::randomIds(48, 300, 6);
        for (auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            RunOptions ro;
            ro.mode = mode;
            ro.capacity = 0.25;
            const auto trace = model->run(ids, ro);
            std::vector<torch::Tensor> residuals;
            {
                torch::NoGradGuard guard;
                nn::ForwardOptions fo;
                fo.mode = mode;
                fo.capacity = 0.25;
                fo.setCausalRule(model->config());
                fo.residuals = &residuals;
                net.hidden(test::idsTensor(ids), fo);
            }
            for (int li = 0; li < 4; ++li) {
                const auto& l = trace.layers[li];
                if (!l.routed) {  // measured for routed layers only
                    QVERIFY(l.update_ratio.empty());
                    continue;
                }
                QCOMPARE(int(l.update_ratio.size()), 48);
                const auto before = residuals[li][0].to(torch::kDouble), after = residuals[li + 1][0].to(torch::kDouble);
                const auto expected = (after - before).norm(2, -1) / before.norm(2, -1);
                for (int t = 0; t < 48; ++t) {
                    const double want = expected[t].item<double>();
                    const float got = l.update_ratio[t];
                    if (l.routed && !l.selected[t]) {
                        QCOMPARE(got, 0.0f);
                        continue;
                    }
                    QVERIFY2(got > 0 && std::abs(got - want) <= 1e-4 * want + 1e-6,
                             qPrintable(QString("layer %1 token %2: %3, expected %4").arg(li).arg(t).arg(got).arg(want)));
                }
            }
        }
        // Without the per-token trace there is none.
        RunOptions bare;
        bare.per_token_routing = false;
        QVERIFY(model->run(ids, bare).layers[1].update_ratio.empty());
    }

    // A routed layer given its own capacity takes k from it; the others keep the run's. Layer 1 sees what a
    // run at its capacity would give it (layer 0 before it is full), so it selects the same tokens.
    void layerCapacityGivesALayerItsOwnK() {
        auto model = tinyModelWithCausalRule(8);
        const auto ids = test::randomIds(40, 300, 9);
        for (auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            RunOptions own;
            own.mode = mode;
            own.capacity = 0.125;
            own.layer_capacity = {-1.0, 0.5};
            const auto a = model->run(ids, own);
            RunOptions half;
            half.mode = mode;
            half.capacity = 0.5;
            const auto b = model->run(ids, half);
            QCOMPARE(a.layers[1].k, capacityToK(0.5, 40));
            QCOMPARE(a.layers[1].capacity, 0.5);
            QCOMPARE(a.layers[3].k, capacityToK(0.125, 40));
            QCOMPARE(a.layers[3].capacity, 0.125);
            QCOMPARE(a.capacity, 0.125);
            QCOMPARE(a.layers[1].selected, b.layers[1].selected);
            QCOMPARE(a.layers[1].predictor_selected, b.layers[1].predictor_selected);
            if (mode == RoutingMode::TopK) QCOMPARE(a.layers[1].processed, capacityToK(0.5, 40));
        }
        // The FLOPs count what each layer processed.
        RunOptions skip;
        skip.layer_capacity = {-1.0, 0.0, -1.0, 1.0};
        const auto t = model->run(ids, skip);
        QCOMPARE(t.layers[1].processed, 1);  // k >= 1 (capacityToK)
        QCOMPARE(t.layers[3].processed, 40);
        QCOMPARE(t.flops, forwardFlops(model->config(), 40, {40, 1, 40, 40}, 1));
        // More capacities than layers, or one that is not a number, is an error.
        RunOptions bad;
        bad.layer_capacity.assign(5, 0.5);
        QVERIFY_THROWS_EXCEPTION(Error, model->run(ids, bad));
        bad.layer_capacity = {std::nan("")};
        QVERIFY_THROWS_EXCEPTION(Error, model->run(ids, bad));
    }

    void capacityOneEqualsDenseComputation() {
        auto model = test::createModel(test::tinyConfig(), 3);
        auto& net = *internals(*model).net;
        torch::NoGradGuard guard;
        const auto idsVec = test::randomIds(50, 300, 9);
        const auto ids = test::idsTensor(idsVec);
        nn::ForwardOptions fo;
        fo.capacity = 1.0;
        const auto mod = net.logits(net.hidden(ids, fo));
        const auto dense = denseReferenceLogits(net, ids);
        const double diff = (mod - dense).abs().max().item<double>();
        QVERIFY2(diff < 1e-5, qPrintable(QString("max |MoD - dense| = %1").arg(diff)));

        // ... while a capacity below 1 does route, and so computes something else.
        fo.capacity = 0.5;
        QVERIFY((net.logits(net.hidden(ids, fo)) - dense).abs().max().item<double>() > 1e-3);

        // The dense baseline (no routed layers) has the same block layout and runs every token.
        auto dense_cfg = test::tinyConfig();
        dense_cfg.routed_layers.clear();
        auto baseline = test::createModel(dense_cfg, 3);
        for (const auto& layer : baseline->run(idsVec).layers) QCOMPARE(layer.processed, 50);
        QVERIFY(baseline->parameterCount() < model->parameterCount());
    }

    void causalModeIsCausal() {
        auto model = test::createModel(test::tinyConfig(), 4);
        const auto a = test::randomIds(80, 300, 21);
        test::balancePredictors(*model, a);
        auto b = a;
        for (int t = 50; t < 80; ++t) b[t] = (b[t] + 17) % 300;
        RunOptions opt;
        opt.mode = RoutingMode::Causal;
        opt.logits = RunOptions::Logits::All;
        const auto ta = model->run(a, opt), tb = model->run(b, opt);
        const int V = 300;
        for (int t = 0; t < 50; ++t)
            for (int v = 0; v < V; ++v)
                QVERIFY(std::abs(ta.logits[t * V + v] - tb.logits[t * V + v]) < 1e-5f);
        bool later_differs = false;
        for (int v = 0; v < V; ++v) later_differs |= ta.logits[60 * V + v] != tb.logits[60 * V + v];
        QVERIFY(later_differs);
        for (std::size_t li = 0; li < ta.layers.size(); ++li) {
            for (int t = 0; t < 50; ++t) {
                QCOMPARE(ta.layers[li].selected[t], tb.layers[li].selected[t]);
                if (ta.layers[li].routed)
                    QVERIFY(std::abs(ta.layers[li].predictor_prob[t] - tb.layers[li].predictor_prob[t]) < 1e-5f);
            }
        }

        // Top-k mode is not causal: a later token can push an earlier one out of the top k. Shown on the
        // same pair of prompts, so this test would notice a causal mode that quietly ran top-k.
        opt.mode = RoutingMode::TopK;
        const auto ka = model->run(a, opt), kb = model->run(b, opt);
        bool earlier_changed = false;
        for (std::size_t li = 0; li < ka.layers.size(); ++li)
            for (int t = 0; t < 50; ++t) earlier_changed |= ka.layers[li].selected[t] != kb.layers[li].selected[t];
        QVERIFY(earlier_changed);
    }

    void causalModeProcessesWhatThePredictorChose() {
        auto model = test::createModel(test::tinyConfig(), 5);
        test::balancePredictors(*model, test::randomIds(64, 300, 3));
        RunOptions opt;
        opt.mode = RoutingMode::Causal;
        const auto trace = model->run(test::randomIds(64, 300, 3), opt);
        for (const auto& layer : trace.layers) {
            if (!layer.routed) continue;
            QVERIFY(layer.processed > 0 && layer.processed < 64);
            QCOMPARE(layer.selected, layer.predictor_selected);
            QCOMPARE(layer.processed, int(std::count(layer.predictor_selected.begin(), layer.predictor_selected.end(), 1)));
            QCOMPARE(int(std::count(layer.topk_selected.begin(), layer.topk_selected.end(), 1)), layer.k);
            const auto agreement = Agreement::of(layer);
            QCOMPARE(agreement.total(), std::int64_t(64));
        }
    }

    // The budget rule on numbers worked by hand: capacity 0.25, gain 2, threshold 0.5, so token t is processed
    // when logit + 2 * (0.25 * (t + 1) - n_t) > 0.
    void budgetFeedbackFollowsItsFormula() {
        const nn::CausalRule rule{0.5, 0.25, 2.0};
        // t=0: 0.1 + 2*(0.25-0) = 0.6 > 0 -> 1 (n=1); t=1: 0.4 + 2*(0.5-1) = -0.6 -> 0;
        // t=2: -1.4 + 2*(0.75-1) = -1.9 -> 0;      t=3: -0.4 + 2*(1.0-1) = -0.4 -> 0;
        // t=4: -0.4 + 2*(1.25-1) = 0.1 -> 1 (n=2); t=5: 3.0 + 2*(1.5-2) = 2.0 -> 1 (n=3).
        const auto logits = torch::tensor({0.1, 0.4, -1.4, -0.4, -0.4, 3.0}, torch::kFloat32).view({1, 6});
        const auto flat = torch::zeros({1, 6});  // router logits: with no prefix top-k they do not matter
        const auto decided = [](const torch::Tensor& mask) {
            const auto m = mask.to(torch::kInt32).contiguous().view(-1);
            return std::vector<int>(m.data_ptr<int>(), m.data_ptr<int>() + m.numel());
        };
        QCOMPARE(decided(nn::causalSelection(logits, flat, rule)), (std::vector<int>{1, 0, 0, 0, 1, 1}));
        // Gain 0 is the paper's rule: each token alone, sigmoid(logit) > threshold.
        QCOMPARE(decided(nn::causalSelection(logits, flat, {0.5, 0.25, 0.0})), (std::vector<int>{1, 1, 0, 0, 0, 1}));

        // The prefix top-k, with a predictor that wants every token: token t is processed only when fewer
        // than k(t+1) = ceil(0.25 (t+1)) earlier router logits are above its own (k = 1 up to t = 3, then 2).
        // t1: 5 > 1; t3: 5, 6 > 2; t5: five above 0; t6: 5, 6, 2, 7 > 1 (the earlier 1 is not above).
        const auto eager = torch::full({1, 8}, 3.0);
        const auto router = torch::tensor({5.0, 1.0, 6.0, 2.0, 7.0, 0.0, 1.0, 9.0}, torch::kFloat32).view({1, 8});
        QCOMPARE(decided(nn::causalSelection(eager, router, {0.5, 0.25, 0.0, true})),
                 (std::vector<int>{1, 0, 1, 0, 1, 0, 0, 1}));
        QCOMPARE(decided(nn::causalSelection(eager, router, {0.5, 0.25, 0.0, false})), std::vector<int>(8, 1));
    }

    // Along a row the rule compares v = logit + gain * shortfall with log(t / (1 - t)) instead of taking
    // sigmoid(v): it must decide as passes() does token by token (a generation step's test), on random logits,
    // logits placed exactly at and a hair around that point, NaN and infinities, at thresholds inside (0, 1)
    // and at its ends.
    void rowDecisionsAreTheStepRule() {
        torch::manual_seed(31);
        for (const double threshold : {0.5, 0.3, 0.9, 0.999, 0.0, 1.0}) {
            for (const double gain : {0.0, 1.5}) {
                const nn::CausalRule rule{threshold, 0.25, gain};
                const int T = 400;
                auto logits = torch::randn({1, T}) * 3;
                const double point = std::log(threshold / (1.0 - threshold));
                float* l = logits.data_ptr<float>();
                for (int t = 0; t < T; t += 7) {
                    const float at = static_cast<float>(point);
                    const float around[] = {at, std::nextafter(at, 1e30f), std::nextafter(at, -1e30f),
                                            at + 1e-7f, at - 1e-7f, NAN, INFINITY, -INFINITY};
                    l[t] = around[(t / 7) % 8];
                }
                const auto got = nn::causalSelection(logits, torch::zeros({1, T}), rule);
                std::int64_t n = 0;
                for (int t = 0; t < T; ++t) {
                    const bool want = rule.passes(l[t], t, n);
                    QVERIFY2(got[0][t].item<bool>() == want,
                             qPrintable(QString("threshold %1, gain %2, token %3, logit %4")
                                            .arg(threshold)
                                            .arg(gain)
                                            .arg(t)
                                            .arg(double(l[t]), 0, 'g', 17)));
                    n += want ? 1 : 0;
                }
            }
        }
    }

    // A predictor that wants every token: without feedback a routed layer processes all of them; with it, the
    // count stays near capacity × T, and the run is still causal (a later edit changes no earlier decision).
    void budgetFeedbackHoldsTheCountNearCapacity() {
        auto config = test::tinyConfig();
        auto model = test::createModel(config, 6);
        {
            torch::NoGradGuard guard;
            for (auto& block : internals(*model).net->blocks)
                if (block->routed) block->predictor->fc2->bias.add_(8.0);
        }
        const auto a = test::randomIds(120, 300, 8);
        RunOptions opt;
        opt.mode = RoutingMode::Causal;
        const auto greedy = model->run(a, opt);
        for (const auto& layer : greedy.layers)
            if (layer.routed) QVERIFY2(layer.processed > 110, qPrintable(QString::number(layer.processed)));

        config.predictor_budget_gain = 4.0;
        auto budgeted = test::createModel(config, 6);
        {
            torch::NoGradGuard guard;
            for (auto& block : internals(*budgeted).net->blocks)
                if (block->routed) block->predictor->fc2->bias.add_(8.0);
        }
        auto b = a;
        for (int t = 90; t < 120; ++t) b[t] = (b[t] + 31) % 300;
        const auto ta = budgeted->run(a, opt), tb = budgeted->run(b, opt);
        for (std::size_t li = 0; li < ta.layers.size(); ++li) {
            const auto& layer = ta.layers[li];
            if (!layer.routed) continue;
            // capacity 0.25 of 120 = 30; the logit offset of ~8 buys about 8/4 = 2 tokens beyond it.
            QVERIFY2(layer.processed >= 28 && layer.processed <= 36, qPrintable(QString::number(layer.processed)));
            QCOMPARE(layer.selected, layer.predictor_selected);
            for (int t = 0; t < 90; ++t) QCOMPARE(layer.selected[t], tb.layers[li].selected[t]);
        }
    }

    // A run without the per-token trace is the same forward: identical logits and counts, in both modes, with the rule's prefix top-k and budget feedback (causal mode then reads fewer predictor rows).
    void runWithoutPerTokenRoutingIsTheSameForward() {
        const auto model = tinyModelWithCausalRule(11);
        const auto& config = model->config();
        const auto ids = test::randomIds(90, 300, 12);
        for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            RunOptions full;
            full.mode = mode;
            full.logits = RunOptions::Logits::All;
            RunOptions bare = full;
            bare.per_token_routing = false;
            const auto a = model->run(ids, full), b = model->run(ids, bare);
            QCOMPARE(b.logits, a.logits);
            QCOMPARE(b.dense_flops, a.dense_flops);
            // FLOPs count what ran: no predictor in top-k mode, the prefix top-k's candidates in causal mode.
            const double d = config.d_model, h = config.predictor_hidden, T = double(ids.size());
            const double all_predictors = double(config.routed_layers.size()) * 2 * T * (d * h + h);
            if (mode == RoutingMode::TopK) QCOMPARE(b.flops, a.flops - all_predictors);
            else QVERIFY(b.flops < a.flops && b.flops > a.flops - all_predictors);
            QCOMPARE(b.layers.size(), a.layers.size());
            for (std::size_t li = 0; li < a.layers.size(); ++li) {
                QCOMPARE(b.layers[li].routed, a.layers[li].routed);
                QCOMPARE(b.layers[li].k, a.layers[li].k);
                QCOMPARE(b.layers[li].processed, a.layers[li].processed);
                QVERIFY(b.layers[li].selected.empty() && b.layers[li].router_logits.empty());
            }
        }
    }

    // ForwardOptions::layer_ms (what modscope-bench's layers section reads, through profileLayers): one time
    // per layer, within the call, on the layer that spent it, and the forward unchanged.
    void layerClockTimesEachLayer() {
        auto config = test::tinyConfig();
        config.d_model = 128;
        config.d_ff = 256;
        config.max_seq_len = 512;
        config.capacity = 1.0 / 64;  // the routed layers' blocks take 8 of 512 tokens
        auto model = test::createModel(config, 21);
        auto& net = *internals(*model).net;
        torch::InferenceMode guard;
        const auto ids = torch::randint(config.vocab_size, {1, 512}, torch::kLong).to(test::device());
        nn::ForwardOptions plain;
        plain.capacity = config.capacity;
        const auto want = net.hidden(ids, plain);
        auto timed = plain;
        std::vector<double> ms;
        timed.layer_ms = &ms;
        for (int i = 0; i < 7; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            const auto got = net.hidden(ids, timed);
            const double wall =
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            QVERIFY(torch::equal(got, want));
            QCOMPARE(ms.size(), std::size_t(4));
            double sum = 0;
            for (std::size_t l = 0; l < ms.size(); ++l) {
                QVERIFY(ms[l] > 0);
                sum += ms[l];
            }
            QVERIFY2(sum <= wall,
                     qPrintable(QStringLiteral("layers %1 ms in a call of %2").arg(sum).arg(wall)));
        }
        // How long each layer takes against the others is modscope-bench's layers section, not a test's.

        if (test::device() != "cpu") return;  // profileLayers times CPU models only
        const auto p = profileLayers(*model, 512, 3);
        QCOMPARE(p.tokens, (std::vector<int>{512, 8, 512, 8}));
        QCOMPARE(p.layer_ms.size(), std::size_t(4));
        for (double v : p.layer_ms) QVERIFY(v > 0);
        QVERIFY(p.forward_ms > 0 && p.reps == 3 && p.seq_len == 512);
        QVERIFY_THROWS_EXCEPTION(Error, profileLayers(*model, 513, 1));
    }

    // Inference multiplies by transposed copies of the weights (nn::linear); a weight written in place, as an
    // optimizer step or a checkpoint load does, must be seen by the next forward, which must match the
    // autograd path's F::linear.
    void inferenceWeightCopiesFollowInPlaceUpdates() {
        auto model = test::createModel(test::tinyConfig(), 13);
        auto& net = *internals(*model).net;
        const auto ids = test::idsTensor(test::randomIds(40, 300, 14));
        nn::ForwardOptions fo;
        const auto inference = [&] {
            torch::InferenceMode guard;
            return net.logits(net.hidden(ids, fo)).clone();
        };
        const auto autograd = [&] { return net.logits(net.hidden(ids, fo)).detach(); };
        const auto before = inference();
        QVERIFY(torch::allclose(before, autograd(), 1e-4, 1e-5));
        {
            torch::NoGradGuard guard;
            for (auto& block : net.blocks) {
                block->attn->qkv->weight.mul_(1.5);
                block->mlp->down->weight.add_(0.01);
                if (block->routed) block->predictor->fc1->weight.neg_();
            }
            net.tok_emb->weight.mul_(0.5);
        }
        const auto after = inference();
        QVERIFY((after - before).abs().max().item<double>() > 1e-2);
        QVERIFY(torch::allclose(after, autograd(), 1e-4, 1e-5));
    }

    // A causal forward of a batch updates its rows in place, each by its own decisions: the same as each row
    // alone, and the same as the copying path autograd takes.
    void causalBatchEqualsEachRowAlone() {
        const auto model = tinyModelWithCausalRule(15);
        auto& net = *internals(*model).net;
        const auto ids = torch::cat({test::idsTensor(test::randomIds(50, 300, 16)),
                                     test::idsTensor(test::randomIds(50, 300, 17))}, 0);  // [2, 50]
        nn::ForwardOptions fo;
        fo.mode = RoutingMode::Causal;
        fo.setCausalRule(model->config());
        torch::Tensor batch, rows[2];
        {
            torch::InferenceMode guard;
            batch = net.hidden(ids, fo).clone();
            for (int b = 0; b < 2; ++b) rows[b] = net.hidden(ids.narrow(0, b, 1), fo).clone();
        }
        const auto copying = net.hidden(ids, fo).detach();
        for (int b = 0; b < 2; ++b) QVERIFY(torch::allclose(batch[b], rows[b][0], 1e-5, 1e-6));
        QVERIFY(torch::allclose(batch, copying, 1e-5, 1e-6));
    }

    // The prefix top-k's candidates against counting by hand: t passes when fewer than k(t + 1) earlier
    // logits are strictly above its own (ties are not "higher"), across capacities and lengths.
    void prefixTopkCandidatesCountEarlierHigherLogits() {
        torch::manual_seed(9);
        const auto key = [](float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; };
        const auto byHand = [&](const float* r, int T, double capacity) {
            std::vector<std::int64_t> out;
            for (int t = 0; t < T; ++t) {
                std::int64_t higher = 0;
                for (int u = 0; u < t; ++u) higher += key(r[u]) > key(r[t]) ? 1 : 0;
                if (nn::CausalRule::inPrefixTopk(capacity, t, higher)) out.push_back(t);
            }
            return out;
        };
        for (double capacity : {0.125, 0.25, 0.5, 1.0})
            for (int T : {1, 2, 17, 300, 1000}) {
                // Values on a coarse grid so that ties are common, and a continuous row.
                const auto coarse = (torch::randint(0, 7, {T}) * 0.5).to(torch::kFloat32).contiguous();
                const auto fine = torch::randn({T}).contiguous();
                for (const auto& row : {coarse, fine}) {
                    const auto* r = row.data_ptr<float>();
                    QCOMPARE(nn::prefixTopkCandidates(r, T, capacity), byHand(r, T, capacity));
                }
                // A rising row: every token is above all before it.
                const auto rising = torch::arange(T, torch::kFloat32).contiguous();
                QCOMPARE(nn::prefixTopkCandidates(rising.data_ptr<float>(), T, capacity).size(),
                         std::size_t(T));
            }
        // Many short rows: the last tokens of a row compare with the k(T)-th largest earlier logit, the smallest
        // of those the walk keeps, which longer rows rarely reach.
        for (int i = 0; i < 300; ++i) {
            const int T = 2 + i % 40;
            const auto row = torch::randn({T}).contiguous();
            for (double capacity : {0.125, 0.25, 0.5}) {
                const auto* r = row.data_ptr<float>();
                QCOMPARE(nn::prefixTopkCandidates(r, T, capacity), byHand(r, T, capacity));
            }
        }
        // A NaN logit ranks lowest: every finite earlier logit counts as higher than it, and it counts for none.
        const float nan = std::numeric_limits<float>::quiet_NaN();
        const std::vector<float> odd{1.0f, nan, 2.0f, nan, 0.5f, nan, 3.0f, 0.1f};
        QCOMPARE(nn::prefixTopkCandidates(odd.data(), 8, 0.25), byHand(odd.data(), 8, 0.25));
        QCOMPARE(nn::prefixTopkCandidates(odd.data(), 8, 0.25), (std::vector<std::int64_t>{0, 2, 6}));
    }

    // Causal mode's forward reads the predictor only for the prefix top-k's candidates; the decisions must be
    // the rule's on every token's predictor logit, with and without budget feedback, for batches of rows. From
    // 256 tokens, on two threads, the predictor reads the candidates while the walk finds them.
    void causalRoutingDecidesAsTheRuleOnEveryToken() {
        auto model = test::createModel(test::tinyConfig(), 7);
        auto& net = *internals(*model).net;
        torch::InferenceMode guard;
        torch::manual_seed(10);
        const int threads_before = at::get_num_threads();
        at::set_num_threads(2);
        const auto restore = qScopeGuard([&] { at::set_num_threads(threads_before); });
        for (auto& block : net.blocks) {
            if (!block->routed) continue;
            for (int T : {1, 9, 130, 300, 600}) {
                const auto x = torch::randn({2, T, net.config.d_model}, net.tok_emb->weight.options());
                const auto router = block->router(x).squeeze(-1);
                const auto every = block->predictor(x);
                for (const nn::CausalRule rule : {nn::CausalRule{0.5, 0.25, 0.0, true}, nn::CausalRule{0.5, 0.25, 1.5, true},
                                                  nn::CausalRule{0.3, 0.125, 0.0, false}}) {
                    const auto expected = nn::causalSelection(every, router, rule);
                    std::int64_t rows = -1;
                    std::vector<torch::Tensor> selected;
                    const auto got = nn::causalRouting(*block, x, router, rule, &rows, &selected);
                    QVERIFY(torch::equal(got, expected));
                    // Each row's processed positions, ascending, as the mask has them.
                    QCOMPARE(selected.size(), std::size_t(2));
                    for (int b = 0; b < 2; ++b)
                        QVERIFY(torch::equal(selected[b], expected[b].nonzero().view({1, -1})));
                    // What the predictor is spared: with the prefix top-k it reads only the candidates, on
                    // random inputs about a third of the tokens; without it, every token.
                    if (!rule.prefix_topk) QCOMPARE(rows, std::int64_t(2 * T));
                    else if (T > 100) QVERIFY2(rows < T, qPrintable(QString::number(rows)));
                }
            }
        }
    }

    void flopsFollowTheFormula() {
        auto cfg = test::tinyConfig();
        auto model = test::createModel(cfg, 6);
        RunOptions opt;
        opt.capacity = 0.25;
        opt.logits = RunOptions::Logits::All;
        const int T = 64;
        const auto trace = model->run(test::randomIds(T, 300, 1), opt);
        const double d = cfg.d_model, ff = cfg.d_ff, h = cfg.predictor_hidden, V = cfg.vocab_size;
        // Scores: the causal triangle up to 128 keys in all (attended row by row, or a few rows at a time in
        // registers), the square block above.
        auto block = [&](double n) {
            const double pairs = n <= 128 ? n * (n + 1) / 2 : n * n;
            return 8 * n * d * d + 4 * pairs * d + 6 * n * d * ff;
        };
        const double k = capacityToK(0.25, T);
        const double routing = 2 * T * d + 2 * T * (d * h + h);
        const double expected = 2 * T * d * V + 2 * block(T) + 2 * (block(k) + routing);
        QCOMPARE(trace.flops, expected);
        QCOMPARE(trace.dense_flops, 2 * T * d * V + 4 * block(T));
        // 100 tokens: still the triangle.
        const auto hundred = model->run(test::randomIds(100, 300, 3), opt);
        QCOMPARE(hundred.dense_flops, 2 * 100.0 * d * V + 4 * block(100));

        // Beyond one query block of 128, attention scores only the blocks on and below the diagonal:
        // at 160 tokens, 128 queries see 128 keys and the last 32 see all 160.
        const int L = 160;
        const auto longer = model->run(test::randomIds(L, 300, 2), opt);
        const double pairs = 128.0 * 128 + 32.0 * 160;
        const double dense_block = 8 * L * d * d + 4 * pairs * d + 6 * L * d * ff;
        QCOMPARE(longer.dense_flops, 2 * L * d * V + 4 * dense_block);
    }

    // Blocked causal attention against the plain masked softmax over the whole square, with and without
    // cached keys before the new queries, across block boundaries.
    void blockedAttentionEqualsTheFullSquare() {
        torch::manual_seed(3);
        const nn::PositionTables tables(512, 16, 10000.0);
        for (auto [S, prior] : {std::pair<int, int>{1, 0}, {5, 0}, {128, 0}, {129, 0}, {300, 0}, {200, 37}, {1, 90}}) {
            const int N = 4, hd = 16, P = prior + S;
            const auto q = torch::randn({N, S, hd}), k = torch::randn({N, P, hd}), v = torch::randn({N, P, hd});
            const auto key = torch::arange(P).unsqueeze(0), query = torch::arange(S).unsqueeze(1) + prior;
            const auto scores = torch::where(key <= query, torch::bmm(q, k.transpose(1, 2)),
                                             torch::full({}, -std::numeric_limits<float>::infinity()));
            const auto expected = torch::bmm(torch::softmax(scores, -1), v);
            const auto got = backend::current().causalAttention(q, k, v, prior, tables);
            QCOMPARE(got.sizes().vec(), expected.sizes().vec());
            QVERIFY2(torch::allclose(got, expected, 1e-5, 1e-5),
                     qPrintable(QString("S %1 prior %2: max difference %3").arg(S).arg(prior)
                                    .arg((got - expected).abs().max().item<float>())));
        }
    }

    // The joint rotary of q and k against the rotation written out: each pair (x_i, x_{i + hd/2}) turned by
    // pos * theta^(-2i/hd), q then scaled by 1/sqrt(hd); positions in any order, strided input.
    void rotaryOfQueriesAndKeysRotatesEachPair() {
        torch::manual_seed(4);
        const int B = 2, S = 7, H = 3, hd = 8, half = hd / 2;
        const double theta = 10000.0;
        const nn::PositionTables tables(64, hd, theta);
        const auto qkv = torch::randn({B, S, 3, H, hd});
        const auto pos = torch::randint(0, 64, {B, S}, torch::kLong);
        const auto got = backend::current().rotateQK(qkv.narrow(2, 0, 2), pos, tables.rope);  // [B, S, 2, H, hd]
        QVERIFY(got.is_contiguous());
        const auto acc = qkv.accessor<float, 5>();
        const auto out = got.accessor<float, 5>();
        const auto p = pos.accessor<std::int64_t, 2>();
        double worst = 0;
        for (int b = 0; b < B; ++b)
            for (int s = 0; s < S; ++s)
                for (int which = 0; which < 2; ++which)
                    for (int h = 0; h < H; ++h)
                        for (int i = 0; i < half; ++i) {
                            const double angle = double(p[b][s]) * std::pow(theta, -2.0 * i / hd);
                            const double x1 = acc[b][s][which][h][i], x2 = acc[b][s][which][h][i + half];
                            const double scale = which == 0 ? 1.0 / std::sqrt(double(hd)) : 1.0;
                            const double y1 = (x1 * std::cos(angle) - x2 * std::sin(angle)) * scale;
                            const double y2 = (x1 * std::sin(angle) + x2 * std::cos(angle)) * scale;
                            worst = std::max({worst, std::abs(y1 - out[b][s][which][h][i]),
                                              std::abs(y2 - out[b][s][which][h][i + half])});
                        }
        QVERIFY2(worst < 1e-4, qPrintable(QString("largest difference %1").arg(worst)));
    }

    // The smallest shapes: one layer (routed, or full with no router), one token, capacity 0 and 1, both
    // modes, and generation from one token and from a full context.
    void oneLayerModelsAndOneToken() {
        for (const std::vector<int>& routed : {std::vector<int>{0}, std::vector<int>{}}) {
            auto config = test::tinyConfig();
            config.n_layers = 1;
            config.routed_layers = routed;
            config.max_seq_len = 8;
            auto model = test::createModel(config, 3);
            for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
                for (double capacity : {0.0, 1.0}) {
                    for (int T : {1, 8}) {
                        RunOptions opt;
                        opt.mode = mode;
                        opt.capacity = capacity;
                        opt.logits = RunOptions::Logits::All;
                        const auto trace = model->run(test::randomIds(T, 300, 4), opt);
                        QCOMPARE(int(trace.layers.size()), 1);
                        const auto& layer = trace.layers[0];
                        QCOMPARE(int(layer.selected.size()), T);
                        QCOMPARE(int(trace.logits.size()), T * 300);
                        for (float v : trace.logits) QVERIFY(std::isfinite(v));
                        if (routed.empty()) {
                            QCOMPARE(layer.processed, T);
                        } else if (mode == RoutingMode::TopK) {
                            QCOMPARE(layer.k, capacityToK(capacity, T));
                            QCOMPARE(layer.processed, layer.k);
                            QCOMPARE(layer.rank.size(), std::size_t(T));
                        } else {
                            QCOMPARE(int(layer.predictor_prob.size()), T);
                        }
                    }
                }
            }
            GenerationOptions g;
            g.max_new_tokens = 20;
            g.temperature = 0.0f;
            const auto one = model->generate({5}, g);
            QCOMPARE(int(one.generated_ids.size()), 7);  // stops at the context of 8
            QCOMPARE(int(one.steps.back().processed.size()), 1);
            const auto full = model->generate(test::randomIds(8, 300, 5), g);
            QVERIFY(full.generated_ids.empty());  // no room left: nothing generated, no error
        }
    }

    void rejectsBadInput() {
        auto model = test::createModel(test::tinyConfig(), 1);
        QVERIFY_THROWS_EXCEPTION(Error, model->run({}));
        QVERIFY_THROWS_EXCEPTION(Error, model->run({1, 2, 300}));
        QVERIFY_THROWS_EXCEPTION(Error, model->run({-1}));
        QVERIFY_THROWS_EXCEPTION(Error, model->run(test::randomIds(161, 300, 1)));
        std::atomic<bool> cancel{true};
        RunOptions opt;
        opt.cancel = &cancel;
        QVERIFY_THROWS_EXCEPTION(Cancelled, model->run({1, 2, 3}, opt));
    }

    void deviceChoice() {
        QCOMPARE(QString::fromStdString(resolveDevice("cpu")), QString("cpu"));
        const auto autoDevice = resolveDevice("auto");
        QCOMPARE(QString::fromStdString(autoDevice), cudaAvailable() ? QString("cuda:0") : QString("cpu"));
        QVERIFY_THROWS_EXCEPTION(Error, resolveDevice("tpu"));
        if (!cudaAvailable()) {
            try {
                resolveDevice("cuda");
                QFAIL("asking for cuda without CUDA must fail");
            } catch (const Error& e) {
                QVERIFY(QString(e.what()).contains("cuda", Qt::CaseInsensitive));
            }
        }
    }
};

MODSCOPE_ENGINE_TEST_MAIN(EngineRoutingTest)
#include "engine_routing_test.moc"
