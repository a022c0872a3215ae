// The desktop app's main window, driven as a user would: typing, the capacity slider, the mode switch,
// exports, a broken model, generation, awkward prompts and closing mid-run.
#include <QAction>
#include <QComboBox>
#include <QDoubleSpinBox>
#include <QDockWidget>
#include <QFile>
#include <QImage>
#include <QPainter>
#include <QPlainTextEdit>
#include <QProcess>
#include <QPushButton>
#include <QSettings>
#include <QSignalSpy>
#include <QSlider>
#include <QSvgRenderer>
#include <QTableWidget>
#include <QTemporaryDir>
#include <QMenu>
#include <QMenuBar>
#include <QMessageBox>
#include <QTest>
#include <thread>

#include <fstream>
#include <functional>

#include "app_fixture.h"
#include "app_window_fixture.h"
#include "bad_files.h"
#include "file_size_limit.h"
#include "capacity_chart.h"
#include "cell_details_panel.h"
#include "engine_session.h"
#include "expert_load_chart.h"
#include "routing_diff.h"
#include "engine_worker.h"
#include "generation_controls.h"
#include "layer_capacity_editor.h"
#include "routing_controls.h"
#include "routing_heatmap.h"
#include "token_axis_ticker.h"
#include "main_window.h"
#include "token_loss_strip.h"
#include "corpus_window.h"
#include "modscope/corpus_stats.h"
#include "message_banner.h"
#include "modscope/engine.h"
#include "predictor_panel.h"
#include "prompt_editor.h"
#include "qcustomplot.h"
#include "routing_controls.h"
#include "routing_heatmap.h"
#include "shortcut_sheet.h"
#include "snapshot_builder.h"
#include "token_depth_view.h"
#include "modscope/trace_io.h"

using namespace modscope;

namespace {

constexpr int kTimeoutMs = 20000;

QString readAll(const QString& path) {
    QFile f(path);
    if (!f.open(QIODevice::ReadOnly)) return {};
    return QString::fromUtf8(f.readAll());
}

}  // namespace

class AppMainWindowTest : public QObject {
    Q_OBJECT

private:
    QTemporaryDir dir_;
    QString model_dir_;   // 4 layers (1 and 3 routed), context 64
    QString model2_dir_;  // 6 layers, another name
    std::unique_ptr<Tokenizer> tokenizer_;

    // A window with the fixture model loaded and its first run shown.
    std::unique_ptr<MainWindow> makeWindow(const QString& prompt = QStringLiteral("the quick brown fox"),
                                           QSettings* settings = nullptr) {
        return apptest::openFixtureWindow(model_dir_, prompt, kTimeoutMs, settings);
    }

    // Until the views show the newest request's run.
    static bool waitForRun(MainWindow& w) { return apptest::waitForLiveRun(w, kTimeoutMs); }

    // After a generation the view shows the routing each generated token was sampled under, and an export
    // holds the generation, until something changes.
    static void expectGenerationKept(MainWindow& w, const GenerationSummary& summary) {
        const auto& gen = summary.document->generation->result;
        QCOMPARE(int(gen.steps.size()), summary.generated);
        const SnapshotPtr s = w.snapshot();
        // (QVERIFY: QCOMPARE would print the mode through modscope::toString, whose static text QTest frees.)
        QVERIFY(s->trace.mode == RoutingMode::Causal);
        QCOMPARE(s->tokens(), int(gen.prompt_ids.size()) + summary.generated);
        QCOMPARE(s->generated_from, int(gen.prompt_ids.size()));
        QVERIFY(w.heatmap()->title().contains(QStringLiteral("Causal routing")));
        for (const auto& step : gen.steps) {
            QCOMPARE(s->trace.token_ids[step.position], step.token_id);
            for (int l = 0; l < s->layers(); ++l)
                QVERIFY2(bool(s->trace.layers[l].selected[step.position]) == bool(step.processed[l]),
                         qPrintable(QString("layer %1, position %2").arg(l).arg(step.position)));
        }
        // No run was asked for to replace it.
        QVERIFY(!w.session()->isRunPending() && !w.isStale());
        QCOMPARE(w.snapshot(), s);
        QTemporaryDir out;
        QSignalSpy exported(&w, &MainWindow::exportFinished);
        w.exportTrace(out.filePath(QStringLiteral("generated.json")));
        QVERIFY(exported.wait(kTimeoutMs));
        QCOMPARE(exported.first().at(1).toString(), QString());
        const TraceDocument doc = loadTrace(out.filePath(QStringLiteral("generated.json")).toStdString());
        QVERIFY(doc.generation);
        QCOMPARE(int(doc.generation->result.steps.size()), summary.generated);
    }

    std::size_t tokenCount(const QString& text) const { return tokenizer_->encode(text.toStdString()).size(); }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(dir_.isValid());
        model_dir_ = dir_.filePath(QStringLiteral("model"));
        model2_dir_ = dir_.filePath(QStringLiteral("model2"));
        apptest::writeFixtureModel(model_dir_.toStdString());
        apptest::FixtureOptions six;
        six.name = "six-layers";
        six.n_layers = 6;
        six.routed_layers = {1, 3, 5};
        apptest::writeFixtureModel(model2_dir_.toStdString(), six);
        tokenizer_ = Tokenizer::load(QDir(model_dir_).filePath(QStringLiteral("tokenizer.model")).toStdString());
    }

    void typingGivesOneColumnPerTokenAndOneRowPerLayer() {
        auto w = makeWindow(QString());
        QVERIFY(w);
        QCOMPARE(w->heatmap()->columnCount(), 0);  // empty prompt: nothing to show, and no error
        QVERIFY(w->banner()->text().isEmpty());

        auto* editor = w->promptEditor()->editor();
        editor->setFocus();
        const QString typed = QStringLiteral("the routing layer said unto them");
        QTest::keyClicks(editor, typed);
        QVERIFY(w->isStale());  // a visible marker until the run for this text arrives
        QVERIFY(w->heatmap()->isStale());
        QVERIFY(waitForRun(*w));
        QVERIFY(!w->heatmap()->isStale());

        const int tokens = int(tokenCount(typed));
        QVERIFY(tokens > 3);
        QCOMPARE(w->snapshot()->tokens(), tokens);
        QCOMPARE(w->heatmap()->columnCount(), tokens);
        QCOMPARE(w->heatmap()->rowCount(), 4);
        QCOMPARE(w->heatmap()->tokenTicker() != nullptr, true);
        QVERIFY(w->statusText().contains(QStringLiteral("%1 tokens").arg(tokens)));
        QVERIFY(w->statusText().contains(QStringLiteral("app-fixture")));

        // Typing more re-runs; many keystrokes in a burst end in one up-to-date view.
        QTest::keyClicks(editor, QStringLiteral(" and the river"));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->heatmap()->columnCount(), int(tokenCount(typed + QStringLiteral(" and the river"))));
    }

    void capacitySliderSetsEachRoutedLayersProcessedCountToK() {
        auto w = makeWindow(QStringLiteral("the model of the river said that every token is a fortune cookie and "
                                           "the light of the house is time"));
        QVERIFY(w);
        const int T = w->snapshot()->tokens();
        QVERIFY(T >= 16);
        for (int tenths : {500, 250, 1000, 0}) {  // 50 %, 25 %, 100 %, 0 %
            w->routingControls()->slider()->setValue(tenths);
            QVERIFY(waitForRun(*w));
            const double capacity = tenths / 1000.0;
            QCOMPARE(w->snapshot()->trace.capacity, capacity);
            const int k = capacityToK(capacity, T);
            for (const auto& layer : w->snapshot()->trace.layers) {
                if (layer.routed) {
                    QCOMPARE(layer.k, k);
                    QCOMPARE(layer.processed, k);
                } else {
                    QCOMPARE(layer.processed, T);
                }
            }
            // The capacity bars show the same counts.
            const auto bars = w->capacityChart()->processedBars();
            QCOMPARE(bars.size(), 4);
            QCOMPARE(int(bars[1]), k);
            QCOMPARE(int(bars[3]), k);
            QCOMPARE(w->routingControls()->spinBox()->value(), tenths / 10.0);
        }
    }

    // A routed layer given its own capacity in the per-layer popup runs at it, and the export says so.
    void aLayerCanRunAtItsOwnCapacity() {
        auto w = makeWindow(QStringLiteral("the model of the river said that every token is a fortune cookie and "
                                           "the light of the house is time"));
        QVERIFY(w);
        const int T = w->snapshot()->tokens();
        w->setCapacity(0.125);
        QVERIFY(waitForRun(*w));
        auto* spin = w->routingControls()->layerEditor()->spinBox(3);
        QVERIFY(spin);
        QVERIFY(w->routingControls()->layerEditor()->spinBox(2) == nullptr);  // a full layer
        spin->setValue(50.0);
        QVERIFY(waitForRun(*w));
        const auto& layers = w->snapshot()->trace.layers;
        QCOMPARE(layers[3].k, capacityToK(0.5, T));
        QCOMPARE(layers[3].processed, capacityToK(0.5, T));
        QCOMPARE(layers[1].k, capacityToK(0.125, T));
        QVERIFY2(w->heatmap()->title().contains(QStringLiteral("capacity 12.5% (L3 50%)")), qPrintable(w->heatmap()->title()));
        QCOMPARE(int(w->capacityChart()->processedBars()[3]), capacityToK(0.5, T));
        QTemporaryDir out;
        QSignalSpy done(w.get(), &MainWindow::exportFinished);
        const QString json = out.filePath(QStringLiteral("layer.json"));
        w->exportTrace(json);
        QTRY_COMPARE_WITH_TIMEOUT(done.count(), 1, kTimeoutMs);
        const auto doc = loadTrace(json.toStdString());
        QCOMPARE(doc.run.layers[3].capacity, 0.5);
        QCOMPARE(doc.run.layers[1].capacity, 0.125);
        QCOMPARE(doc.run.layers[3].k, capacityToK(0.5, T));
        QVERIFY(!doc.run.layers[3].update_ratio.empty());
        // A replayed trace and back: the live layers' own capacities are as they were.
        QVERIFY(w->openTrace(json));
        QVERIFY(w->isReplaying());
        w->returnToLive();
        QCOMPARE(w->routingControls()->layerCapacities(), (std::vector<double>{-1.0, -1.0, -1.0, 0.5}));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->trace.layers[3].k, capacityToK(0.5, T));
        // Back to the slider: every routed layer at the run's capacity again.
        spin->setValue(spin->minimum());
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->trace.layers[3].k, capacityToK(0.125, T));
    }

    // With a run pinned, the live and the pinned heatmap share one colour range; a fixed range holds for both.
    void pinnedAndLiveHeatmapsShareTheColourScale() {
        auto w = makeWindow(QStringLiteral("fire and water, light and dark: the house by the river"));
        QVERIFY(w);
        w->pinRun();
        w->setPrompt(QStringLiteral("and the light of the house is time, said the river unto the model"));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->pinnedHeatmap()->colorMap()->dataRange(), w->heatmap()->colorMap()->dataRange());
        w->fixColorScaleAtCurrentRange();
        const auto fixed = w->heatmap()->colorMap()->dataRange();
        QCOMPARE(w->pinnedHeatmap()->colorMap()->dataRange(), fixed);
        QCOMPARE(fixed.lower, std::floor(fixed.lower));
        w->setPrompt(QStringLiteral("a short one"));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->heatmap()->colorMap()->dataRange(), fixed);
        w->setColorScale({HeatmapColorScale::Mode::PerLayer});
        QVERIFY(w->pinnedHeatmap()->colorScale().mode == HeatmapColorScale::Mode::PerLayer);
        QCOMPARE(w->heatmap()->colorMap()->dataRange(), QCPRange(0.0, 1.0));
    }

    void causalModeUpdatesThePredictorPanel() {
        auto w = makeWindow(QStringLiteral("a tree by the river, and the dark water of time said unto them"));
        QVERIFY(w);
        QVERIFY(w->predictorPanel()->summary().contains(QStringLiteral("top-k")));
        const auto before = w->snapshot();
        w->routingControls()->modeBox()->setCurrentIndex(1);
        QVERIFY(waitForRun(*w));
        const auto& s = *w->snapshot();
        QVERIFY(s.job != before->job);
        QCOMPARE(s.trace.mode, RoutingMode::Causal);
        QVERIFY(w->predictorPanel()->summary().contains(QStringLiteral("causal")));
        // The table shows this run's counts: one row per routed layer and one for all of them.
        auto* table = w->predictorPanel()->table();
        QCOMPARE(table->rowCount(), 3);
        AgreementCounts l1 = s.agreement[1];
        const Agreement expected = Agreement::of(s.trace.layers[1]);
        QCOMPARE(l1.tp, expected.tp);
        QCOMPARE(table->item(0, 4)->text(), QString::number(expected.tp));
        QCOMPARE(table->item(0, 5)->text(), QString::number(expected.fp));
        QCOMPARE(table->item(0, 6)->text(), QString::number(expected.tn));
        QCOMPARE(table->item(0, 7)->text(), QString::number(expected.fn));
        QCOMPARE(table->item(0, 1)->text(), QStringLiteral("%1%").arg(expected.accuracy() * 100.0, 0, 'f', 1));
        // In causal mode the predictor decides: processed == predictor_selected.
        for (const auto& layer : s.trace.layers)
            if (layer.routed) QCOMPARE(layer.selected, layer.predictor_selected);
    }

    void exportsWriteFilesThatParseBack() {
        auto w = makeWindow(QStringLiteral("fire and water, light and dark: the house by the river"));
        QVERIFY(w);
        QTemporaryDir out;
        const int T = w->snapshot()->tokens();

        QSignalSpy done(w.get(), &MainWindow::exportFinished);
        const QString json = out.filePath(QStringLiteral("trace.json"));
        const QString csv = out.filePath(QStringLiteral("trace.csv"));
        w->exportTrace(json);
        w->exportTrace(csv);
        QTRY_COMPARE_WITH_TIMEOUT(done.count(), 2, kTimeoutMs);
        for (const auto& call : done) QCOMPARE(call.at(1).toString(), QString());

        const TraceDocument doc = loadTrace(json.toStdString());
        QCOMPARE(int(doc.tokens.size()), T);
        QCOMPARE(int(doc.run.layers.size()), 4);
        QCOMPARE(doc.model.name, std::string("app-fixture"));
        QCOMPARE(doc.run.layers[1].selected, w->snapshot()->trace.layers[1].selected);
        const auto rows = traceRowsFromCsv(readAll(csv).toStdString());
        QCOMPARE(int(rows.size()), T * 4);

        for (const QString& name : {QStringLiteral("heatmap.png"), QStringLiteral("heatmap.svg"),
                                    QStringLiteral("heatmap.pdf"), QStringLiteral("capacity.svg"),
                                    QStringLiteral("predictor.pdf"), QStringLiteral("depth.png"),
                                    QStringLiteral("window.png")}) {
            const QString which = name.section(QLatin1Char('.'), 0, 0);
            const QString path = out.filePath(name);
            QCOMPARE(w->exportFigure(which, path), QString());
            QVERIFY2(QFileInfo(path).size() > 200, qPrintable(name));
            if (name.endsWith(QLatin1String(".png"))) {
                QImage image(path);
                QVERIFY2(!image.isNull(), qPrintable(name));
            } else if (name.endsWith(QLatin1String(".svg"))) {
                QSvgRenderer svg(path);
                QVERIFY2(svg.isValid(), qPrintable(name));
                const QByteArray dump = qgetenv("MODSCOPE_VIEWS_DUMP");
                if (!dump.isEmpty()) {
                    QImage image(svg.defaultSize(), QImage::Format_ARGB32);
                    image.fill(Qt::white);
                    QPainter painter(&image);
                    svg.render(&painter);
                    painter.end();
                    image.save(QString::fromLocal8Bit(dump) + QLatin1Char('/') + name + QStringLiteral(".png"));
                }
            } else {
                QFile f(path);
                QVERIFY(f.open(QIODevice::ReadOnly));
                QVERIFY(f.read(5) == "%PDF-");
            }
        }
        QVERIFY(QImage(out.filePath(QStringLiteral("window.png"))).size() == w->size());

        // Figures show the data, not the cursor: with a cell locked, the heatmap and depth figures are the
        // same images as without, and the screen still shows the lock.
        const auto figure = [&](const QString& which, const QString& name) {
            const QString path = out.filePath(name);
            if (!w->exportFigure(which, path).isEmpty()) return QImage();
            return QImage(path);
        };
        w->heatmap()->selectCell(-1, -1);
        const QImage heat_free = figure(QStringLiteral("heatmap"), QStringLiteral("free.png"));
        const QImage depth_free = figure(QStringLiteral("depth"), QStringLiteral("depth-free.png"));
        w->selectCell(1, 2);
        QCOMPARE(w->heatmap()->selectedToken(), 2);
        QVERIFY(!heat_free.isNull() && !depth_free.isNull());
        QVERIFY(figure(QStringLiteral("heatmap"), QStringLiteral("locked.png")) == heat_free);
        QVERIFY(figure(QStringLiteral("depth"), QStringLiteral("depth-locked.png")) == depth_free);
        QCOMPARE(w->heatmap()->selectedToken(), 2);  // the export left the lock on screen

        // A failed export: a clear message, nothing half-written, and the app goes on as before.
        const auto snapshot = w->snapshot();
        const QString bad = out.filePath(QStringLiteral("no/such/dir/trace.json"));
        done.clear();
        w->exportTrace(bad);
        QTRY_COMPARE_WITH_TIMEOUT(done.count(), 1, kTimeoutMs);
        QVERIFY(!done.first().at(1).toString().isEmpty());
        QVERIFY(w->banner()->text().contains(QStringLiteral("no/such/dir")));
        QVERIFY(!QFileInfo::exists(bad));
        QVERIFY(!w->exportFigure(QStringLiteral("heatmap"), out.filePath(QStringLiteral("no/dir/x.png"))).isEmpty());
        QVERIFY(!w->exportFigure(QStringLiteral("heatmap"), out.filePath(QStringLiteral("x.bmp"))).isEmpty());
        QCOMPARE(w->snapshot(), snapshot);
        QTest::keyClicks(w->promptEditor()->editor(), QStringLiteral(" again"));
        QVERIFY(waitForRun(*w));
    }

    // The app's export and modscope-trace run the same engine code: the same input gives the same trace
    // (everything but the timing fields and the model's directory path).
    void exportMatchesTheCommandLine() {
        const QString prompt = QStringLiteral("the king said unto them: 42 rivers, and the light!");
        auto w = makeWindow(prompt);
        QVERIFY(w);
        w->setCapacity(0.25);
        w->setRoutingMode(RoutingMode::Causal);
        QVERIFY(waitForRun(*w));
        QTemporaryDir out;
        const QString app_json = out.filePath(QStringLiteral("app.json"));
        const QString cli_json = out.filePath(QStringLiteral("cli.json"));
        QSignalSpy done(w.get(), &MainWindow::exportFinished);
        w->exportTrace(app_json);
        QTRY_COMPARE_WITH_TIMEOUT(done.count(), 1, kTimeoutMs);
        QProcess cli;
        cli.start(QStringLiteral(MODSCOPE_BIN_DIR "/modscope-trace"),
                  {"--model", model_dir_, "--prompt", prompt, "--capacity", "0.25", "--mode", "causal",
                   "--device", "cpu", "--quiet", "--out", cli_json});
        QVERIFY(cli.waitForFinished(kTimeoutMs));
        QCOMPARE(cli.exitCode(), 0);

        const TraceDocument a = loadTrace(app_json.toStdString()), b = loadTrace(cli_json.toStdString());
        QCOMPARE(a.prompt, b.prompt);
        QCOMPARE(a.model.name, b.model.name);
        QCOMPARE(a.model.weights_sha256, b.model.weights_sha256);
        QCOMPARE(a.model.config.toJson(), b.model.config.toJson());
        QCOMPARE(a.tokens.size(), b.tokens.size());
        for (std::size_t i = 0; i < a.tokens.size(); ++i) {
            QCOMPARE(a.tokens[i].id, b.tokens[i].id);
            QCOMPARE(a.tokens[i].piece, b.tokens[i].piece);
            QCOMPARE(a.tokens[i].byte_begin, b.tokens[i].byte_begin);
            QCOMPARE(a.tokens[i].byte_end, b.tokens[i].byte_end);
        }
        QCOMPARE(a.run.mode, RoutingMode::Causal);
        QCOMPARE(a.run.mode, b.run.mode);
        QCOMPARE(a.run.capacity, b.run.capacity);
        QCOMPARE(a.run.flops, b.run.flops);
        QCOMPARE(a.run.dense_flops, b.run.dense_flops);
        QCOMPARE(a.run.layers.size(), b.run.layers.size());
        for (std::size_t l = 0; l < a.run.layers.size(); ++l) {
            const auto &x = a.run.layers[l], &y = b.run.layers[l];
            QCOMPARE(x.k, y.k);
            QCOMPARE(x.processed, y.processed);
            QCOMPARE(x.selected, y.selected);
            QCOMPARE(x.topk_selected, y.topk_selected);
            QCOMPARE(x.router_logits, y.router_logits);
            QCOMPARE(x.predictor_prob, y.predictor_prob);
            QCOMPARE(x.rank, y.rank);
        }
    }

    // The Model menu lists the bundled models (the source tree's resources/models here) with the open one
    // checked, and opens one in a click.
    void modelMenuOpensTheBundledModels() {
        auto w = makeWindow(QStringLiteral("the lazy dog"));
        QVERIFY(w);
        QMenu* menu = nullptr;
        for (QAction* a : w->menuBar()->actions())
            if (a->text() == QStringLiteral("&Model")) menu = a->menu();
        QVERIFY(menu);
        QAction* bundled_default = nullptr;
        for (QAction* a : menu->actions())
            if (a->text() == QStringLiteral("default")) bundled_default = a;
        QVERIFY(bundled_default);
        const QString bundled_dir = bundled_default->data().toString();
        QVERIFY2(bundled_dir.endsWith(QStringLiteral("resources/models/default")) &&
                     QFile::exists(bundled_dir + QStringLiteral("/config.json")),
                 qPrintable(bundled_dir));
        QVERIFY(!bundled_default->isChecked());  // the fixture is open
        QSignalSpy loaded(w.get(), &MainWindow::modelChanged);
        bundled_default->trigger();
        QVERIFY(loaded.wait(kTimeoutMs));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->model_directory, QDir(bundled_default->data().toString()).absolutePath().toStdString());
        QVERIFY(bundled_default->isChecked());
    }

    // Interventions in the window (docs/MODEL.md): the loss strip against a reference model, decisions forced
    // by keys and by the layer's menu actions, the details panel's predictions before and after, decision values
    // on the heatmap, and an export holding all of it.
    void forcingTheLossStripAndDecisionValues() {
        auto w = makeWindow(QStringLiteral("the lazy dog sleeps in the warm sun while the quick fox runs off"));
        QVERIFY(w);
        // Each run's losses come in a second snapshot of the same run.
        const auto newest = [&](const std::function<bool(const RoutingSnapshot&)>& ok) {
            return QTest::qWaitFor(
                [&] {
                    const auto& s = w->snapshot();
                    return s && s->job == w->session()->latestRunJob() && !w->isStale() && ok(*s);
                },
                kTimeoutMs);
        };
        QVERIFY(newest([](const RoutingSnapshot& s) { return s.hasLosses(); }));
        const int T = w->snapshot()->tokens();
        QCOMPARE(int(w->snapshot()->trace.top_ids.size()), T * w->snapshot()->trace.top_n);

        // The six-layer fixture has the same tokenizer: the strip shows the loss against it.
        w->openReferenceModel(model2_dir_);
        QVERIFY(newest([](const RoutingSnapshot& s) { return !s.reference_token_loss.empty(); }));
        QCOMPARE(w->referenceName(), QStringLiteral("six-layers"));
        QVERIFY(w->lossStrip()->shows() == TokenLossStrip::Shows::AgainstReference);
        QVERIFY2(w->lossStrip()->heading().contains(QStringLiteral("six-layers")), qPrintable(w->lossStrip()->heading()));
        const double expected = w->snapshot()->trace.token_loss[1] - w->snapshot()->reference_token_loss[1];
        QCOMPARE(w->lossStrip()->barValue(1), expected);
        QVERIFY(w->lossStrip()->tokenSummary(1).contains(QStringLiteral("top 5")));

        // S on the locked cell: layer 1 skips token 2 (or P processes it, whichever flips it).
        w->selectCell(1, 2);
        const bool was = w->snapshot()->trace.layers[1].selected[2];
        w->heatmap()->setFocus();
        QTest::keyClick(w->heatmap(), was ? Qt::Key_S : Qt::Key_P);
        QVERIFY(newest([](const RoutingSnapshot& s) { return s.hasLosses() && !s.trace.overrides.empty(); }));
        {
            const auto& s = *w->snapshot();
            QCOMPARE(int(s.trace.overrides.size()), 1);
            QCOMPARE(bool(s.trace.layers[1].selected[2]), !was);
            QCOMPARE(forcedDecision(s.trace, 1, 2), was ? 0 : 1);
            QCOMPARE(int(s.baseline_token_loss.size()), T);
        }
        QVERIFY(w->lossStrip()->shows() == TokenLossStrip::Shows::AgainstBaseline);
        QVERIFY(w->heatmap()->title().contains(QStringLiteral("1 forced")));
        QVERIFY2(w->detailsPanel()->predictionsText().contains(QStringLiteral("Without the forced decisions")),
                 qPrintable(w->detailsPanel()->predictionsText()));
        // Delete clears it; then the whole layer skipped, which replaces the layer's single overrides.
        QTest::keyClick(w->heatmap(), Qt::Key_Delete);
        QVERIFY(newest([](const RoutingSnapshot& s) { return s.hasLosses() && s.trace.overrides.empty(); }));
        w->forceDecision(1, 3, RoutingHeatmap::Force::Process);
        w->forceDecision(1, -1, RoutingHeatmap::Force::Skip);
        QCOMPARE(int(w->interventions().overrides.size()), 1);
        QVERIFY(newest([](const RoutingSnapshot& s) { return s.hasLosses() && s.trace.overrides.size() == 1; }));
        QCOMPARE(w->snapshot()->trace.layers[1].processed, 0);

        // Decision values: computed on the engine's thread, then shown on a diverging scale with the summary.
        w->setDecisionValuesShown(true);
        QVERIFY(newest([](const RoutingSnapshot& s) { return s.trace.decision_values; }));
        QVERIFY(w->heatmap()->showsDecisionValues());
        QVERIFY2(w->heatmap()->title().contains(QStringLiteral("most valuable")), qPrintable(w->heatmap()->title()));
        QCOMPARE(int(w->snapshot()->trace.layers[3].decision_value.size()), T);

        QTemporaryDir out;
        QSignalSpy exported(w.get(), &MainWindow::exportFinished);
        w->exportTrace(out.filePath(QStringLiteral("values.json")));
        QVERIFY(exported.wait(kTimeoutMs));
        QCOMPARE(exported.first().at(1).toString(), QString());
        const TraceDocument doc = loadTrace(out.filePath(QStringLiteral("values.json")).toStdString());
        QVERIFY(doc.run.decision_values);
        QCOMPARE(int(doc.run.token_loss.size()), T);
        QCOMPARE(int(doc.run.overrides.size()), 1);
        QCOMPARE(doc.run.layers[3].decision_value, w->snapshot()->trace.layers[3].decision_value);
        const QString csv = out.filePath(QStringLiteral("values.csv"));
        w->exportTrace(csv);
        QVERIFY(exported.wait(kTimeoutMs));
        int forced_rows = 0, value_rows = 0;
        for (const auto& row : traceRowsFromCsv(readAll(csv).toStdString())) {
            forced_rows += row.forced == "skip" ? 1 : 0;
            value_rows += row.decision_value ? 1 : 0;
        }
        QCOMPARE(forced_rows, T);  // the whole of layer 1
        QCOMPARE(value_rows, 2 * T);
        // The loss strip is a figure of its own.
        const QString strip = out.filePath(QStringLiteral("loss.svg"));
        QCOMPARE(w->exportFigure(QStringLiteral("loss"), strip), QString());
        QVERIFY(QFileInfo(strip).size() > 0);

        // Off again: the next run has none, and the clear-all action empties the overrides.
        w->setDecisionValuesShown(false);
        w->clearOverrides();
        QVERIFY(newest([](const RoutingSnapshot& s) {
            return s.hasLosses() && !s.trace.decision_values && s.trace.overrides.empty();
        }));
        QVERIFY(!w->heatmap()->showsDecisionValues());
        QVERIFY(w->lossStrip()->shows() == TokenLossStrip::Shows::AgainstReference);
    }

    // The Corpus window: the open model's routing counted over a corpus on a thread of its own, the pieces it
    // takes and skips with their contexts, a context chosen as the prompt, a statistics file opened, a figure.
    void corpusWindowCountsAndShowsStatistics() {
        auto w = makeWindow(QStringLiteral("the lazy dog"));
        QVERIFY(w);
        QTemporaryDir dir;
        const QString corpus = dir.filePath(QStringLiteral("corpus.txt"));
        {
            QFile f(corpus);
            QVERIFY(f.open(QIODevice::WriteOnly));
            for (int i = 0; i < 400; ++i)
                f.write(QStringLiteral("The lazy dog %1 sleeps in the warm sun, while the quick fox runs off.\n").arg(i % 7).toUtf8());
        }
        QSignalSpy done(w.get(), &MainWindow::corpusStatisticsDone);
        w->runCorpusStatistics({corpus});
        QVERIFY(w->isCountingCorpus());
        QVERIFY(done.wait(kTimeoutMs));
        QCOMPARE(done.first().at(0).toString(), QString());
        QVERIFY(!w->isCountingCorpus());
        CorpusWindow* cw = w->corpusWindow();
        QVERIFY(cw->isVisible() && cw->stats());
        const auto& stats = *cw->stats();  // valid until the window shows other statistics
        const std::int64_t tokens = stats.tokens;
        QVERIFY(stats.tokens > 1000 && !stats.partial);
        QCOMPARE(int(stats.layers.size()), 2);
        QVERIFY(!cw->processedIds().empty() && !cw->skippedIds().empty());
        // A piece's contexts, and one chosen as the prompt (without the markers).
        cw->selectPiece(cw->processedIds().front());
        QVERIFY(cw->contexts()->count() > 0);
        const QString context = cw->contexts()->item(0)->data(Qt::UserRole).toString();
        QVERIFY(!context.contains(QChar(0x27E6)));
        Q_EMIT cw->contexts()->itemActivated(cw->contexts()->item(0));
        QCOMPARE(w->promptEditor()->text(), context);
        if (const QByteArray dump = qgetenv("MODSCOPE_VIEWS_DUMP"); !dump.isEmpty())
            for (int tab = cw->tabs()->count() - 1; tab >= 0; --tab) {
                cw->tabs()->setCurrentIndex(tab);
                cw->grab().save(QString::fromLocal8Bit(dump) + QStringLiteral("/corpus-window-%1.png").arg(tab));
            }
        if (const QByteArray dump = qgetenv("MODSCOPE_VIEWS_DUMP"); !dump.isEmpty())
            cw->grab().save(QString::fromLocal8Bit(dump) + QStringLiteral("/corpus-window.png"));
        QTemporaryDir out;
        QCOMPARE(cw->exportFigure(out.filePath(QStringLiteral("corpus.png"))), QString());
        QVERIFY(QFileInfo(out.filePath(QStringLiteral("corpus.png"))).size() > 1000);
        // The same statistics as a file open again, named in the header.
        const QString file = out.filePath(QStringLiteral("stats.json"));
        writeFileAtomic(file.toStdString(), statsToJson(stats));
        QVERIFY(w->openStatistics(file));
        QVERIFY(cw->headline().contains(QStringLiteral("stats.json")));
        QCOMPARE(cw->stats()->tokens, tokens);
        // A file that is not statistics is refused with a message; the window keeps what it showed.
        QVERIFY(!w->openStatistics(corpus));
        QCOMPARE(cw->stats()->tokens, tokens);
        // Cancelled at once: it ends, partial or (on a fast machine) complete, and another can start.
        done.clear();
        w->runCorpusStatistics({corpus});
        w->cancelCorpusStatistics();
        QVERIFY(done.wait(kTimeoutMs));
        QVERIFY(!w->isCountingCorpus());
    }

    // Compare across models: a run pinned on one mixture model, the same prompt on another; the diff counts
    // the tokens that ran another expert, and the live heatmap names its mixture layers.
    void aPinnedRunComparesAcrossMixtureModels() {
        QTemporaryDir models;
        apptest::FixtureOptions staged;
        staged.name = "fixture-staged";
        staged.moe_layers = {1, 3};
        staged.n_experts = 3;
        apptest::FixtureOptions integrated = staged;
        integrated.name = "fixture-integrated";
        integrated.routed_layers = {};
        integrated.noop_experts = 2;
        integrated.seed = 8;
        const QString a = models.filePath(QStringLiteral("staged")), b = models.filePath(QStringLiteral("integrated"));
        apptest::writeFixtureModel(a.toStdString(), staged);
        apptest::writeFixtureModel(b.toStdString(), integrated);
        auto w = apptest::openFixtureWindow(a, QStringLiteral("the quick brown fox jumps over the lazy dog again"),
                                            kTimeoutMs, nullptr);
        QVERIFY(w);
        QVERIFY(w->snapshot()->trace.layers[1].moe);
        w->pinRun();
        QSignalSpy loaded(w.get(), &MainWindow::modelChanged);
        w->openModel(b);
        QVERIFY(loaded.wait(kTimeoutMs));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->model_name, std::string("fixture-integrated"));
        QVERIFY(w->pinnedHeatmap()->snapshot());
        QCOMPARE(w->pinnedHeatmap()->snapshot()->model_name, std::string("fixture-staged"));
        const auto diff = RoutingDiff::of(*w->snapshot(), *w->pinnedHeatmap()->snapshot());
        QVERIFY(diff.expert_cells > 0);
        QVERIFY(w->heatmap()->layerTicker()->labels().contains(QStringLiteral("L1 MoDE")));
        QVERIFY(w->capacityChart()->expertLoad()->isVisibleTo(w.get()));
        // Its figure shows the expert loads too: the whole panel, as wide as the panel.
        QTemporaryDir out;
        const QString png = out.filePath(QStringLiteral("capacity.png"));
        QCOMPARE(w->exportFigure(QStringLiteral("capacity"), png), QString());
        QImage image(png);
        QVERIFY(!image.isNull());
        QVERIFY2(image.width() >= w->capacityChart()->width() * 0.9 &&
                     image.width() > w->capacityChart()->plot()->width() + w->capacityChart()->expertLoad()->width() / 2,
                 qPrintable(QString("%1 px").arg(image.width())));
    }

    void brokenModelShowsAnErrorAndThePreviousModelStaysUsable() {
        auto w = makeWindow(QStringLiteral("the lazy dog"));
        QVERIFY(w);
        QTemporaryDir broken;
        {
            std::ofstream(QDir(broken.path()).filePath(QStringLiteral("config.json")).toStdString()) << "{ not json";
            std::ofstream(QDir(broken.path()).filePath(QStringLiteral("weights.pt")).toStdString()) << "garbage";
            std::ofstream(QDir(broken.path()).filePath(QStringLiteral("tokenizer.model")).toStdString()) << "garbage";
        }
        for (const QString& bad : {broken.path(), dir_.filePath(QStringLiteral("does-not-exist"))}) {
            QSignalSpy failed(w.get(), &MainWindow::modelLoadFailed);
            w->openModel(bad);
            QVERIFY(failed.wait(kTimeoutMs));
            QCOMPARE(w->banner()->kind(), MessageBanner::Kind::Error);
            QVERIFY(w->banner()->text().contains(QStringLiteral("Could not open the model")));
            QVERIFY(w->banner()->text().contains(QStringLiteral("Still using app-fixture")));
            QCOMPARE(QString::fromStdString(w->model()->name), QStringLiteral("app-fixture"));
            // Still usable: an edit runs on the old model.
            QTest::keyClicks(w->promptEditor()->editor(), QStringLiteral(" jumps"));
            QVERIFY(waitForRun(*w));
            QCOMPARE(w->snapshot()->model_name, std::string("app-fixture"));
            QCOMPARE(w->heatmap()->rowCount(), 4);
        }
        // A good model replaces it, and clears the error.
        QSignalSpy loaded(w.get(), &MainWindow::modelChanged);
        w->openModel(model2_dir_);
        QVERIFY(loaded.wait(kTimeoutMs));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->heatmap()->rowCount(), 6);
        QVERIFY(w->banner()->text().isEmpty());
    }

    // Started on a model that cannot be opened (modscope --model BADDIR): the reason shows, in the banner and
    // where the heatmap would be, not a run failing for want of a model; while it opens, the heatmap says so.
    void aStartOnABadModelSaysWhy() {
        const auto window = apptest::showWindow(QStringLiteral("the river said"));
        MainWindow& w = *window;
        QSignalSpy failed(&w, &MainWindow::modelLoadFailed);
        const QString bad = dir_.filePath(QStringLiteral("no-model-here"));
        w.openModel(bad);
        QVERIFY(w.heatmap()->placeholder().contains(QStringLiteral("Opening the model")));
        QVERIFY(failed.wait(kTimeoutMs));
        // The run the prompt asked for, queued behind the open, has been answered (and failed) by now.
        QTRY_VERIFY_WITH_TIMEOUT(!w.session()->isRunPending(), kTimeoutMs);
        QVERIFY2(w.banner()->text().contains(QStringLiteral("Could not open the model")) &&
                     !w.banner()->text().contains(QStringLiteral("No model is loaded")),
                 qPrintable(w.banner()->text()));
        QVERIFY2(w.heatmap()->placeholder().contains(QStringLiteral("No model loaded: ")) &&
                     w.heatmap()->placeholder().contains(failed.first().first().toString()),
                 qPrintable(w.heatmap()->placeholder()));
        if (w.refusalDialog()) w.refusalDialog()->accept();
    }

    void pinningTogglesThePinActionsWording() {
        auto w = makeWindow(QStringLiteral("the lazy dog"));
        QVERIFY(w);
        QAction* pin = nullptr;
        for (QAction* a : w->findChildren<QAction*>())
            if (a->shortcut() == QKeySequence(Qt::CTRL | Qt::Key_P)) pin = a;
        QVERIFY(pin);
        QCOMPARE(pin->text(), QStringLiteral("&Pin Run"));
        w->pinRun();
        QCOMPARE(pin->text(), QStringLiteral("Re&pin Run"));
        w->unpin();
        QCOMPARE(pin->text(), QStringLiteral("&Pin Run"));
    }

    // The bad checkpoints of tests/bad_files.cpp: each refused with its reason in the banner, and the
    // model in use stays, usable.
    void eachBadModelIsRefusedAndTheModelInUseStays() {
        auto w = makeWindow(QStringLiteral("the lazy dog"));
        QVERIFY(w);
        QTemporaryDir parent;
        const auto bad = badfiles::makeBadCheckpoints(model_dir_.toStdString(), parent.path().toStdString());
        QVERIFY(bad.size() >= 15);
        for (const auto& b : bad) {
            QSignalSpy failed(w.get(), &MainWindow::modelLoadFailed);
            w->openModel(QString::fromStdString(b.path));
            QVERIFY2(failed.wait(kTimeoutMs), b.name.c_str());
            QCOMPARE(w->banner()->kind(), MessageBanner::Kind::Error);
            const QString text = w->banner()->text();
            QVERIFY2(text.contains(QString::fromStdString(b.expected)) && text.contains(QStringLiteral("Still using app-fixture")),
                     qPrintable(QString::fromStdString(b.name) + ": " + text));
            QVERIFY2(w->refusalDialog() && w->refusalDialog()->isVisible(), b.name.c_str());
            QVERIFY2(w->refusalDialog()->text().contains(QString::fromStdString(b.expected)), b.name.c_str());
            QCOMPARE(QString::fromStdString(w->model()->name), QStringLiteral("app-fixture"));
        }
        w->refusalDialog()->accept();  // window-modal: the editor takes keys again once it is closed
        QTest::keyClicks(w->promptEditor()->editor(), QStringLiteral(" jumps"));
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->model_name, std::string("app-fixture"));
        QCOMPARE(w->heatmap()->rowCount(), 4);
    }

    // Exports onto a full disk (RLIMIT_FSIZE, which binds root too): the banner says so, the file exported
    // before is intact, and no temporary file is left.
    void exportsOntoAFullDiskKeepTheEarlierFile() {
        auto w = makeWindow(QStringLiteral("fire and water, light and dark"));
        QVERIFY(w);
        QTemporaryDir out;
        const QString json = out.filePath(QStringLiteral("trace.json"));
        const QString png = out.filePath(QStringLiteral("heatmap.png"));
        const QString svg = out.filePath(QStringLiteral("heatmap.svg"));
        QSignalSpy done(w.get(), &MainWindow::exportFinished);
        w->exportTrace(json);
        QVERIFY(done.wait(kTimeoutMs));
        QCOMPARE(done.first().at(1).toString(), QString());
        QCOMPARE(w->exportFigure(QStringLiteral("heatmap"), png), QString());
        QCOMPARE(w->exportFigure(QStringLiteral("heatmap"), svg), QString());
        const QByteArray before_json = readAll(json).toUtf8();
        const qint64 before_svg_size = QFile(svg).size();
        QFile f(png);
        QVERIFY(f.open(QIODevice::ReadOnly));
        const QByteArray before_png = f.readAll();
        f.close();
        QTest::keyClicks(w->promptEditor()->editor(), QStringLiteral(" and the river of time"));
        QVERIFY(waitForRun(*w));
        {
            test::FileSizeLimit full(256);
            done.clear();
            w->exportTrace(json);
            QVERIFY(done.wait(kTimeoutMs));
            QVERIFY(done.first().at(1).toString().contains(QStringLiteral("left as it was")));
            QVERIFY(w->banner()->text().contains(QStringLiteral("trace.json")));
            QVERIFY(!w->exportFigure(QStringLiteral("heatmap"), png).isEmpty());
            QVERIFY(!w->exportFigure(QStringLiteral("heatmap"), svg).isEmpty());
            const QString pdf_error = w->exportFigure(QStringLiteral("heatmap"), out.filePath(QStringLiteral("heatmap.pdf")));
            QVERIFY2(pdf_error.contains(QStringLiteral("heatmap.pdf")), qPrintable(pdf_error));
        }
        QCOMPARE(readAll(json).toUtf8(), before_json);
        QVERIFY(f.open(QIODevice::ReadOnly));
        QCOMPARE(f.readAll(), before_png);
        QVERIFY(QSvgRenderer(svg).isValid());
        QCOMPARE(QFile(svg).size(), before_svg_size);
        // No temporary file, and no PDF half-written where there was none.
        QCOMPARE(QDir(out.path()).entryList(QDir::Files | QDir::Hidden | QDir::System).size(), qsizetype(3));
        // And with room again, the export goes through.
        done.clear();
        w->exportTrace(json);
        QVERIFY(done.wait(kTimeoutMs));
        QCOMPARE(done.first().at(1).toString(), QString());
        QVERIFY(readAll(json).toUtf8() != before_json);
    }

    // T = 1, capacity 0 % and 100 %, a one-layer model (routed, and full), control characters: each runs
    // and shows what the engine gives.
    void extremeShapesAndInputs() {
        auto w = makeWindow();
        QVERIFY(w);
        QString one;
        for (const QString& candidate : {QStringLiteral("the"), QStringLiteral("a"), QStringLiteral("x")})
            if (tokenCount(candidate) == 1) {
                one = candidate;
                break;
            }
        QVERIFY(!one.isEmpty());
        w->setPrompt(one);
        for (int tenths : {0, 1000}) {
            w->routingControls()->slider()->setValue(tenths);
            QVERIFY(waitForRun(*w));
            QCOMPARE(w->snapshot()->tokens(), 1);
            QCOMPARE(w->heatmap()->columnCount(), 1);
            for (const auto& layer : w->snapshot()->trace.layers) QCOMPARE(layer.processed, 1);  // k = 1 at 0 % too
        }
        // Control characters (NUL excepted: the editor holds text) tokenize by byte fallback and run.
        const QString controls = QStringLiteral("a\u0001b\u0007c\u001b[31md\u007f\u200e\u202eevil\u202c\r\n\t");
        w->setPrompt(controls);
        QVERIFY(waitForRun(*w));
        // The editor keeps every character but stores a line break as "\n" (the CR of "\r\n" goes).
        QCOMPARE(w->promptEditor()->text(), QString(controls).replace(QStringLiteral("\r\n"), QStringLiteral("\n")));
        QCOMPARE(w->snapshot()->tokens(), int(tokenCount(w->promptEditor()->text())));
        QVERIFY(w->banner()->text().isEmpty());

        // One-layer models: one routed layer, and one full layer with no router at all.
        for (const std::vector<int>& routed : {std::vector<int>{0}, std::vector<int>{}}) {
            QTemporaryDir one_layer;
            apptest::FixtureOptions o;
            o.name = "one-layer";
            o.n_layers = 1;
            o.routed_layers = routed;
            apptest::writeFixtureModel(one_layer.path().toStdString(), o);
            QSignalSpy loaded(w.get(), &MainWindow::modelChanged);
            w->openModel(one_layer.path());
            QVERIFY(loaded.wait(kTimeoutMs));
            w->setPrompt(QStringLiteral("the river said unto them"));
            w->routingControls()->slider()->setValue(250);
            QVERIFY(waitForRun(*w));
            const auto& s = *w->snapshot();
            QCOMPARE(s.model_name, std::string("one-layer"));
            QCOMPARE(w->heatmap()->rowCount(), 1);
            QCOMPARE(s.layers(), 1);
            const int T = s.tokens();
            QCOMPARE(s.trace.layers[0].processed, routed.empty() ? T : capacityToK(0.25, T));
            w->setRoutingMode(RoutingMode::Causal);
            QVERIFY(waitForRun(*w));
            QCOMPARE(w->snapshot()->layers(), 1);
            w->setRoutingMode(RoutingMode::TopK);
            QVERIFY(waitForRun(*w));
        }
    }

    void aHugePasteIsTruncatedToTheContextWithANotice() {
        auto w = makeWindow();
        QVERIFY(w);
        QString huge;
        const QString line = QStringLiteral("the river of time said unto them, the house of fire and water.\n");
        while (huge.size() < 1024 * 1024) huge += line;
        w->setPrompt(huge);
        QVERIFY(waitForRun(*w));
        const SnapshotPtr shown = w->snapshot();
        const auto& s = *shown;
        // The megabyte was tokenized on the engine's thread, not on the GUI thread (this test's).
        QVERIFY(s.tokenized_on != std::thread::id());
        QVERIFY(s.tokenized_on != std::this_thread::get_id());
        QVERIFY(s.truncated);
        QCOMPARE(s.tokens(), 64);
        QVERIFY(s.original_tokens > 64);
        QCOMPARE(w->heatmap()->columnCount(), 64);
        QVERIFY(w->promptEditor()->notice().contains(QStringLiteral("Truncated")));
        QVERIFY(w->promptEditor()->overflowFrom() > 0);
        QVERIFY(w->promptEditor()->overflowFrom() < huge.size());
        QVERIFY(w->statusText().contains(QStringLiteral("truncated")));
        // The export keeps what was cut: the original sizes, the text that ran.
        QTemporaryDir out;
        QSignalSpy done(w.get(), &MainWindow::exportFinished);
        w->exportTrace(out.filePath(QStringLiteral("cut.json")));
        QVERIFY(done.wait(kTimeoutMs));
        QCOMPARE(done.first().at(1).toString(), QString());
        const TraceDocument doc = loadTrace(out.filePath(QStringLiteral("cut.json")).toStdString());
        QVERIFY(doc.truncated());
        QCOMPARE(doc.tokens.size(), std::size_t(64));
        QCOMPARE(doc.original_tokens, tokenCount(huge));
        QVERIFY(w->snapshot()->original_tokens_exact);
        QVERIFY(w->snapshot()->tokenized_on == s.tokenized_on);  // the rest was counted there too
        QVERIFY(w->promptEditor()->notice().contains(QLocale().toString(qulonglong(tokenCount(huge)))));
        QCOMPARE(doc.original_bytes, std::size_t(huge.toUtf8().size()));
    }

    void awkwardPromptsHaveDefinedBehaviour() {
        auto w = makeWindow();
        QVERIFY(w);
        // Empty: no run to show, no error, a hint.
        w->setPrompt(QString());
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->tokens(), 0);
        QCOMPARE(w->heatmap()->columnCount(), 0);
        QVERIFY(w->promptEditor()->notice().contains(QStringLiteral("Empty")));
        QVERIFY(w->banner()->text().isEmpty());
        // Whitespace, emoji, right-to-left scripts, combining marks: they tokenize (byte fallback) and run.
        for (const QString& text : {QStringLiteral("   \n\t  "), QStringLiteral("fire 🔥 and water 💧👩‍👩‍👧"),
                                    QStringLiteral("שלום עולם and مرحبا بالعالم"), QStringLiteral("e\u0301te\u0301 naïve")}) {
            w->setPrompt(text);
            QVERIFY(waitForRun(*w));
            const auto& s = *w->snapshot();
            QCOMPARE(s.tokens(), int(tokenCount(text)));
            QCOMPARE(w->heatmap()->columnCount(), s.tokens());
            for (const auto& t : s.texts) QVERIFY(QString::fromStdString(t).toStdString() == t);  // valid UTF-8
            QVERIFY(w->banner()->text().isEmpty());
        }
        // Invalid UTF-8 (from a file or the command line) becomes U+FFFD before it is tokenized.
        const auto p = preparePrompt(*tokenizer_, std::string("ab\xff\xfe" "cd\xc3"), 64);
        QVERIFY(isValidUtf8(p.text));
        QVERIFY(!p.tokens.empty());
        QCOMPARE(p.text, std::string("ab\xef\xbf\xbd\xef\xbf\xbd" "cd\xef\xbf\xbd"));
    }

    void chunkedTokenizingEqualsOneEncode() {
        // Long prompts are tokenized in chunks (cancellable, and only as far as the run needs): the tokens
        // and byte ranges must be exactly those of one encode.
        const std::string texts[] = {apptest::fixtureCorpus(20000, 5), "  two  spaces   and\nnew\n\nlines  ",
                                     "fire \xf0\x9f\x94\xa5 and \xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d water", "nospacesatalllllllllllllll"};
        for (const auto& text : texts) {
            const auto whole = tokenizer_->encode(text);
            for (std::size_t chunk : {std::size_t(7), std::size_t(64), std::size_t(1000)}) {
                std::vector<Token> pieces;
                encodeInChunks(*tokenizer_, text, 0, nullptr, [&](std::vector<Token>&& t) {
                    pieces.insert(pieces.end(), t.begin(), t.end());
                    return true;
                }, chunk);
                QCOMPARE(pieces.size(), whole.size());
                for (std::size_t i = 0; i < whole.size(); ++i) {
                    QCOMPARE(pieces[i].id, whole[i].id);
                    QCOMPARE(pieces[i].byte_begin, whole[i].byte_begin);
                    QCOMPARE(pieces[i].byte_end, whole[i].byte_end);
                }
            }
        }
        // Stopping early keeps the first tokens exact and counts the rest afterwards.
        const std::string long_text = apptest::fixtureCorpus(300000, 9);
        auto p = preparePrompt(*tokenizer_, long_text, 64, /*stop_early=*/true);
        QVERIFY(!p.counted);
        QVERIFY(p.truncated());
        const auto whole = tokenizer_->encode(long_text);
        for (int i = 0; i < 64; ++i) QCOMPARE(p.tokens[i].id, whole[i].id);
        countRemainingTokens(*tokenizer_, p, nullptr);
        QVERIFY(p.counted);
        QCOMPARE(p.original_tokens, whole.size());
        std::atomic<bool> cancel{true};
        QVERIFY_THROWS_EXCEPTION(Cancelled, preparePrompt(*tokenizer_, long_text, 64, true, &cancel));
    }

    void selectionFillsTheDetailsPanel() {
        auto w = makeWindow(QStringLiteral("the quick brown fox jumps over the lazy dog"));
        QVERIFY(w);
        auto* heatmap = w->heatmap();
        // Click the cell of layer 1, token 2.
        const double x = heatmap->xAxis->coordToPixel(2), y = heatmap->yAxis->coordToPixel(1);
        QTest::mouseClick(heatmap, Qt::LeftButton, Qt::NoModifier, QPoint(int(x), int(y)));
        QCOMPARE(heatmap->selectedToken(), 2);
        QCOMPARE(heatmap->selectedLayer(), 1);
        QCOMPARE(w->detailsPanel()->token(), 2);
        QCOMPARE(w->detailsPanel()->table()->rowCount(), 4);
        QCOMPARE(w->depthView()->selectedToken(), 2);
        const QString summary = heatmap->cellSummary(1, 2);
        for (const char* part : {"router logit", "rank", "top-k threshold", "predictor p", "Decision"})
            QVERIFY2(summary.contains(QLatin1String(part)), part);
        // The selection survives a re-run that still has the cell; Escape releases it.
        QTest::keyClick(heatmap, Qt::Key_Right);
        QCOMPARE(heatmap->selectedToken(), 3);
        QTest::keyClick(heatmap, Qt::Key_Escape);
        QCOMPARE(heatmap->selectedToken(), -1);
        QCOMPARE(w->detailsPanel()->token(), -1);
    }

    void generationStreamsTokensAndStops() {
        auto w = makeWindow(QStringLiteral("the river said"));
        QVERIFY(w);
        const QString before = w->promptEditor()->text();
        GenerationSettings g;
        g.max_new_tokens = 6;
        g.temperature = 0.0;
        w->generationControls()->setSettings(g);
        QSignalSpy done(w.get(), &MainWindow::generationDone);
        QTest::mouseClick(w->generationControls()->generateButton(), Qt::LeftButton);
        QVERIFY(w->generationControls()->isRunning());
        QVERIFY(w->promptEditor()->editor()->isReadOnly());
        QVERIFY(done.wait(kTimeoutMs));
        const auto summary = done.first().first().value<GenerationSummary>();
        QVERIFY(summary.generated >= 1 && summary.generated <= 6);
        QCOMPARE(w->predictorPanel()->generationPoints(), summary.generated);
        QVERIFY(w->promptEditor()->text().startsWith(before));
        QVERIFY(w->promptEditor()->text().size() > before.size());
        QVERIFY(!w->promptEditor()->editor()->isReadOnly());
        QVERIFY(summary.document && summary.document->generation);
        QCOMPARE(int(summary.document->generation->result.generated_ids.size()), summary.generated);
        // Generation's speed is per token; no run latency counts the generation's length.
        QVERIFY2(w->statusText().contains(QStringLiteral("ms/token")) && !w->statusText().contains(QStringLiteral("latency")),
                 qPrintable(w->statusText()));
        QVERIFY(w->generationControls()->status().contains(QStringLiteral("tokens")));
        expectGenerationKept(*w, summary);
        if (QTest::currentTestFailed()) return;

        // Stop: a long generation ends early, cancelled, and keeps what it generated. The fixture's context
        // is 256 tokens, which a fast machine can fill before the click lands: then it ends at the context,
        // and generationDone was already emitted (QSignalSpy::wait would wait for a second one).
        g.max_new_tokens = 4096;
        g.temperature = 1.0;
        w->generationControls()->setSettings(g);
        done.clear();
        w->generationControls()->generateButton()->click();
        QTRY_VERIFY_WITH_TIMEOUT(w->predictorPanel()->generationPoints() >= 3 || !done.isEmpty(), kTimeoutMs);
        w->generationControls()->stopButton()->click();
        if (done.isEmpty()) QVERIFY(done.wait(kTimeoutMs));
        const auto stopped = done.first().first().value<GenerationSummary>();
        QVERIFY2(stopped.cancelled || stopped.hit_context, qPrintable(QString::number(stopped.generated)));
        QVERIFY(!w->generationControls()->isRunning());
        QVERIFY2(stopped.generated >= 3, qPrintable(QString::number(stopped.generated)));
        if (stopped.cancelled)
            QVERIFY2(w->generationControls()->status().contains(tr("stopped after %1 tokens").arg(stopped.generated)),
                     qPrintable(w->generationControls()->status()));
        QCOMPARE(w->promptEditor()->text(), QString::fromStdString(stopped.text));
        QCOMPARE(w->predictorPanel()->generationPoints(), stopped.generated);
        expectGenerationKept(*w, stopped);
        if (QTest::currentTestFailed()) return;

        // Changing the mode runs the text again in that mode; the generation's curve and trace are gone.
        w->setRoutingMode(RoutingMode::TopK);
        QVERIFY(waitForRun(*w));
        QVERIFY(w->snapshot()->trace.mode == RoutingMode::TopK);
        QCOMPARE(w->predictorPanel()->generationPoints(), 0);
        QTest::keyClicks(w->promptEditor()->editor(), QStringLiteral(" more"));
        QVERIFY(waitForRun(*w));
    }


    // Stop keeps every token generated so far, each with its routing, in the text and the trace. Driven on
    // the worker itself, so that the Stop lands at a chosen step (the window's fixture model has a context of
    // 64 tokens, which a generation can fill before a click lands).
    void stopKeepsTheTokensGeneratedSoFar() {
        EngineWorker worker;
        QSignalSpy loaded(&worker, &EngineWorker::modelLoaded);
        worker.loadModel(1, model_dir_, QStringLiteral("cpu"));
        QCOMPARE(loaded.size(), 1);
        GenerateRequest request;
        request.job = 2;
        request.prompt = "the river said";
        request.settings.max_new_tokens = 40;
        request.settings.temperature = 1.0;
        request.capacity = 0.25;
        request.cancel = makeCancelFlag();
        int shown = 0;
        connect(&worker, &EngineWorker::generationStep, this,
                [&](quint64, const GenerationPoint& point, const SnapshotPtr& view) {
                    if (point.index < 0) return;  // the prompt's own view
                    ++shown;
                    QCOMPARE(view->tokens(), view->generated_from + shown);
                    if (shown == 3) request.cancel->store(true);  // Stop, pressed while token 3 shows
                });
        QSignalSpy finished(&worker, &EngineWorker::generationFinished);
        worker.generate(request);
        QCOMPARE(finished.size(), 1);
        const auto summary = finished.first().first().value<GenerationSummary>();
        QVERIFY(summary.cancelled);
        QCOMPARE(summary.generated, 3);
        QCOMPARE(shown, 3);
        QVERIFY(summary.document && summary.document->generation);
        const auto& result = summary.document->generation->result;
        QCOMPARE(int(result.steps.size()), 3);
        QCOMPARE(QString::fromStdString(summary.document->generation->text),
                 QString::fromStdString(summary.text).mid(int(summary.prompt_bytes)));
        QVERIFY(summary.text.rfind(request.prompt, 0) == 0 && summary.text.size() > request.prompt.size());
    }

    void closingDuringARunOrAGenerationShutsTheWorkerDown() {
        {
            auto w = makeWindow(QStringLiteral("time"));
            QVERIFY(w);
            GenerationSettings g;
            g.max_new_tokens = 4096;
            w->generationControls()->setSettings(g);
            w->generationControls()->generateButton()->click();
            QTest::qWait(30);
            QVERIFY(w->close());  // mid-generation: the worker stops and joins
        }
        {
            auto w = makeWindow(QStringLiteral("time"));
            QVERIFY(w);
            w->setPrompt(QStringLiteral("a long prompt about the river and the house of light and dark"));
            w->runNow();
            QVERIFY(w->close());  // mid-run
        }
        // Destroying without close() (a crash path in tests, the app's exit) joins the thread too.
        auto w = makeWindow(QStringLiteral("time"));
        QVERIFY(w);
        w->runNow();
        w.reset();
    }

    void shortcutSheetListsEveryShortcut() {
        auto w = makeWindow();
        QVERIFY(w);
        QList<QPair<QString, QString>> extra{{QStringLiteral("Esc"), QStringLiteral("release")}};
        ShortcutSheet sheet(w->actions(), extra, w.get());
        auto* table = sheet.findChild<QTableWidget*>();
        QVERIFY(table);
        int with_keys = 0;
        for (QAction* a : w->actions()) with_keys += a->shortcuts().isEmpty() ? 0 : 1;
        QCOMPARE(table->rowCount(), with_keys + 1);
        QVERIFY(with_keys >= 12);
        const QByteArray dump = qgetenv("MODSCOPE_VIEWS_DUMP");
        if (!dump.isEmpty()) {
            sheet.show();
            sheet.grab().save(QString::fromLocal8Bit(dump) + QStringLiteral("/shortcuts.png"));
        }
    }

    // The window fits a 1366x768 laptop screen less a panel, before and after a generation's status has
    // been shown; made narrow and then wide again, the side column gets back the room its tables need.
    void theWindowFitsALaptopScreenAndANarrowLayoutDoesNotStick() {
        auto w = makeWindow(QStringLiteral("the river said unto them"));
        QVERIFY(w);
        const auto fits = [&] {
            const QSize min = w->layout()->minimumSize();
            return min.width() <= 1366 && min.height() <= 768 - 48;
        };
        QVERIFY2(fits(), qPrintable(QStringLiteral("minimum %1x%2").arg(w->layout()->minimumSize().width())
                                        .arg(w->layout()->minimumSize().height())));
        w->generationControls()->setStatus(
            QStringLiteral("32 / 32 tokens · 18.4 ms/token · predictor 98% right on generated tokens, and more words"));
        QVERIFY2(fits(), qPrintable(QStringLiteral("after a status: %1 wide").arg(w->layout()->minimumSize().width())));

        auto* side = w->findChild<QDockWidget*>(QStringLiteral("capacity-dock"));
        auto* predictor = w->findChild<QDockWidget*>(QStringLiteral("predictor-dock"));
        QVERIFY(side && predictor);
        w->resize(w->layout()->minimumSize().expandedTo(QSize(900, 640)));
        apptest::settleLayout();
        QVERIFY(!w->generationControls()->isOneLine() || w->generationControls()->width() >= 600);
        w->resize(1600, 1000);
        QTRY_VERIFY_WITH_TIMEOUT(side->width() >= predictor->sizeHint().width(), kTimeoutMs);
        QVERIFY(w->generationControls()->isOneLine());

        // Pinned on a laptop screen: the window still fits, and both heatmaps keep room for their rows.
        w->resize(1366, 720);
        apptest::settleLayout();
        w->pinRun();
        apptest::settleLayout();  // the window shrinks back from a queued call
        QVERIFY2(fits(), qPrintable(QStringLiteral("pinned: minimum %1x%2").arg(w->layout()->minimumSize().width())
                                        .arg(w->layout()->minimumSize().height())));
        QCOMPARE(w->height(), 720);
        QVERIFY(w->pinnedHeatmap()->isCompact());
        auto* compare = w->findChild<QDockWidget*>(QStringLiteral("compare-dock"));
        QVERIFY(compare && compare->isVisible() && !compare->visibleRegion().isEmpty());
        for (RoutingHeatmap* h : {w->heatmap(), w->pinnedHeatmap()}) {
            const int row = h->axisRect()->height() / std::max(1, h->rowCount());
            QVERIFY2(row >= 8, qPrintable(QStringLiteral("%1: %2 px a row").arg(h->objectName()).arg(row)));
        }
        w->unpin();
        apptest::settleLayout();
        QVERIFY(!compare->isVisible());
        QVERIFY(w->findChild<QDockWidget*>(QStringLiteral("depth-dock"))->isVisible());
    }

    // Pinning gives the compare dock room without taking the heatmap's rows; unpinning puts the window and
    // the live view's zoom back as they were.
    void unpinRestoresTheLayoutAndTheZoom() {
        auto w = makeWindow(QStringLiteral("the river said unto them, fire and water, and the house of light"));
        QVERIFY(w);
        apptest::settleLayout();
        const QRect heat_before = w->heatmap()->geometry();
        w->heatmap()->xAxis->setRange(2.5, 9.5);
        w->pinRun();
        apptest::settleLayout();
        auto* compare = w->findChild<QDockWidget*>(QStringLiteral("compare-dock"));
        QVERIFY(compare && compare->isVisible());
        QCOMPARE(w->size(), QSize(1400, 900));  // the room comes from inside the window
        QCOMPARE(w->heatmap()->xAxis->range().lower, 2.5);  // pinning keeps the live view where it looks
        QVERIFY2(w->heatmap()->height() >= 200, qPrintable(QString::number(w->heatmap()->height())));
        w->unpin();
        apptest::settleLayout();
        QVERIFY(!compare->isVisible());
        QCOMPARE(w->heatmap()->geometry(), heat_before);
        QCOMPARE(w->heatmap()->xAxis->range().lower, 2.5);
        QCOMPARE(w->heatmap()->xAxis->range().upper, 9.5);
    }

    void layoutAndSettingsAreRestoredOnTheNextStart() {
        QTemporaryDir conf;
        QSettings settings(conf.filePath(QStringLiteral("modscope.ini")), QSettings::IniFormat);
        {
            auto w = makeWindow(QStringLiteral("remember me"), &settings);
            QVERIFY(w);
            auto* dock = w->findChild<QDockWidget*>(QStringLiteral("depth-dock"));
            QVERIFY(dock);
            dock->hide();
            w->setRoutingMode(RoutingMode::Causal);
            QVERIFY(waitForRun(*w));
            QVERIFY(w->close());
        }
        QVERIFY(settings.value(QStringLiteral("model/recent")).toStringList().contains(QFileInfo(model_dir_).absoluteFilePath()));
        QCOMPARE(settings.value(QStringLiteral("prompt/text")).toString(), QStringLiteral("remember me"));
        {
            auto w = makeWindow(QStringLiteral("again"), &settings);
            QVERIFY(w);
            QVERIFY(!w->findChild<QDockWidget*>(QStringLiteral("depth-dock"))->isVisible());
            QVERIFY(w->routingControls()->mode() == RoutingMode::Causal);
            QVERIFY(w->snapshot()->trace.mode == RoutingMode::Causal);
            // The capacity is kept for the model it was chosen on, and so are the layers' own.
            w->setCapacity(0.3);
            QVERIFY(waitForRun(*w));
            w->routingControls()->setLayerCapacities({-1.0, 0.75});
            QVERIFY(waitForRun(*w));
            w->setColorScale({HeatmapColorScale::Mode::Fixed, -2.0, 6.0});
            QVERIFY(w->close());
        }
        {
            auto w = makeWindow(QStringLiteral("and again"), &settings);
            QVERIFY(w);
            QCOMPARE(w->routingControls()->capacity(), 0.3);
            QCOMPARE(w->routingControls()->layerCapacities(), (std::vector<double>{-1.0, 0.75}));
            QCOMPARE(w->snapshot()->trace.layers[1].capacity, 0.75);
            QVERIFY(w->colorScale() == (HeatmapColorScale{HeatmapColorScale::Mode::Fixed, -2.0, 6.0}));
            QCOMPARE(w->heatmap()->colorMap()->dataRange(), QCPRange(-2.0, 6.0));
            // Options from the command line hold for that start only; what the user changes is kept.
            w->setTheme(ThemeChoice::Dark);
            w->setCapacity(0.5);
            w->keepOutOfSettings({QStringLiteral("view/theme"), QStringLiteral("routing/capacity")});
            w->setRoutingMode(RoutingMode::TopK);
            w->routingControls()->setLayerCapacities({-1.0, -1.0, -1.0, 0.0625});  // kept though the capacity is not
            QVERIFY(w->close());
        }
        QCOMPARE(settings.value(QStringLiteral("routing/layer_capacity")).toString(), QStringLiteral("3:0.0625"));
        QCOMPARE(settings.value(QStringLiteral("view/theme")).toString(), QStringLiteral("system"));
        QCOMPARE(settings.value(QStringLiteral("routing/capacity")).toDouble(), 0.3);
        QCOMPARE(settings.value(QStringLiteral("routing/mode")).toString(), QStringLiteral("topk"));
    }
};

MODSCOPE_APP_TEST_MAIN(AppMainWindowTest)
#include "app_main_window_test.moc"
