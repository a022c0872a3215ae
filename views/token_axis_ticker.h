// TokenAxisTicker: labels an integer axis (tokens, layers) with its own strings, only for the ticks in the
// visible range and only every step-th one, so a 2,048-token axis costs as many labels as fit on screen.
#pragma once

#include <QString>
#include <QVector>

#include <qcustomplot.h>

namespace modscope {

class TokenAxisTicker : public QCPAxisTicker {
public:
    void setLabels(QVector<QString> labels) {
        labels_ = std::move(labels);
        labelled_step_ = 0;
    }
    const QVector<QString>& labels() const { return labels_; }
    // Label every step-th index (>= 1). The owner picks it from the pixels one index gets on screen.
    void setStep(int step) { step_ = step < 1 ? 1 : step; }
    int step() const { return step_; }
    // Which indices a thinned axis labels: those equal to offset modulo the step (0 by default).
    void setOffset(int offset) { offset_ = offset < 0 ? 0 : offset; }
    int offset() const { return offset_ % step_; }
    // With priorities (one per label), a thinned axis labels the indices of highest priority first, each at
    // least step indices from the next, instead of every step-th: the tokens that the most layers
    // processed keep their labels. Empty: every step-th index.
    void setPriorities(QVector<int> priorities);
    // The indices a thinned axis labels over the whole axis, ascending (what createTickVector draws from).
    const QVector<int>& labelled();

    // The smallest step from 1, 2, 5, 10, 20, 50, ... that leaves min_pixels between labels; a fixed set
    // of steps keeps labels from jumping between neighbours while zooming.
    static int stepFor(double pixels_per_index, double min_pixels);

protected:
    double getTickStep(const QCPRange& range) override { return step_; }
    int getSubTickCount(double tick_step) override { return 0; }
    QString getTickLabel(double tick, const QLocale& locale, QChar format_char, int precision) override;
    QVector<double> createTickVector(double tick_step, const QCPRange& range) override;

private:
    QVector<QString> labels_;
    QVector<int> priorities_;
    QVector<int> labelled_;   // for priorities_ at labelled_step_
    int labelled_step_ = 0;   // 0: labelled_ is stale
    int step_ = 1;
    int offset_ = 0;
};

// The axes of a bar chart of token counts per layer (the capacity and expert-load charts): layers along x,
// labelled by layers, with no sub-ticks or grid; whole token counts up y ("tokens"), a few ticks only: a
// laptop screen leaves such a chart some 60 px.
void useLayerCountAxes(QCustomPlot* plot, const QSharedPointer<TokenAxisTicker>& layers);

}  // namespace modscope
