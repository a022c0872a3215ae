// A MainWindow for the app's tests: shown, and with the fixture model loaded and its first run on screen.
#pragma once

#include <QCoreApplication>
#include <QSettings>
#include <QSignalSpy>
#include <QString>
#include <QTest>

#include <memory>

#include "engine_session.h"
#include "main_window.h"

namespace modscope::apptest {

// Until the views show the newest requested run (the live one, also while a trace is replayed), its losses
// (the run's second snapshot) included.
inline bool waitForLiveRun(MainWindow& w, int timeout_ms) {
    (void)QTest::qWaitFor(
        [&] {
            return !w.isStale() && w.liveSnapshot() && w.liveSnapshot()->job == w.session()->latestRunJob() &&
                   (w.isReplaying() ? w.liveSnapshot()->hasLosses() || w.liveSnapshot()->empty() : w.resultsComplete());
        },
        timeout_ms);
    return !w.isStale() && w.liveSnapshot() != nullptr;
}

// A shown 1400x900 window on the CPU with prompt typed and no model opened yet.
inline std::unique_ptr<MainWindow> showWindow(const QString& prompt, QSettings* settings = nullptr) {
    MainWindow::Options o;
    o.settings = settings;
    o.device = QStringLiteral("cpu");
    auto w = std::make_unique<MainWindow>(o);
    w->resize(1400, 900);
    w->show();
    w->setPrompt(prompt);
    return w;
}

// The same with model_dir loaded and prompt's run shown; null if the model did not load in time.
inline std::unique_ptr<MainWindow> openFixtureWindow(const QString& model_dir, const QString& prompt, int timeout_ms,
                                                     QSettings* settings = nullptr) {
    auto w = showWindow(prompt, settings);
    QSignalSpy loaded(w.get(), &MainWindow::modelChanged);
    w->openModel(model_dir);
    if (!loaded.wait(timeout_ms)) return nullptr;
    waitForLiveRun(*w, timeout_ms);
    return w;
}

// Applies what a resize, a dock shown or hidden, or a queued call left pending (posted layout requests, then
// the replots and calls they post in turn), without waiting on the clock.
inline void settleLayout() {
    for (int round = 0; round < 4; ++round) {
        QCoreApplication::sendPostedEvents();
        QCoreApplication::processEvents();
    }
}

}  // namespace modscope::apptest
