// RatioMeter: one quantity against its dense-model reference, as a labelled bar ("FLOPs 38% of dense").
#pragma once

#include <QWidget>

#include "plot_theme.h"

namespace modscope {

class RatioMeter : public QWidget {
    Q_OBJECT
public:
    explicit RatioMeter(const QString& caption, QWidget* parent = nullptr);

    // fraction of the reference (may exceed 1); detail is the text after the bar ("12.3 of 40.1 GFLOPs").
    void setValue(double fraction, const QString& detail);
    void clear(const QString& detail = QString());
    void setTheme(const PlotTheme& theme);
    double fraction() const { return fraction_; }
    QString text() const;  // caption, percentage and detail, as read aloud / in tests

    QSize sizeHint() const override;
    QSize minimumSizeHint() const override;

protected:
    void paintEvent(QPaintEvent* event) override;

private:
    QString caption_;
    QString detail_;
    double fraction_ = -1.0;  // < 0: no value
    PlotTheme theme_;
};

}  // namespace modscope
