// ScreenshotTaker: --screenshot. Waits until the window shows the prompt's run (or a load error), renders
// the whole window to a PNG and quits with 0 (written, run shown) or 1 (failed, or an error shown).
#pragma once

#include <QObject>
#include <QString>
#include <QTimer>

namespace modscope {

class MainWindow;

class ScreenshotTaker : public QObject {
    Q_OBJECT
public:
    // generate > 0: once the prompt's run is shown, generate that many tokens and capture after them.
    ScreenshotTaker(MainWindow* window, const QString& path, int generate = 0, int timeout_ms = 120000);

    // Call after the model was asked for: a window with no model and no load under way is final already.
    void start();

private:
    void scheduleCapture(int exit_code);
    void capture();

    MainWindow* window_;
    QString path_;
    QTimer settle_;
    QTimer timeout_;
    int exit_code_ = 0;
    int generate_ = 0;
    bool generated_ = false;
};

}  // namespace modscope
