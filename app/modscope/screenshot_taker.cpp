#include "screenshot_taker.h"

#include <QApplication>
#include <QImage>

#include <cstdio>

#include "engine_session.h"
#include "figure_export.h"
#include "main_window.h"
#include "generation_controls.h"
#include "message_banner.h"

namespace modscope {

ScreenshotTaker::ScreenshotTaker(MainWindow* window, const QString& path, int generate, int timeout_ms)
    : QObject(window), window_(window), path_(path), generate_(generate) {
    // Settling time: queued replots and the dock layout finish before the window is rendered.
    settle_.setSingleShot(true);
    settle_.setInterval(250);
    connect(&settle_, &QTimer::timeout, this, &ScreenshotTaker::capture);
    timeout_.setSingleShot(true);
    timeout_.setInterval(timeout_ms);
    connect(&timeout_, &QTimer::timeout, this, [this] {
        std::fprintf(stderr, "modscope: --screenshot timed out waiting for the run; capturing as it is\n");
        exit_code_ = 1;
        capture();
    });
    connect(window_, &MainWindow::runApplied, this, [this] {
        if (window_->isStale()) return;
        if (generate_ > 0 && !generated_) {
            generated_ = true;
            window_->generate(generate_);
            return;
        }
        scheduleCapture(0);
    });
    // The generation's view stays on screen when it ends (no run follows it): capture it then.
    connect(window_, &MainWindow::generationDone, this, [this](const GenerationSummary& summary) {
        if (summary.generated == 0) std::fprintf(stderr, "modscope: nothing was generated\n");
        scheduleCapture(summary.generated == 0 ? 1 : 0);
    });
    connect(window_, &MainWindow::modelLoadFailed, this, [this](const QString& message) {
        std::fprintf(stderr, "modscope: %s\n", qPrintable(message));
        if (!window_->model()) scheduleCapture(1);
    });
}

void ScreenshotTaker::start() {
    timeout_.start();
    if (!window_->model() && !window_->session()->isLoading()) {
        std::fprintf(stderr, "modscope: no model: %s\n", qPrintable(window_->banner()->text()));
        scheduleCapture(1);
    }
}

void ScreenshotTaker::scheduleCapture(int exit_code) {
    exit_code_ = std::max(exit_code_, exit_code);
    settle_.start();
}

void ScreenshotTaker::capture() {
    // A late run (an edit still debounced) or a generation still streaming would change the picture: wait
    // for it, unless the time is up.
    const bool busy = window_->isStale() || window_->generationControls()->isRunning() ||
                      (!window_->generationControls()->isRunning() && !window_->resultsComplete() && !generated_);
    if (busy && timeout_.isActive()) {
        settle_.start();
        return;
    }
    settle_.stop();
    timeout_.stop();
    const QImage image = window_->grab().toImage();
    const QString error = saveImageAtomically(image, path_);
    if (!error.isEmpty()) {
        std::fprintf(stderr, "modscope: %s\n", qPrintable(error));
        QApplication::exit(1);
        return;
    }
    std::printf("modscope: wrote %s (%dx%d)\n", qPrintable(path_), image.width(), image.height());
    QApplication::exit(exit_code_);
}

}  // namespace modscope
