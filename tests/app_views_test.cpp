// The views on their own, fed synthetic snapshots: sizes the bundled model does not reach (2,048 tokens x
// 32 layers), the repaint budget, label thinning, binning when zoomed out, hover text and exports.
#include <QElapsedTimer>
#include <QTemporaryDir>
#include <QTest>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>

#include "capacity_chart.h"
#include "cell_details_panel.h"
#include "expert_load_chart.h"
#include "expert_palette.h"
#include "routing_diff.h"
#include "layer_capacity_editor.h"
#include "piece_text.h"
#include <QTableWidget>
#include <QToolButton>
#include "ratio_meter.h"
#include "routing_controls.h"
#include "figure_export.h"
#include "predictor_panel.h"
#include "routing_heatmap.h"
#include "token_loss_strip.h"
#include "token_axis_ticker.h"
#include "token_depth_view.h"

using namespace modscope;

namespace {

// T tokens x L layers, odd layers routed with top-k at capacity (the views only read the data).
SnapshotPtr synthetic(int T, int L, double capacity, std::uint64_t seed = 1) {
    auto s = std::make_shared<RoutingSnapshot>();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    s->model_name = "synthetic";
    s->n_layers = L;
    s->d_model = 64;
    s->max_seq_len = T;
    s->trace.capacity = capacity;
    s->trace.flops = 1e9;
    s->trace.dense_flops = 2e9;
    for (int t = 0; t < T; ++t) {
        s->trace.token_ids.push_back(t % 500);
        s->pieces.push_back("\xe2\x96\x81tok" + std::to_string(t));
        s->texts.push_back(" tok" + std::to_string(t));
    }
    const int k = std::max(1, int(std::ceil(capacity * T)));
    s->depth.assign(T, 0);
    s->agreement.assign(L, {});
    for (int l = 0; l < L; ++l) {
        LayerTrace layer;
        layer.index = l;
        layer.routed = l % 2 == 1;
        layer.k = layer.routed ? k : T;
        if (layer.routed) {
            for (int t = 0; t < T; ++t) layer.router_logits.push_back(normal(rng));
            std::vector<int> order(T);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int a, int b) { return layer.router_logits[a] > layer.router_logits[b]; });
            layer.rank.assign(T, 0);
            layer.topk_selected.assign(T, 0);
            for (int i = 0; i < T; ++i) layer.rank[order[i]] = i;
            for (int i = 0; i < k; ++i) layer.topk_selected[order[i]] = 1;
            layer.topk_threshold = layer.router_logits[order[k - 1]];
            layer.selected = layer.topk_selected;
            for (int t = 0; t < T; ++t) {
                const float p = 1.0f / (1.0f + std::exp(-layer.router_logits[t]));
                layer.predictor_prob.push_back(p);
                layer.predictor_selected.push_back(p > 0.8f ? 1 : 0);
            }
            layer.processed = k;
        } else {
            layer.selected.assign(T, 1);
            layer.topk_selected = layer.selected;
            layer.processed = T;
        }
        for (int t = 0; t < T; ++t) s->depth[t] += layer.selected[t];
        for (int t = 0; t < T && layer.routed; ++t)
            layer.update_ratio.push_back(layer.selected[t] ? 0.05f + 0.01f * float(t % 7) : 0.0f);
        s->trace.layers.push_back(std::move(layer));
    }
    s->kv_cache_bytes = 1000;
    s->dense_kv_cache_bytes = 4000;
    return s;
}

// synthetic() with layers 1 and 2 turned into mixtures of 3 experts and 2 no-op choices (layer 1 staged: its
// kept-out tokens never reach the mixture; layer 2 a full layer's mixture). Every fate occurs: the experts
// fill by the prefix rule of docs/MODEL.md at capacity factor 0.75.
SnapshotPtr syntheticMixture(int T, std::uint64_t seed = 3) {
    auto s = std::make_shared<RoutingSnapshot>(*synthetic(T, 4, 0.5, seed));
    std::mt19937_64 rng(seed);
    for (int li : {1, 2}) {
        auto& l = s->trace.layers[li];
        l.moe = true;
        l.n_experts = 3;
        l.noop_experts = 2;
        l.expert_load.assign(3, 0);
        l.expert_overflow = 0;
        int reached = 0;
        for (int t = 0; t < T; ++t) {
            if (!l.selected[t]) {
                l.expert_choice.push_back(-1), l.expert.push_back(-1), l.expert_runner_up.push_back(-1);
                l.expert_prob.push_back(NAN), l.expert_runner_up_prob.push_back(NAN);
                continue;
            }
            ++reached;
            const int c = int(rng() % 5), second = (c + 1) % 5;
            l.expert_choice.push_back(c);
            l.expert_prob.push_back(0.5f);
            l.expert_runner_up.push_back(second);
            l.expert_runner_up_prob.push_back(0.25f);
            const int cap = expertCapacity(0.75, 3, reached);
            const bool runs = c < 3 && l.expert_load[c] < cap;
            l.expert.push_back(runs ? c : -1);
            if (runs) ++l.expert_load[c];
            else if (c < 3) ++l.expert_overflow;
        }
        l.expert_capacity = expertCapacity(0.75, 3, reached);
    }
    return s;
}

// MODSCOPE_VIEWS_DUMP=DIR saves what the tests looked at, for a person to look at too.
void dumpIfAsked(QWidget& widget, const char* name) {
    const QByteArray dir = qgetenv("MODSCOPE_VIEWS_DUMP");
    if (dir.isEmpty()) return;
    widget.grab().save(QString::fromLocal8Bit(dir) + QLatin1Char('/') + QLatin1String(name) + QStringLiteral(".png"));
}

double msPerReplot(QCustomPlot& plot, int rounds) {
    plot.replot(QCustomPlot::rpImmediateRefresh);  // warm-up (label cache, buffers)
    QElapsedTimer clock;
    clock.start();
    for (int i = 0; i < rounds; ++i) plot.replot(QCustomPlot::rpImmediateRefresh);
    return clock.nsecsElapsed() / 1e6 / rounds;
}

}  // namespace

class AppViewsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void heatmapAt2048TokensBy32LayersRepaintsWithinAFrame() {
        RoutingHeatmap heatmap;
        heatmap.resize(1200, 700);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        const auto s = synthetic(2048, 32, 0.125);

        QElapsedTimer clock;
        clock.start();
        heatmap.setSnapshot(s);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        const double first_ms = clock.nsecsElapsed() / 1e6;
        QCOMPARE(heatmap.columnCount(), 2048);
        QCOMPARE(heatmap.rowCount(), 32);
        // Zoomed out past one pixel per token: columns are binned, every processed token still shows.
        QVERIFY(heatmap.tokensPerColumn() > 1);

        const double full_ms = msPerReplot(heatmap, 20);
        dumpIfAsked(heatmap, "heatmap-2048x32");
        heatmap.xAxis->setRange(1000, 1100);  // zoomed in: per-cell marks are drawn for visible cells
        const double zoomed_ms = msPerReplot(heatmap, 20);
        dumpIfAsked(heatmap, "heatmap-2048x32-zoomed");
        QCOMPARE(heatmap.tokensPerColumn(), 1);
        qInfo("2048x32: set+first paint %.1f ms, repaint %.2f ms (all), %.2f ms (100 tokens)", first_ms, full_ms,
              zoomed_ms);
        // Its speed (the target is 16 ms) is modscope-bench's app section, not a test's: a busy machine is slow.
    }

    void tokenLabelsAreThinnedToWhatFits() {
        RoutingHeatmap heatmap;
        heatmap.resize(1000, 500);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        heatmap.setSnapshot(synthetic(2048, 8, 0.25));
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        const int line = QFontMetrics(heatmap.xAxis->tickLabelFont()).height();
        const int labels = int(heatmap.xAxis->tickVector().size());
        QVERIFY(labels > 5);
        QVERIFY2(labels <= heatmap.axisRect()->width() / line + 1, qPrintable(QString::number(labels)));
        // Zoomed in, every token gets its label.
        heatmap.xAxis->setRange(99.5, 119.5);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        QCOMPARE(heatmap.xAxis->tickVector().size(), 20);
        heatmap.selectCell(3, 105);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        dumpIfAsked(heatmap, "heatmap-zoomed-selected");
        QCOMPARE(heatmap.xAxis->tickVectorLabels().first(), QStringLiteral("␣tok100"));
        // 32 layers in 500 pixels: every other layer labelled, by number only (a "full"/"routed" suffix
        // would sit on one kind of layer only), also after the next run.
        for (int round = 0; round < 2; ++round) {
            heatmap.setSnapshot(synthetic(300, 32, 0.25, round + 2));
            heatmap.replot(QCustomPlot::rpImmediateRefresh);
            heatmap.replot(QCustomPlot::rpImmediateRefresh);
            const auto layer_labels = heatmap.yAxis->tickVectorLabels();
            QVERIFY(layer_labels.size() < 32);
            for (const auto& label : layer_labels) QVERIFY2(!label.contains(QLatin1Char(' ')), qPrintable(label));
        }
        QCOMPARE(TokenAxisTicker::stepFor(2.0, 15.0), 10);
        QCOMPARE(TokenAxisTicker::stepFor(20.0, 15.0), 1);
    }

    // Squeezed so that only every other layer gets a label, the labels go to the routed layers.
    void thinnedLayerLabelsNameTheRoutedLayers() {
        RoutingHeatmap heatmap;
        heatmap.resize(700, 190);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        heatmap.setSnapshot(synthetic(40, 12, 0.25), true);  // layers 1, 3, ... routed
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        const auto* ticker = heatmap.layerTicker();
        QVERIFY2(ticker->step() >= 2, qPrintable(QString::number(ticker->step())));
        if (ticker->step() == 2) QCOMPARE(ticker->offset(), 1);
        QVector<double> ticks;
        for (double t : heatmap.yAxis->tickVector()) ticks.append(t);
        QVERIFY(!ticks.isEmpty());
        for (double t : ticks) QVERIFY2(int(t) % 2 == 1 || ticker->step() > 2, qPrintable(QString::number(t)));
    }

    // The capacity slider lands on the spin box's 0.5% steps, and a note says when the routing shown is
    // outside what the router was trained at.
    void routingControlsSnapAndSayWhenOffTraining() {
        RoutingControls controls;
        QVERIFY(!controls.offTrainingNoteShown());  // no model yet
        controls.setTrainedCapacity(0.125);
        controls.setCapacity(0.125);
        QVERIFY(!controls.offTrainingNoteShown());
        controls.slider()->setValue(373);
        QCOMPARE(controls.slider()->value(), 375);
        QCOMPARE(controls.spinBox()->value(), 37.5);
        QVERIFY(controls.offTrainingNoteShown());
        QVERIFY2(controls.offTrainingNote().contains(QStringLiteral("12.5%")), qPrintable(controls.offTrainingNote()));
        controls.setCapacity(0.125);
        QVERIFY(!controls.offTrainingNoteShown());
        controls.setMode(RoutingMode::Causal);
        QVERIFY(controls.offTrainingNoteShown());
    }

    // Colour scales: one range for all layers, each layer its own, or a fixed range that no run moves; beside a
    // companion run the range covers both.
    void colorScalesMapLogitsAsChosen() {
        RoutingHeatmap heatmap;
        heatmap.resize(1000, 400);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        const auto s = synthetic(60, 6, 0.25, 3);
        auto big = std::make_shared<RoutingSnapshot>(*s);  // layer 3's logits ten times larger
        for (auto& v : big->trace.layers[3].router_logits) v *= 10.0f;
        heatmap.setSnapshot(big);
        const auto range = [](const LayerTrace& l) {
            const auto [lo, hi] = std::minmax_element(l.router_logits.begin(), l.router_logits.end());
            return std::pair<double, double>(*lo, *hi);
        };
        // Shared: the whole map spans every routed layer's logits, so layer 1 uses a sliver of the gradient.
        auto shared = heatmap.colorMap()->dataRange();
        QCOMPARE(shared.lower, std::min({range(big->trace.layers[1]).first, range(big->trace.layers[3]).first,
                                         range(big->trace.layers[5]).first}));
        QCOMPARE(shared.upper, range(big->trace.layers[3]).second);
        // Per layer: cells hold 0 ... 1 of their own layer's range.
        heatmap.setColorScale({HeatmapColorScale::Mode::PerLayer});
        QCOMPARE(heatmap.colorMap()->dataRange(), QCPRange(0.0, 1.0));
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        QCOMPARE(heatmap.tokensPerColumn(), 1);
        for (int l : {1, 3, 5}) {
            double lo = 1e9, hi = -1e9;
            for (int c = 0; c < heatmap.colorMap()->data()->keySize(); ++c) {
                const double v = heatmap.colorMap()->data()->cell(c, l);
                lo = std::min(lo, v), hi = std::max(hi, v);
            }
            QVERIFY2(std::abs(lo) < 1e-9 && std::abs(hi - 1.0) < 1e-9, qPrintable(QString("layer %1: %2 .. %3").arg(l).arg(lo).arg(hi)));
            QCOMPARE(heatmap.logitRange(l).lower, range(big->trace.layers[l]).first);
        }
        // Fixed: the range stays through other runs.
        heatmap.setColorScale({HeatmapColorScale::Mode::Fixed, -3.0, 4.0});
        QCOMPARE(heatmap.colorMap()->dataRange(), QCPRange(-3.0, 4.0));
        heatmap.setSnapshot(s);
        QCOMPARE(heatmap.colorMap()->dataRange(), QCPRange(-3.0, 4.0));
        QCOMPARE(heatmap.colorMap()->data()->data(5, 1), double(s->trace.layers[1].router_logits[5]));
        // Shared beside a companion: the range of both runs, whichever side it is drawn on.
        heatmap.setColorScale({});
        heatmap.setSnapshot(s);
        const auto alone = heatmap.colorMap()->dataRange();
        heatmap.setScaleCompanion(big);
        QCOMPARE(heatmap.colorMap()->dataRange(), shared);
        QVERIFY(heatmap.colorMap()->dataRange().size() > alone.size());
        RoutingHeatmap other;
        other.setSnapshot(big);
        other.setScaleCompanion(s);
        QCOMPARE(other.colorMap()->dataRange(), heatmap.colorMap()->dataRange());
    }

    // Thinned token labels go to the tokens the most layers processed, never closer than the step.
    void thinnedTokenLabelsPreferProcessedTokens() {
        TokenAxisTicker ticker;
        QVector<QString> labels;
        for (int i = 0; i < 40; ++i) labels << QString::number(i);
        ticker.setLabels(labels);
        QVector<int> depth(40, 3);
        depth[7] = 5;
        depth[23] = 6;
        depth[24] = 5;  // next to a deeper one: no room for both at step 5
        ticker.setPriorities(depth);
        ticker.setStep(5);
        const auto labelled = ticker.labelled();
        QVERIFY(labelled.contains(7));
        QVERIFY(labelled.contains(23));
        QVERIFY(!labelled.contains(24));
        for (int i = 1; i < labelled.size(); ++i) QVERIFY(labelled[i] - labelled[i - 1] >= 5);
        QVERIFY(labelled.size() >= 40 / 10);
        // On a heatmap: the routed layers' processed tokens keep their labels when thinned.
        RoutingHeatmap heatmap;
        heatmap.resize(500, 400);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        const auto s = synthetic(300, 4, 0.05, 4);
        heatmap.setSnapshot(s);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        QVERIFY(heatmap.tokenTicker()->step() > 1);
        int deepest_labelled = 0, deepest = 0;
        const auto ticks = heatmap.xAxis->tickVector();
        for (int t = 0; t < s->tokens(); ++t) deepest += s->depth[t] >= 3 ? 1 : 0;  // a routed layer took it
        for (double t : ticks) deepest_labelled += s->depth[int(t)] >= 3 ? 1 : 0;
        // Every-step-th labels would catch about deepest / step of them.
        QVERIFY2(deepest_labelled > deepest / heatmap.tokenTicker()->step() + 1,
                 qPrintable(QString("%1 of %2 at step %3").arg(deepest_labelled).arg(deepest).arg(heatmap.tokenTicker()->step())));
    }

    // A byte token shows the same on the axis as in the token strip: its character where it begins one.
    void byteTokensShowTheirCharacter() {
        QCOMPARE(tokenLabel("<0x2B>", "+"), QStringLiteral("+"));
        QCOMPARE(pieceLabel("<0x2B>"), QStringLiteral("+"));
        QCOMPARE(tokenLabel("<0xC3>", "\xc3\xa9"), QStringLiteral("é"));
        QCOMPARE(tokenLabel("<0xA9>", ""), QStringLiteral("⟨A9⟩"));
        QCOMPARE(tokenLabel("<0x0A>", "\n"), QStringLiteral("↵"));
        QCOMPARE(tokenLabel("\xe2\x96\x81Lord", " Lord"), QStringLiteral("␣Lord"));
    }

    // The gate and each token's update appear in the hover and the details table; a layer with a capacity of
    // its own says so there, on its label and in the title.
    void gateUpdateAndLayerCapacityAreShown() {
        auto s = std::make_shared<RoutingSnapshot>(*synthetic(40, 4, 0.25, 5));
        s->trace.layers[3].capacity = 0.5;
        RoutingHeatmap heatmap;
        heatmap.resize(900, 500);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        heatmap.setSnapshot(s);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        const auto& l1 = s->trace.layers[1];
        int processed = 0, skipped = 0;
        for (int t = 0; t < 40; ++t) (l1.selected[t] ? processed : skipped) = t;
        const QString gate = QString::number(1.0 / (1.0 + std::exp(-double(l1.router_logits[processed]))), 'f', 3);
        const QString hover = heatmap.cellSummary(1, processed);
        QVERIFY2(hover.contains(QStringLiteral("gate")) && hover.contains(gate), qPrintable(hover));
        QVERIFY2(hover.contains(QString::number(l1.update_ratio[processed], 'f', 3) + QStringLiteral(" (|Δx| / |x|)")),
                 qPrintable(hover));
        QVERIFY(heatmap.cellSummary(1, skipped).contains(QStringLiteral("skipped: the token rides the residual stream")));
        QVERIFY(heatmap.cellSummary(3, 3).contains(QStringLiteral("its own capacity, 50%")));
        QVERIFY2(heatmap.title().contains(QStringLiteral("capacity 25% (L3 50%)")), qPrintable(heatmap.title()));
        QVERIFY(heatmap.layerTicker()->labels().contains(QStringLiteral("L3 50%")));
        CellDetailsPanel details;
        details.setSnapshot(s);
        details.setCell(1, processed);
        auto* table = details.table();
        int gate_col = -1, update_col = -1;
        for (int c = 0; c < table->columnCount(); ++c) {
            if (table->horizontalHeaderItem(c)->text() == QStringLiteral("Gate")) gate_col = c;
            if (table->horizontalHeaderItem(c)->text() == QStringLiteral("Δx/x")) update_col = c;
        }
        QVERIFY(gate_col >= 0 && update_col >= 0);
        const int row1 = 4 - 1 - 1;  // top row = last layer
        QCOMPARE(table->item(row1, gate_col)->text(), gate);
        QCOMPARE(table->item(row1, update_col)->text(), QString::number(l1.update_ratio[processed], 'f', 3));
        QCOMPARE(table->item(0, 0)->text(), QStringLiteral("L3 routed · 50%"));
        QCOMPARE(table->item(3, gate_col)->text(), QStringLiteral("–"));  // layer 0 is full
    }

    // The per-layer popup: a routed layer's own capacity, "slider" for the others, and a reset.
    void layerCapacityEditorGivesLayersTheirOwn() {
        RoutingControls controls;
        controls.setTrainedCapacity(0.125);
        controls.setCapacity(0.125);
        controls.setLayers(6, {1, 3, 5});
        QVERIFY(controls.layerCapacities().empty());
        QCOMPARE(controls.layerButton()->text(), QStringLiteral("Per layer"));
        int changes = 0;
        connect(&controls, &RoutingControls::layerCapacitiesChanged, this, [&] { ++changes; });
        controls.layerEditor()->spinBox(3)->setValue(25.0);
        QCOMPARE(changes, 1);
        QCOMPARE(controls.layerCapacities(), (std::vector<double>{-1.0, -1.0, -1.0, 0.25}));
        QCOMPARE(controls.layerButton()->text(), QStringLiteral("Per layer (1)"));
        QVERIFY(controls.offTrainingNoteShown());  // layer 3 is away from its training capacity
        QVERIFY(controls.layerEditor()->spinBox(2) == nullptr);
        QCOMPARE(controls.layerEditor()->spinBox(1)->text(), QStringLiteral("slider"));
        controls.setLayerCapacities({});
        QCOMPARE(changes, 2);
        QVERIFY(controls.layerCapacities().empty());
        QVERIFY(!controls.offTrainingNoteShown());
    }

    void hoverTextNamesEverything() {
        RoutingHeatmap heatmap;
        heatmap.resize(900, 500);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        const auto s = synthetic(40, 4, 0.25);
        heatmap.setSnapshot(s);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        const QPoint p(int(heatmap.xAxis->coordToPixel(7)), int(heatmap.yAxis->coordToPixel(1)));
        QCOMPARE(heatmap.cellAt(p), qMakePair(1, 7));
        const QString text = heatmap.cellSummary(1, 7);
        const auto& layer = s->trace.layers[1];
        QVERIFY(text.contains(QStringLiteral("␣tok7")));
        QVERIFY(text.contains(QStringLiteral("token 7 of 40")));
        QVERIFY(text.contains(QStringLiteral("Layer 1")));
        QVERIFY(text.contains(QString::number(layer.router_logits[7], 'f', 3)));
        QVERIFY(text.contains(QStringLiteral("%1 of 40").arg(layer.rank[7])));
        QVERIFY(text.contains(QString::number(layer.topk_threshold, 'f', 3)));
        QVERIFY(text.contains(QString::number(layer.predictor_prob[7], 'f', 3)));
        QVERIFY(text.contains(layer.selected[7] ? QStringLiteral("processed") : QStringLiteral("skipped")));
        QVERIFY(heatmap.cellSummary(0, 7).contains(QStringLiteral("full")));
        QVERIFY(!text.contains(QStringLiteral("budget")));  // the paper's rule: the predictor alone

        // A model with causal mode's budget feedback and prefix top-k: each term, from the tokens before.
        auto with_rule = std::make_shared<RoutingSnapshot>(*s);
        with_rule->config.predictor_budget_gain = 1.5;
        with_rule->config.predictor_prefix_topk = true;
        heatmap.setSnapshot(with_rule);
        const QString rule_text = heatmap.cellSummary(1, 7);
        const long taken = std::count(layer.predictor_selected.begin(), layer.predictor_selected.begin() + 7, 1);
        const long higher = std::count_if(layer.router_logits.begin(), layer.router_logits.begin() + 7,
                                          [&](float v) { return v > layer.router_logits[7]; });
        QVERIFY2(rule_text.contains(QStringLiteral("%1 of 7 earlier tokens taken, 2.00 allowed").arg(taken)),
                 qPrintable(rule_text));
        QVERIFY2(rule_text.contains(QStringLiteral("%1 earlier %2 higher, top 2 so far")
                                        .arg(higher)
                                        .arg(higher == 1 ? QStringLiteral("token ranks") : QStringLiteral("tokens rank"))),
                 qPrintable(rule_text));
        // The score the rule compares, from the predictor's probability and the budget's shift.
        const double p7 = layer.predictor_prob[7];
        const double combined =
            1.0 / (1.0 + std::exp(-(std::log(p7 / (1.0 - p7)) + 1.5 * (0.25 * 8 - double(taken)))));
        QVERIFY2(rule_text.contains(QStringLiteral("combined p&nbsp;&nbsp;</td><td>%1").arg(combined, 0, 'f', 3)),
                 qPrintable(rule_text));
        QVERIFY2(heatmap.cellSummary(1, 1).contains(QStringLiteral(" of 1 earlier token taken")),
                 qPrintable(heatmap.cellSummary(1, 1)));
        // A routed layer's k is the layer's, whatever this token's decision.
        QVERIFY(rule_text.contains(QStringLiteral("routed layer</b>: takes k = 10 of the 40 tokens")));
        QVERIFY(rule_text.contains(layer.predictor_selected[7] ? QStringLiteral("causal rule&nbsp;&nbsp;</td><td>process")
                                                               : QStringLiteral("causal rule&nbsp;&nbsp;</td><td>skip")));
        QCOMPARE(heatmap.cellAt(QPoint(2, 2)), qMakePair(-1, -1));
        // A single token still draws (QCPColorMap needs two cells for a width).
        heatmap.setSnapshot(synthetic(1, 1, 1.0));
        QCOMPARE(heatmap.columnCount(), 1);
        QCOMPARE(heatmap.rowCount(), 1);
        heatmap.setSnapshot(nullptr);
        QCOMPARE(heatmap.columnCount(), 0);
    }

    // Mixture layers: the hover names the router's choice and runner-up and each fate; the heatmap paints
    // each fate's mark; the load chart draws the trace's loads and capacity and hides without mixtures; the
    // diff counts tokens that ran another expert.
    void mixtureLayersAreShown() {
        const auto s = syntheticMixture(60);
        RoutingHeatmap heatmap;
        heatmap.resize(900, 500);
        heatmap.show();
        QVERIFY(QTest::qWaitForWindowExposed(&heatmap));
        heatmap.setSnapshot(s);
        heatmap.replot(QCustomPlot::rpImmediateRefresh);
        std::map<LayerTrace::ExpertFate, int> seen;
        for (int li : {1, 2}) {
            const auto& l = s->trace.layers[li];
            for (int t = 0; t < 60; ++t) {
                const auto fate = l.expertFate(t);
                ++seen[fate];
                const QString text = heatmap.cellSummary(li, t);
                switch (fate) {
                case LayerTrace::ExpertFate::Ran:
                    QVERIFY2(text.contains(QStringLiteral("MLP: <b>expert %1</b>").arg(l.expert[t])), qPrintable(text));
                    QVERIFY(text.contains(QStringLiteral("runner-up")));
                    break;
                case LayerTrace::ExpertFate::NoOp:
                    QVERIFY2(text.contains(QStringLiteral("no-op %1").arg(l.expert_choice[t] - 3)) &&
                                 text.contains(QStringLiteral("a no-op choice")),
                             qPrintable(text));
                    break;
                case LayerTrace::ExpertFate::Overflow:
                    QVERIFY2(text.contains(QStringLiteral("overflow: expert %1").arg(l.expert_choice[t])), qPrintable(text));
                    break;
                case LayerTrace::ExpertFate::KeptOut:
                    QVERIFY2(text.contains(QStringLiteral("kept the token out")), qPrintable(text));
                    break;
                }
            }
        }
        QCOMPARE(int(seen.size()), 4);
        QVERIFY2(heatmap.layerTicker()->labels().contains(QStringLiteral("L1 staged")), qPrintable(heatmap.layerTicker()->labels().join(",")));
        QVERIFY(heatmap.layerTicker()->labels().contains(QStringLiteral("L2 MoDE")));
        // The marks: an expert's cell in a full mixture row is painted its colour; a no-op cell is not.
        const QImage image = heatmap.toPixmap(900, 500).toImage();
        const auto& full = s->trace.layers[2];
        const auto centre = [&](int t) {
            return image.pixelColor(int(heatmap.xAxis->coordToPixel(t)), int(heatmap.yAxis->coordToPixel(2)));
        };
        for (int t = 0; t < 60; ++t) {
            if (full.expert[t] >= 0) QCOMPARE(centre(t), expertColor(full.expert[t]));
            if (full.expertFate(t) == LayerTrace::ExpertFate::NoOp) QVERIFY(centre(t) != expertColor(0));
        }
        dumpIfAsked(heatmap, "mixture_heatmap");

        // The details panel's decision says what the MLP did: rows run top (last layer) to bottom.
        CellDetailsPanel details;
        details.setSnapshot(s);
        for (int t = 0; t < 60; ++t) {
            details.setCell(2, t);
            const QString decision = details.table()->item(4 - 1 - 2, 1)->text();
            QVERIFY2(decision.endsWith(expertFateText(full, t)), qPrintable(decision));
        }

        ExpertLoadChart chart;
        chart.setSnapshot(s);
        QVERIFY(!chart.isHidden());
        const auto loads = chart.loads();
        QCOMPARE(loads.size(), 3);
        for (int e = 0; e < 3; ++e) {
            QCOMPARE(loads[e].size(), 2);
            QCOMPARE(int(loads[e][0]), s->trace.layers[1].expert_load[e]);
            QCOMPARE(int(loads[e][1]), s->trace.layers[2].expert_load[e]);
        }
        QVERIFY2(chart.subtitle().contains(QStringLiteral("overflow %1")
                                               .arg(s->trace.layers[1].expert_overflow + s->trace.layers[2].expert_overflow)),
                 qPrintable(chart.subtitle()));
        chart.setSnapshot(synthetic(20, 4, 0.5));
        QVERIFY(chart.isHidden());

        // The diff: the same decisions with one token's expert changed in the full mixture layer.
        auto other = std::make_shared<RoutingSnapshot>(*s);
        int changed = -1;
        for (int t = 0; t < 60 && changed < 0; ++t)
            if (full.expert[t] >= 0) changed = t;
        auto& l2 = other->trace.layers[2];
        l2.expert[changed] = (l2.expert[changed] + 1) % 3;
        const auto diff = RoutingDiff::of(*s, *other);
        QCOMPARE(diff.differing, std::int64_t(0));
        QCOMPARE(diff.expert_differing, std::int64_t(1));
        QCOMPARE(diff.at(2, changed), RoutingDiff::kExpertChanged);
        QCOMPARE(diff.at(2, (changed + 1) % 60), RoutingDiff::kFull);
        QVERIFY(diff.expert_cells > 60);  // the full layer's 60 and layer 1's tokens processed in both
    }

    // The compute panel's numbers say what they mean: a saving as "x less", a cost above dense as "% more",
    // and why a routed layer takes a token at capacity 0.
    // The loss strip shows what the run has: the loss, the loss against a reference model, or (with overrides)
    // the change against the run without them; its columns stand where the heatmap puts them. The heatmap's
    // decision-value view colours by value on a range symmetric about 0 and names what each layer took.
    void lossStripAndDecisionValues() {
        const int T = 12;
        auto s = std::make_shared<RoutingSnapshot>(*synthetic(T, 4, 0.25));
        TokenLossStrip strip;
        strip.resize(600, 72);
        strip.show();  // a hidden widget gets its size only when shown
        strip.setSnapshot(s);
        QVERIFY(strip.shows() == TokenLossStrip::Shows::Nothing);
        QVERIFY(strip.heading().contains(QStringLiteral("computing")));
        for (int t = 0; t < T; ++t) s->trace.token_loss.push_back(t + 1 < T ? 1.0f + 0.25f * t : NAN);
        strip.setSnapshot(s);
        QVERIFY(strip.shows() == TokenLossStrip::Shows::Loss);
        QCOMPARE(strip.barValue(2), 1.5);
        QVERIFY(std::isnan(strip.barValue(T - 1)));
        s->reference_token_loss.assign(T, 2.0f);
        s->reference_name = "dense";
        strip.setSnapshot(s);
        QVERIFY(strip.shows() == TokenLossStrip::Shows::AgainstReference);
        QCOMPARE(strip.barValue(2), -0.5);
        // Summed over the 11 positions with a next token: 1 + ... + 3.5 = 24.75 against 22.
        QVERIFY2(strip.heading().contains(QStringLiteral("+2.750")), qPrintable(strip.heading()));
        s->baseline_token_loss.assign(T, 1.0f);
        s->trace.overrides = {{1, 3, true}};
        strip.setSnapshot(s);
        QVERIFY(strip.shows() == TokenLossStrip::Shows::AgainstBaseline);
        QCOMPARE(strip.barValue(2), 0.5);
        QVERIFY(strip.tokenSummary(2).contains(QStringLiteral("without the forced decisions")));
        // Columns: with the heatmap's range [-0.5, T - 0.5] over pixels 100 ... 580, token 0 is at the left end.
        strip.alignColumns(QCPRange(-0.5, T - 0.5), 100, 580);
        strip.replot();
        QCOMPARE(strip.tokenAt(QPoint(105, 50)), 0);
        QCOMPARE(strip.tokenAt(QPoint(575, 50)), T - 1);
        QCOMPARE(strip.tokenAt(QPoint(50, 50)), -1);

        // Decision values: layer 1 took 3 tokens; its values put tokens 0, 1 and 5 above the rest.
        auto& l1 = s->trace.layers[1];
        l1.selected.assign(T, 0);
        l1.selected[0] = l1.selected[1] = l1.selected[2] = 1;
        l1.processed = 3;
        l1.decision_value.assign(T, 0.01f);  // skipped tokens: processing them would cost 0.01
        l1.decision_value[0] = 0.5f, l1.decision_value[1] = 0.25f, l1.decision_value[2] = -0.1f;
        l1.decision_value[5] = -0.8f;  // skipped, but processing it would gain 0.8
        s->trace.layers[3].decision_value.assign(T, 0.0f);
        s->trace.decision_values = true;
        RoutingHeatmap heatmap;
        heatmap.resize(600, 300);
        heatmap.show();  // its real width: one token a column
        heatmap.setSnapshot(s, true);
        QCOMPARE(heatmap.tokensPerColumn(), 1);
        QVERIFY(!heatmap.showsDecisionValues());
        heatmap.setShowDecisionValues(true);
        QVERIFY(heatmap.showsDecisionValues());
        QCOMPARE(heatmap.colorMap()->dataRange().upper, double(0.8f));
        QCOMPARE(heatmap.colorMap()->dataRange().lower, -double(0.8f));
        QCOMPARE(heatmap.colorMap()->data()->data(5, 1), -double(0.8f));
        QVERIFY2(heatmap.title().contains(QStringLiteral("L1 2/3")), qPrintable(heatmap.title()));
        QVERIFY(heatmap.cellSummary(1, 5).contains(QStringLiteral("decision value")));
        QVERIFY(heatmap.cellSummary(1, 3).contains(QStringLiteral("forced")));  // the override above
        QVERIFY(!heatmap.cellSummary(1, 4).contains(QStringLiteral("forced")));
        heatmap.setShowDecisionValues(false);
        QVERIFY(!heatmap.showsDecisionValues());
        QCOMPARE(heatmap.colorMap()->data()->data(5, 1), double(l1.router_logits[5]));
    }

    void capacityChartSaysWhatItsNumbersMean() {
        CapacityChart chart;
        auto s = synthetic(16, 4, 0.125);  // 1 GFLOP of a dense 2
        chart.setSnapshot(s);
        QVERIFY2(chart.flopsMeter()->text().contains(QStringLiteral("2.00× less")), qPrintable(chart.flopsMeter()->text()));
        QVERIFY(!chart.subtitle().contains(QStringLiteral("at least 1")));
        auto full = std::make_shared<RoutingSnapshot>(*synthetic(16, 4, 1.0));
        full->trace.flops = 2.028e9;
        chart.setSnapshot(full);
        QVERIFY2(chart.flopsMeter()->text().contains(QStringLiteral("1.4% more")) &&
                     !chart.flopsMeter()->text().contains(QStringLiteral("less")),
                 qPrintable(chart.flopsMeter()->text()));
        chart.setSnapshot(synthetic(16, 4, 0.0));
        QVERIFY2(chart.subtitle().contains(QStringLiteral("k is at least 1")), qPrintable(chart.subtitle()));
        QCOMPARE(int(chart.processedBars()[1]), 1);
    }

    void depthViewAndChartsTakeLargeRuns() {
        const auto s = synthetic(2048, 32, 0.125);
        TokenDepthView depth;
        depth.resize(900, 300);
        depth.show();
        QVERIFY(QTest::qWaitForWindowExposed(&depth));
        QElapsedTimer clock;
        clock.start();
        depth.setSnapshot(s);
        depth.repaint();
        const double depth_ms = clock.nsecsElapsed() / 1e6;
        qInfo("depth view: 2048 tokens laid out and painted in %.1f ms", depth_ms);
        QVERIFY(depth.chipRect(2047).isValid());
        QVERIFY(depth.chipRect(2047).top() > depth.chipRect(0).top());
        QCOMPARE(depth.tokenAt(depth.chipRect(0).center()), 0);

        CapacityChart capacity;
        capacity.resize(400, 300);
        capacity.setSnapshot(s);
        const auto bars = capacity.processedBars();
        QCOMPARE(bars.size(), 32);
        QCOMPARE(int(bars[1]), 256);
        QCOMPARE(int(bars[0]), 2048);

        PredictorPanel predictor;
        predictor.setSnapshot(s);
        QCOMPARE(predictor.table()->rowCount(), 17);
        GenerationPoint point;
        point.routed_layers = {1, 3};
        point.layer_accuracy = {0.5, 1.0};
        point.accuracy = 0.75;
        for (int i = 0; i < 5; ++i) {
            point.index = i;
            predictor.addGenerationPoint(point);
        }
        QCOMPARE(predictor.generationPoints(), 5);
        QCOMPARE(predictor.plot()->graphCount(), 3);
        QCOMPARE(predictor.plot()->graph(2)->dataCount(), 5);

        QTemporaryDir out;
        QCOMPARE(exportPainting(out.filePath(QStringLiteral("depth.svg")), depth.contentSize(),
                                [&](QPainter* p) { depth.renderContent(p, depth.contentSize()); }),
                 QString());
        QCOMPARE(exportPlot(capacity.plot(), out.filePath(QStringLiteral("capacity.pdf"))), QString());
        QVERIFY(!exportPlot(capacity.plot(), out.filePath(QStringLiteral("capacity.gif"))).isEmpty());
    }
};

QTEST_MAIN(AppViewsTest)
#include "app_views_test.moc"
