#include "paint_clock.h"

#include <QWidget>

namespace modscope::bench {

PaintClock::PaintClock(int& argc, char** argv) : QApplication(argc, argv) {}

void PaintClock::watch(QWidget* widget, std::function<void(double paint_ms)> on_painted) {
    widget_ = widget;
    on_painted_ = std::move(on_painted);
}

bool PaintClock::notify(QObject* receiver, QEvent* event) {
    const bool watched = event->type() == QEvent::Paint && receiver != nullptr && receiver == widget_.data();
    const auto t0 = std::chrono::steady_clock::now();
    const bool result = QApplication::notify(receiver, event);
    if (watched && on_painted_)
        on_painted_(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return result;
}

}  // namespace modscope::bench
