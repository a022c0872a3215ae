// GenerationControls: how many tokens to sample and how (temperature, top-p, seed), Generate and Stop.
#pragma once

#include <QWidget>
#include <cstdint>

class QBoxLayout;
class QDoubleSpinBox;
class QLabel;
class QPushButton;
class QSpinBox;

namespace modscope {

struct GenerationSettings {
    int max_new_tokens = 32;
    double temperature = 0.8;
    double top_p = 0.95;
    std::uint64_t seed = 0;
};

class GenerationControls : public QWidget {
    Q_OBJECT
public:
    explicit GenerationControls(QWidget* parent = nullptr);

    GenerationSettings settings() const;
    void setSettings(const GenerationSettings& settings);
    void setRunning(bool running);
    bool isRunning() const { return running_; }
    void setStatus(const QString& text);
    QString status() const;
    QPushButton* generateButton() const { return generate_; }
    QPushButton* stopButton() const { return stop_; }
    bool isOneLine() const;  // settings and buttons side by side (else on two lines)

    QSize minimumSizeHint() const override;
    QSize sizeHint() const override;

Q_SIGNALS:
    void generateRequested(const modscope::GenerationSettings& settings);
    void stopRequested();

protected:
    void resizeEvent(QResizeEvent* event) override;

private:
    QSize oneLineMinimum() const;

    QBoxLayout* outer_;
    QWidget* settings_box_;
    QWidget* actions_box_;
    QSpinBox* tokens_;
    QDoubleSpinBox* temperature_;
    QDoubleSpinBox* top_p_;
    QSpinBox* seed_;
    QPushButton* generate_;
    QPushButton* stop_;
    QLabel* status_;
    bool running_ = false;
};

}  // namespace modscope
