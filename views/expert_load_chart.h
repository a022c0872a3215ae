// ExpertLoadChart: per mixture layer, the tokens each expert ran against the capacity every expert had
// (docs/MODEL.md "Mixture layers"), with the overflow and the no-op choices over all mixture layers in its
// title and each layer's in the tooltip.
#pragma once

#include <QVector>
#include <QWidget>

#include "plot_theme.h"
#include "routing_snapshot.h"

class QCustomPlot;
class QCPBars;
class QCPBarsGroup;
class QCPTextElement;

namespace modscope {

class TokenAxisTicker;

class ExpertLoadChart : public QWidget {
    Q_OBJECT
public:
    explicit ExpertLoadChart(QWidget* parent = nullptr);

    // Hidden while the snapshot has no mixture layer.
    void setSnapshot(SnapshotPtr snapshot);
    void setTheme(const PlotTheme& theme);

    QCustomPlot* plot() const { return plot_; }
    QString subtitle() const;
    // The load bars as drawn: [expert][mixture layer in order] (for tests).
    QVector<QVector<double>> loads() const;

protected:
    bool eventFilter(QObject* watched, QEvent* event) override;

private:
    void rebuildBars(int experts);

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    QCustomPlot* plot_;
    QCPTextElement* subtitle_;
    QCPBars* capacity_;
    QCPBarsGroup* group_;
    QVector<QCPBars*> experts_;
    QVector<int> layers_;  // the mixture layers, in the order of the bars
    QSharedPointer<TokenAxisTicker> ticker_;
};

}  // namespace modscope
