// PaintClock: the benchmark's QApplication, which timestamps the end of every paint event delivered to
// one watched widget.
//
// An event filter sees a paint event before the widget handles it; QApplication::notify wraps the whole
// delivery (filters and paintEvent), so the time after it returns is when the widget has been painted.
#pragma once

#include <QApplication>
#include <QPointer>
#include <chrono>
#include <functional>

namespace modscope::bench {

class PaintClock : public QApplication {
public:
    PaintClock(int& argc, char** argv);

    // Calls on_painted after each paint event the widget finishes, with how long its delivery took; null
    // stops watching.
    void watch(QWidget* widget, std::function<void(double paint_ms)> on_painted);
    bool notify(QObject* receiver, QEvent* event) override;

private:
    QPointer<QWidget> widget_;
    std::function<void(double paint_ms)> on_painted_;
};

}  // namespace modscope::bench
