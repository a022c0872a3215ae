// Replaying a saved trace without its model, and comparing a pinned run with the live one: a trace
// exported from the window reads back into the same view, read-only; a broken file changes nothing; a
// pinned run's diff counts exactly the routed cells whose decision changed, and zoom follows across views.
#include <QAction>
#include <QApplication>
#include <QDropEvent>
#include <QDockWidget>
#include <QFile>
#include <QLabel>
#include <QMimeData>
#include <QUrl>
#include <QPlainTextEdit>
#include <QSignalSpy>
#include <QSlider>
#include <QTemporaryDir>
#include <QMessageBox>
#include <QTest>

#include "app_fixture.h"
#include "app_window_fixture.h"
#include "bad_files.h"
#include "command_line.h"
#include "engine_session.h"
#include "generation_controls.h"
#include "main_window.h"
#include "message_banner.h"
#include "modscope/trace_io.h"
#include "prompt_editor.h"
#include "qcustomplot.h"
#include "routing_controls.h"
#include "routing_diff_view.h"
#include "routing_heatmap.h"

using namespace modscope;

namespace {

constexpr int kTimeoutMs = 20000;

const char* kLongPrompt =
    "the model of the river said that every token is a fortune cookie and the light of the house is time";

// Counted here from the two runs' own decisions, independently of RoutingDiff.
struct Changed {
    std::int64_t routed = 0, differing = 0;
};
Changed changedCells(const RoutingSnapshot& a, const RoutingSnapshot& b) {
    Changed c;
    const int T = std::min(a.tokens(), b.tokens()), L = std::min(a.layers(), b.layers());
    for (int l = 0; l < L; ++l) {
        if (!a.trace.layers[l].routed && !b.trace.layers[l].routed) continue;
        for (int t = 0; t < T; ++t) {
            ++c.routed;
            if (bool(a.trace.layers[l].selected[t]) != bool(b.trace.layers[l].selected[t])) ++c.differing;
        }
    }
    return c;
}

}  // namespace

class AppTraceReplayTest : public QObject {
    Q_OBJECT

private:
    QTemporaryDir dir_;
    QString model_dir_;

    std::unique_ptr<MainWindow> makeWindow(const QString& prompt) {
        return apptest::openFixtureWindow(model_dir_, prompt, kTimeoutMs);
    }

    static bool waitForRun(MainWindow& w) { return apptest::waitForLiveRun(w, kTimeoutMs); }

    static bool exportTo(MainWindow& w, const QString& path) {
        QSignalSpy done(&w, &MainWindow::exportFinished);
        w.exportTrace(path);
        return done.wait(kTimeoutMs) && done.first().at(1).toString().isEmpty();
    }

    static bool controlsLive(MainWindow& w) {
        return w.routingControls()->isEnabled() && !w.promptEditor()->editor()->isReadOnly() &&
               w.generationControls()->isEnabled();
    }
    static bool controlsLocked(MainWindow& w) {
        return !w.routingControls()->isEnabled() && w.promptEditor()->editor()->isReadOnly() &&
               !w.generationControls()->isEnabled();
    }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(dir_.isValid());
        model_dir_ = dir_.filePath(QStringLiteral("model"));
        apptest::writeFixtureModel(model_dir_.toStdString());
    }

    void anExportedTraceReplaysAsTheLiveRunReadOnly() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        w->selectCell(1, 5);
        const SnapshotPtr live = w->snapshot();
        QVERIFY(live && !live->empty());
        const QString path = dir_.filePath(QStringLiteral("live.json"));
        QVERIFY(exportTo(*w, path));
        const int rows = w->heatmap()->rowCount(), cols = w->heatmap()->columnCount();
        const QString live_title = w->windowTitle();

        QVERIFY(w->openTrace(path));
        QVERIFY(w->isReplaying());
        QVERIFY(w->snapshot() != live);
        QCOMPARE(w->heatmap()->rowCount(), rows);
        QCOMPARE(w->heatmap()->columnCount(), cols);
        QCOMPARE(w->heatmap()->selectedLayer(), 1);
        QCOMPARE(w->heatmap()->selectedToken(), 5);
        const auto& replayed = *w->snapshot();
        QCOMPARE(replayed.tokens(), live->tokens());
        QCOMPARE(replayed.layers(), live->layers());
        for (int l = 0; l < live->layers(); ++l) {
            QCOMPARE(replayed.trace.layers[l].selected, live->trace.layers[l].selected);
            QCOMPARE(replayed.trace.layers[l].routed, live->trace.layers[l].routed);
        }
        QCOMPARE(replayed.pieces, live->pieces);
        QCOMPARE(replayed.depth, live->depth);

        // Clearly read-only, and saying so.
        QVERIFY(controlsLocked(*w));
        QVERIFY(w->windowTitle().contains(QStringLiteral("Replaying")));
        QVERIFY(w->replayLabel()->isVisible());
        QVERIFY(w->replayLabel()->text().contains(QStringLiteral("live.json")));
        QVERIFY(w->replayLabel()->text().contains(QStringLiteral("app-fixture")));
        QVERIFY(w->replayLabel()->text().contains(QStringLiteral("read-only")));
        QCOMPARE(w->promptEditor()->text(), QString::fromStdString(replayed.prompt));

        w->returnToLive();
        QVERIFY(!w->isReplaying());
        QVERIFY(controlsLive(*w));
        QVERIFY(!w->replayLabel()->isVisible());
        QCOMPARE(w->snapshot(), live);
        QCOMPARE(w->windowTitle(), live_title);
        QCOMPARE(w->promptEditor()->text(), QString::fromLatin1(kLongPrompt));
    }

    void aBrokenTraceShowsAnErrorAndChangesNothing() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        const QString good = dir_.filePath(QStringLiteral("good.json"));
        QVERIFY(exportTo(*w, good));
        QFile in(good);
        QVERIFY(in.open(QIODevice::ReadOnly));
        QByteArray text = in.readAll();
        in.close();
        QVERIFY(text.contains("modscope.trace/4"));
        text.replace("modscope.trace/4", "modscope.trace/9");
        const QString broken = dir_.filePath(QStringLiteral("broken.json"));
        QFile out(broken);
        QVERIFY(out.open(QIODevice::WriteOnly));
        out.write(text);
        out.close();

        const SnapshotPtr before = w->snapshot();
        QVERIFY(!w->openTrace(broken));
        QCOMPARE(w->banner()->kind(), MessageBanner::Kind::Error);
        QVERIFY(w->banner()->text().contains(QStringLiteral("broken.json")));
        QVERIFY(w->banner()->text().contains(QStringLiteral("schema")));
        QVERIFY(!w->isReplaying());
        QCOMPARE(w->snapshot(), before);
        QVERIFY(controlsLive(*w));

        // While replaying, a broken file leaves the replay as it was.
        QVERIFY(w->openTrace(good));
        const SnapshotPtr replayed = w->snapshot();
        QVERIFY(!w->openTrace(dir_.filePath(QStringLiteral("missing.json"))));
        QVERIFY(w->isReplaying());
        QCOMPARE(w->snapshot(), replayed);
        QVERIFY(controlsLocked(*w));
    }

    // The bad traces of tests/bad_files.cpp: each refused with the reader's reason in the banner,
    // and the live view and its controls untouched.
    void eachBadTraceIsRefusedAndChangesNothing() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        const QString good = dir_.filePath(QStringLiteral("good-for-bad.json"));
        QVERIFY(exportTo(*w, good));
        QTemporaryDir parent;
        const auto bad = badfiles::makeBadTraces(badfiles::readFile(good.toStdString()), parent.path().toStdString());
        QVERIFY(bad.size() >= 10);
        const SnapshotPtr before = w->snapshot();
        for (const auto& b : bad) {
            QVERIFY2(!w->openTrace(QString::fromStdString(b.path)), b.name.c_str());
            QCOMPARE(w->banner()->kind(), MessageBanner::Kind::Error);
            const QString text = w->banner()->text();
            QVERIFY2(text.contains(QString::fromStdString(b.expected)) &&
                         text.contains(QFileInfo(QString::fromStdString(b.path)).fileName()),
                     qPrintable(QString::fromStdString(b.name) + ": " + text));
            QVERIFY2(w->refusalDialog() && w->refusalDialog()->isVisible(), b.name.c_str());
            QVERIFY2(w->refusalDialog()->text().contains(QString::fromStdString(b.expected)), b.name.c_str());
            QVERIFY(!w->isReplaying());
            QCOMPARE(w->snapshot(), before);
            QVERIFY(controlsLive(*w));
        }
    }

    void aPinnedRunDiffsAgainstTheLiveOneAndZoomFollows() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        QVERIFY(!w->compareDock()->isVisible());
        w->routingControls()->slider()->setValue(125);  // 12.5 %
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->trace.capacity, 0.125);
        w->pinRun();
        const SnapshotPtr pinned = w->pinnedSnapshot();
        QCOMPARE(pinned, w->snapshot());
        QVERIFY(w->compareDock()->isVisible());
        QCOMPARE(w->pinnedHeatmap()->snapshot(), pinned);
        QCOMPARE(w->diffView()->diff().differing, std::int64_t(0));

        w->routingControls()->slider()->setValue(500);  // 50 %
        QVERIFY(waitForRun(*w));
        QCOMPARE(w->snapshot()->trace.capacity, 0.5);
        QCOMPARE(w->pinnedSnapshot(), pinned);  // frozen
        const Changed expected = changedCells(*w->snapshot(), *pinned);
        QVERIFY(expected.differing > 0);
        const auto& diff = w->diffView()->diff();
        QCOMPARE(diff.differing, expected.differing);
        QCOMPARE(diff.routed_cells, expected.routed);
        QVERIFY(w->diffView()->summaryText().startsWith(
            QStringLiteral("%1 of %2 routed cells differ").arg(expected.differing).arg(expected.routed)));

        // Zoom and pan are linked both ways.
        w->heatmap()->xAxis->setRange(2.5, 9.5);
        QCOMPARE(w->pinnedHeatmap()->xAxis->range().lower, 2.5);
        QCOMPARE(w->pinnedHeatmap()->xAxis->range().upper, 9.5);
        QCOMPARE(w->diffView()->plot()->xAxis->range().lower, 2.5);
        w->pinnedHeatmap()->xAxis->setRange(4.5, 12.5);
        QCOMPARE(w->heatmap()->xAxis->range().lower, 4.5);
        QCOMPARE(w->heatmap()->xAxis->range().upper, 12.5);

        // A shorter live prompt compares the common prefix, and says so.
        w->setPrompt(QStringLiteral("the model of the river"));
        QVERIFY(waitForRun(*w));
        const int T = w->snapshot()->tokens();
        QVERIFY(T < pinned->tokens());
        QCOMPARE(w->diffView()->diff().tokens, T);
        QCOMPARE(w->diffView()->diff().differing, changedCells(*w->snapshot(), *pinned).differing);
        QVERIFY(w->diffView()->summaryText().contains(QStringLiteral("first %1 positions").arg(T)));

        w->unpin();
        QVERIFY(!w->pinnedSnapshot());
        QVERIFY(!w->compareDock()->isVisible());
    }

    void droppingATraceFileReplaysIt() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        const QString path = dir_.filePath(QStringLiteral("dropped.json"));
        QVERIFY(exportTo(*w, path));
        QMimeData mime;
        mime.setUrls({QUrl::fromLocalFile(path)});
        QDragEnterEvent enter(QPoint(200, 200), Qt::CopyAction, &mime, Qt::LeftButton, Qt::NoModifier);
        QApplication::sendEvent(w.get(), &enter);
        QVERIFY(enter.isAccepted());
        QDropEvent drop(QPointF(200, 200), Qt::CopyAction, &mime, Qt::LeftButton, Qt::NoModifier);
        QApplication::sendEvent(w.get(), &drop);
        QVERIFY2(w->isReplaying(), qPrintable(w->banner()->text() + QStringLiteral(" accepted=%1").arg(drop.isAccepted())));
        QVERIFY(w->replayLabel()->text().contains(QStringLiteral("dropped.json")));
    }

    void runsOfDifferentSizesCompareWhatTheyShare() {
        // Hand-made runs: 4 layers x 5 tokens live, 6 layers x 3 tokens pinned; layer 1 routed in both,
        // layer 2 routed only in the pinned run (still compared), layer 0 full in both (not compared).
        auto run = [](int layers, int tokens, std::vector<int> routed, std::uint8_t pattern) {
            auto s = std::make_shared<RoutingSnapshot>();
            s->trace.token_ids.assign(tokens, 1);
            for (int l = 0; l < layers; ++l) {
                LayerTrace layer;
                layer.index = l;
                layer.routed = std::find(routed.begin(), routed.end(), l) != routed.end();
                for (int t = 0; t < tokens; ++t)
                    layer.selected.push_back(layer.routed ? std::uint8_t((pattern >> (t % 8)) & 1) : 1);
                s->trace.layers.push_back(layer);
            }
            return SnapshotPtr(s);
        };
        const SnapshotPtr live = run(4, 5, {1, 3}, 0b10101);
        const SnapshotPtr pinned = run(6, 3, {1, 2, 3}, 0b00110);
        RoutingDiffView view;
        view.setSnapshots(live, pinned);
        const RoutingDiff& d = view.diff();
        QCOMPARE(d.tokens, 3);
        QCOMPARE(d.layers, 4);
        QCOMPARE(d.routed_cells, std::int64_t(9));  // layers 1, 2, 3 x 3 positions
        QCOMPARE(d.at(0, 0), RoutingDiff::kFull);
        // Layers 1 and 3: live 1,0,1 against pinned 0,1,1; layer 2: live full (1,1,1) against 0,1,1.
        QCOMPARE(d.differing, std::int64_t(2 + 1 + 2));
        QCOMPARE(d.at(1, 0), RoutingDiff::kLiveOnly);
        QCOMPARE(d.at(1, 1), RoutingDiff::kPinnedOnly);
        QCOMPARE(d.at(1, 2), RoutingDiff::kBoth);
        QCOMPARE(d.live_processed, std::int64_t(2 + 3 + 2));
        QCOMPARE(d.pinned_processed, std::int64_t(6));
        const QString summary = view.summaryText();
        QVERIFY(summary.startsWith(QStringLiteral("5 of 9 routed cells differ; live processes 7, pinned 6")));
        QVERIFY(summary.contains(QStringLiteral("first 3 positions only (live 5 tokens, pinned 3)")));
        QVERIFY(summary.contains(QStringLiteral("first 4 layers only (live 4, pinned 6)")));
    }

    void theCommandLineTakesATraceAndAPinCapacity() {
        CommandLineOptions o;
        QCOMPARE(parseCommandLine({QStringLiteral("modscope"), QStringLiteral("--trace"), QStringLiteral("t.json"),
                                   QStringLiteral("--pin-capacity"), QStringLiteral("12.5%")},
                                  &o),
                 QString());
        QCOMPARE(o.trace, QStringLiteral("t.json"));
        QVERIFY(o.pin_capacity.has_value());
        QCOMPARE(*o.pin_capacity, 0.125);
        CommandLineOptions bad;
        QVERIFY(!parseCommandLine({QStringLiteral("modscope"), QStringLiteral("--pin-capacity"), QStringLiteral("2")}, &bad)
                     .isEmpty());
    }

    void aReplayedTraceCanBePinnedAgainstTheLiveRun() {
        auto w = makeWindow(QString::fromLatin1(kLongPrompt));
        QVERIFY(w);
        w->routingControls()->slider()->setValue(1000);  // everything processed
        QVERIFY(waitForRun(*w));
        const QString path = dir_.filePath(QStringLiteral("full.json"));
        QVERIFY(exportTo(*w, path));
        QVERIFY(w->openTrace(path));
        w->pinRun();
        w->returnToLive();
        w->routingControls()->slider()->setValue(250);
        QVERIFY(waitForRun(*w));
        const Changed expected = changedCells(*w->snapshot(), *w->pinnedSnapshot());
        QCOMPARE(w->diffView()->diff().differing, expected.differing);
        QCOMPARE(w->diffView()->diff().pinned_processed, expected.routed);
    }
};

MODSCOPE_APP_TEST_MAIN(AppTraceReplayTest)
#include "app_trace_replay_test.moc"
