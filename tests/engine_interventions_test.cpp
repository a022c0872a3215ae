// Interventions (docs/MODEL.md "Interventions"): forced routing decisions in both semantics and both modes,
// per-token loss, top predictions, and decision values against brute-force single-flip runs.
#include <QTest>

#include <atomic>
#include <cmath>

#include "test_support.h"

using namespace modscope;

namespace {

// The summed loss tolerance of a flip computed two ways (a suffix after cached keys against a whole forward):
// float32 rounding over a few dozen positions; in float64, the values stored as float32.
double lossTolerance() { return test::float64() ? 1e-6 : 3e-4; }

RunTrace runWith(const Model& model, const std::vector<int>& ids, RoutingMode mode,
                 std::vector<RoutingOverride> overrides = {}, bool keep_capacity = false) {
    RunOptions opt;
    opt.mode = mode;
    opt.overrides = std::move(overrides);
    opt.keep_capacity = keep_capacity;
    opt.token_loss = true;
    opt.logits = RunOptions::Logits::All;
    return model.run(ids, opt);
}

// A routed tiny model whose predictors process about half of ids' tokens, with the causal rule given.
std::unique_ptr<Model> routedModel(double budget_gain, bool prefix_topk, std::uint64_t seed = 41) {
    auto config = test::tinyConfig();
    config.predictor_budget_gain = budget_gain;
    config.predictor_prefix_topk = prefix_topk;
    auto model = test::createModel(config, seed);
    test::balancePredictors(*model, test::randomIds(64, config.vocab_size, 3));
    return model;
}

void addModeRows() {
    QTest::addColumn<RoutingMode>("mode");
    QTest::newRow("top-k") << RoutingMode::TopK;
    QTest::newRow("causal") << RoutingMode::Causal;
}

const LayerTrace& layerOf(const RunTrace& trace, int index) { return trace.layers[static_cast<std::size_t>(index)]; }

}  // namespace

Q_DECLARE_METATYPE(modscope::RoutingMode)

class EngineInterventionsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    // Exact flip: the forced cell changes and nothing else in that layer's selection (causal mode with each
    // token deciding alone, where the other decisions cannot depend on it).
    void exactFlipChangesThatCellOnly_data() { addModeRows(); }
    void exactFlipChangesThatCellOnly() {
        QFETCH(RoutingMode, mode);
        auto model = routedModel(0.0, false);
        const auto ids = test::randomIds(40, model->config().vocab_size, 5);
        const auto base = runWith(*model, ids, mode);
        int flips = 0;
        for (int layer : model->config().routed_layers)
            for (int t : {0, 3, 17, 39}) {
                const bool was = layerOf(base, layer).selected[t];
                const auto forced = runWith(*model, ids, mode, {{layer, t, !was}});
                auto expected = layerOf(base, layer).selected;
                expected[t] = was ? 0 : 1;
                QCOMPARE(layerOf(forced, layer).selected, expected);
                QCOMPARE(layerOf(forced, layer).processed, layerOf(base, layer).processed + (was ? -1 : 1));
                QCOMPARE(layerOf(forced, layer).k, layerOf(base, layer).k);  // the top-k size stays the layer's
                // The layers before it are untouched.
                for (int li = 0; li < layer; ++li) QCOMPARE(layerOf(forced, li).selected, layerOf(base, li).selected);
                QCOMPARE(int(forced.overrides.size()), 1);
                ++flips;
            }
        QCOMPARE(flips, 8);
    }

    // Keep capacity: the layer processes k tokens whatever is forced, the forced cells as forced and the rest
    // the highest-ranked free tokens.
    void keepCapacityKeepsK() {
        auto model = routedModel(0.0, false);
        const auto ids = test::randomIds(40, model->config().vocab_size, 6);
        const auto base = runWith(*model, ids, RoutingMode::TopK);
        const int layer = 1;
        const auto& b = layerOf(base, layer);
        int in_topk = -1, out_topk = -1;
        for (int t = 0; t < 40; ++t) {
            if (b.selected[t])
                in_topk = t;
            else
                out_topk = t;
        }
        const std::vector<std::vector<RoutingOverride>> cases = {
            {{layer, out_topk, true}}, {{layer, in_topk, false}}, {{layer, out_topk, true}, {layer, in_topk, false}}};
        for (const auto& overrides : cases) {
            const auto forced = runWith(*model, ids, RoutingMode::TopK, overrides, true);
            const auto& l = layerOf(forced, layer);
            QCOMPARE(l.processed, b.k);
            for (const auto& o : overrides) QCOMPARE(bool(l.selected[o.position]), o.process);
            // The free tokens it took rank above every free token it left.
            float lowest_taken = INFINITY, highest_left = -INFINITY;
            for (int t = 0; t < 40; ++t) {
                if (std::any_of(overrides.begin(), overrides.end(), [&](const auto& o) { return o.position == t; }))
                    continue;
                if (l.selected[t])
                    lowest_taken = std::min(lowest_taken, l.router_logits[t]);
                else
                    highest_left = std::max(highest_left, l.router_logits[t]);
            }
            QVERIFY(lowest_taken > highest_left);
        }
        // More forced in than k: every one of them is processed.
        std::vector<RoutingOverride> many;
        for (int t = 0; t < b.k + 3; ++t) many.push_back({layer, t, true});
        QCOMPARE(layerOf(runWith(*model, ids, RoutingMode::TopK, many, true), layer).processed, b.k + 3);
    }

    // A whole layer skipped leaves its input unchanged, bit for bit; a whole layer processed takes every token.
    void wholeLayerSkipLeavesInputUnchanged_data() { addModeRows(); }
    void wholeLayerSkipLeavesInputUnchanged() {
        QFETCH(RoutingMode, mode);
        auto model = routedModel(1.0, true);
        const auto& cfg = model->config();
        const auto ids = test::randomIds(48, cfg.vocab_size, 7);
        auto& impl = internals(*model);
        backend::Use use(*impl.backend);
        torch::InferenceMode guard;
        for (int layer : cfg.routed_layers) {
            const auto forced = nn::resolveOverrides(cfg, {{layer, RoutingOverride::kAllPositions, false}}, 48);
            nn::ForwardOptions fo;
            fo.mode = mode;
            fo.capacity = cfg.capacity;
            fo.setCausalRule(cfg);
            fo.forced = &forced;
            std::vector<torch::Tensor> residuals;
            fo.residuals = &residuals;
            impl.net->hidden(test::idsTensor(ids), fo);
            QVERIFY(torch::equal(residuals[static_cast<std::size_t>(layer) + 1], residuals[static_cast<std::size_t>(layer)]));
        }
        const auto all = runWith(*model, ids, mode, {{1, RoutingOverride::kAllPositions, true}});
        QCOMPARE(layerOf(all, 1).processed, 48);
        // A single position's override wins over its layer's whatever the order.
        const auto mixed = runWith(*model, ids, mode, {{3, 5, true}, {3, RoutingOverride::kAllPositions, false}});
        QCOMPARE(layerOf(mixed, 3).processed, 1);
        QVERIFY(layerOf(mixed, 3).selected[5]);
    }

    // In causal mode a forced decision at (l, t) leaves every position before t as it was, bit for bit: its
    // logits and every layer's decisions there (with the budget feedback and the prefix top-k, which see it).
    void causalForcingLeavesThePrefixUnchanged() {
        auto model = routedModel(1.0, true);
        const int T = 48, V = model->config().vocab_size;
        const auto ids = test::randomIds(T, V, 8);
        const auto base = runWith(*model, ids, RoutingMode::Causal);
        int changed_after = 0;
        for (int layer : model->config().routed_layers)
            for (int t : {1, 20, 40}) {
                const bool was = layerOf(base, layer).selected[t];
                const auto forced = runWith(*model, ids, RoutingMode::Causal, {{layer, t, !was}});
                QCOMPARE(bool(layerOf(forced, layer).selected[t]), !was);
                for (int p = 0; p < t; ++p) {
                    for (std::size_t li = 0; li < base.layers.size(); ++li)
                        QCOMPARE(forced.layers[li].selected[p], base.layers[li].selected[p]);
                    QCOMPARE(forced.token_loss[p], base.token_loss[p]);
                    QVERIFY(std::equal(base.logits.begin() + p * V, base.logits.begin() + (p + 1) * V,
                                       forced.logits.begin() + p * V));
                }
                changed_after += forced.token_loss[T - 2] != base.token_loss[T - 2] ? 1 : 0;
            }
        QVERIFY(changed_after > 0);  // the flips do reach the positions after them
    }

    // token_loss[t] = -log softmax(logits[t])[ids[t + 1]], NaN at the last position; top predictions are the
    // most probable tokens, best first. (tests/reference checks the loss against PyTorch's cross-entropy.)
    void tokenLossAndTopPredictions() {
        auto model = routedModel(0.0, false);
        const int T = 30, V = model->config().vocab_size;
        const auto ids = test::randomIds(T, V, 9);
        RunOptions opt;
        opt.logits = RunOptions::Logits::All;
        opt.token_loss = true;
        opt.top_predictions = 5;
        const auto trace = model->run(ids, opt);
        QCOMPARE(int(trace.token_loss.size()), T);
        QVERIFY(std::isnan(trace.token_loss[T - 1]));
        for (int t = 0; t + 1 < T; ++t) {
            const float* row = trace.logits.data() + t * V;
            const double top = *std::max_element(row, row + V);
            double sum = 0.0;
            for (int v = 0; v < V; ++v) sum += std::exp(double(row[v]) - top);
            const double expected = top + std::log(sum) - row[ids[t + 1]];
            QVERIFY2(std::abs(trace.token_loss[t] - expected) < 1e-4, qPrintable(QString::number(t)));
        }
        QCOMPARE(trace.top_n, 5);
        QCOMPARE(int(trace.top_ids.size()), T * 5);
        for (int t = 0; t < T; ++t) {
            const float* row = trace.logits.data() + t * V;
            QCOMPARE(trace.top_ids[t * 5], int(std::max_element(row, row + V) - row));
            for (int i = 1; i < 5; ++i) QVERIFY(trace.top_probs[t * 5 + i] <= trace.top_probs[t * 5 + i - 1]);
        }
        // Without asking, neither is there.
        const auto plain = model->run(ids);
        QVERIFY(plain.token_loss.empty() && plain.top_ids.empty());
    }

    // Every routed cell's decision value equals a brute-force run with that one decision flipped: both modes,
    // both semantics, on top of other overrides, in a routed model and in staged MoDE (whose mixture's
    // capacity continues across the flip), at lengths on both sides of the attention paths' thresholds.
    void decisionValuesEqualSingleFlipRuns_data() {
        QTest::addColumn<RoutingMode>("mode");
        QTest::addColumn<bool>("keep_capacity");
        QTest::addColumn<QString>("which");
        QTest::addColumn<int>("T");
        QTest::newRow("top-k, exact") << RoutingMode::TopK << false << "routed" << 40;
        QTest::newRow("top-k, keep capacity") << RoutingMode::TopK << true << "routed" << 24;
        QTest::newRow("causal, budget and prefix top-k") << RoutingMode::Causal << false << "routed" << 40;
        QTest::newRow("top-k, staged MoDE") << RoutingMode::TopK << false << "staged" << 36;
        QTest::newRow("causal, staged MoDE") << RoutingMode::Causal << false << "staged" << 20;
        // Integrated MoDE's full mixture layer between the routed ones: its capacity continues across the flip.
        QTest::newRow("top-k, integrated MoDE between") << RoutingMode::TopK << false << "integrated" << 36;
        // A trained model's flips move later layers' router logits enough that a later top-k layer changes its
        // mind about tokens before the flip: the flip's suffix then starts earlier there.
        // Layer 1's updates so large that a flip there reorders a later layer's top k, before the flip too.
        QTest::newRow("top-k, large updates") << RoutingMode::TopK << false << "large updates" << 40;
        QTest::newRow("top-k, keep capacity, large updates") << RoutingMode::TopK << true << "large updates" << 40;
        QTest::newRow("bundled, top-k") << RoutingMode::TopK << false << "bundled" << 48;
        QTest::newRow("bundled, top-k, keep capacity") << RoutingMode::TopK << true << "bundled" << 40;
    }
    void decisionValuesEqualSingleFlipRuns() {
        QFETCH(RoutingMode, mode);
        QFETCH(bool, keep_capacity);
        QFETCH(QString, which);
        QFETCH(int, T);
        std::unique_ptr<Model> model;
        if (which == "staged") {
            model = test::createModel(test::tinyMixtureConfig(true, 0), 43);
            test::spreadExpertRouters(*model);
            test::balancePredictors(*model, test::randomIds(64, model->config().vocab_size, 3));
        } else if (which == "integrated") {
            auto config = test::tinyMixtureConfig(false, 2);
            config.routed_layers = {1, 3};
            config.moe_layers = {2};
            model = test::createModel(config, 47);
            test::spreadExpertRouters(*model);
            test::balancePredictors(*model, test::randomIds(64, config.vocab_size, 3));
        } else if (which == "bundled") {
            if (test::float64() || test::device() != "cpu") QSKIP("the bundled model runs in float32 on the CPU here");
            model = Model::open(MODSCOPE_SOURCE_DIR "/resources/models/default", "cpu");
        } else {
            model = routedModel(1.0, true);
            if (which == "large updates") {
                torch::NoGradGuard guard;
                auto& block = *internals(*model).net->blocks[1];
                block.attn->proj->weight.mul_(300.0);
                block.mlp->down->weight.mul_(300.0);
            }
        }
        const auto& routed = model->config().routed_layers;
        const auto ids = test::randomIds(T, model->config().vocab_size, 10 + T);
        const std::vector<RoutingOverride> base_overrides = {{routed.back(), 2, true}};
        RunOptions opt;
        opt.mode = mode;
        opt.keep_capacity = keep_capacity;
        opt.overrides = base_overrides;
        opt.decision_values = true;
        int last_done = -1, cells = 0;
        opt.progress = [&](int done, int total) {
            QVERIFY(done >= last_done);
            last_done = done;
            cells = total;
        };
        const auto trace = model->run(ids, opt);
        QVERIFY(trace.decision_values);
        QCOMPARE(cells, int(routed.size()) * T);
        QCOMPARE(last_done, cells);
        const double base_loss = totalTokenLoss(trace.token_loss);
        QVERIFY(std::abs(base_loss - totalTokenLoss(runWith(*model, ids, mode, base_overrides, keep_capacity).token_loss)) <
                lossTolerance());
        double worst = 0.0;
        int nonzero = 0, earlier_changes = 0;
        for (const auto& layer : trace.layers) {
            QCOMPARE(layer.decision_value.empty(), !layer.routed);
            if (!layer.routed) continue;
            for (int t = 0; t < T; ++t) {
                auto overrides = base_overrides;
                overrides.push_back({layer.index, t, !layer.selected[t]});
                const auto flip_run = runWith(*model, ids, mode, overrides, keep_capacity);
                for (const auto& later : flip_run.layers)
                    if (later.routed && later.index > layer.index) {
                        const auto& run_later = trace.layers[static_cast<std::size_t>(later.index)].selected;
                        const auto p = std::mismatch(later.selected.begin(), later.selected.end(), run_later.begin()).first -
                                       later.selected.begin();
                        earlier_changes += p < t ? 1 : 0;
                    }
                const double flipped = totalTokenLoss(flip_run.token_loss);
                const double gap = std::abs((flipped - base_loss) - layer.decision_value[t]);
                worst = std::max(worst, gap);
                QVERIFY2(gap < lossTolerance(), qPrintable(QStringLiteral("layer %1 token %2: brute force %3, value %4")
                                                               .arg(layer.index)
                                                               .arg(t)
                                                               .arg(flipped - base_loss)
                                                               .arg(layer.decision_value[t])));
                nonzero += std::abs(layer.decision_value[t]) > 1e-3 ? 1 : 0;
            }
            QVERIFY(valuableSelected(layer) >= 0 && valuableSelected(layer) <= layer.processed);
        }
        QVERIFY(nonzero > T);  // the values are not trivially zero
        if (which == "large updates") QVERIFY(earlier_changes > 0);  // the case these rows are here for
        qInfo("worst |decision value - brute force| %.3g; %d flips changed a later layer before them", worst,
              earlier_changes);
    }

    // valuableSelected counts the processed tokens among the `processed` most valuable ones to process.
    void valuableSelectedCounts() {
        LayerTrace l;
        l.routed = true;
        l.selected = {1, 0, 1, 0, 0};
        // Processing value: token 0: 0.5, token 1: 0.9 (skipping it gained -0.9), token 2: -0.1, 3: 0.2, 4: -1.
        l.decision_value = {0.5f, -0.9f, -0.1f, -0.2f, 1.0f};
        QCOMPARE(valuableSelected(l), 1);  // the two most valuable are tokens 1 and 0; it took 0
        l.decision_value.clear();
        QCOMPARE(valuableSelected(l), -1);
    }

    // Overrides naming what does not exist are refused with a message; a raised cancel flag stops the values.
    void badOverridesAndCancel() {
        auto model = routedModel(0.0, false);
        const auto ids = test::randomIds(12, model->config().vocab_size, 11);
        const auto refused = [&](std::vector<RoutingOverride> o, const char* words) {
            try {
                runWith(*model, ids, RoutingMode::TopK, std::move(o));
            } catch (const Error& e) {
                return QString(e.what()).contains(words);
            }
            return false;
        };
        QVERIFY(refused({{0, 3, true}}, "not a routed layer"));
        QVERIFY(refused({{9, 3, true}}, "the model has layers 0-3"));
        QVERIFY(refused({{1, 12, true}}, "positions 0-11"));
        QVERIFY(refused({{1, -2, true}}, "positions 0-11"));
        std::atomic<bool> cancel{false};
        RunOptions opt;
        opt.decision_values = true;
        opt.cancel = &cancel;
        opt.progress = [&](int done, int) {
            if (done == 5) cancel = true;
        };
        QVERIFY_THROWS_EXCEPTION(Cancelled, model->run(ids, opt));
    }
};

MODSCOPE_ENGINE_TEST_MAIN(EngineInterventionsTest)
#include "engine_interventions_test.moc"
