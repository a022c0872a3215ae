// RoutingDiffView: the cells whose processed/skipped decision differs between the live run and a pinned
// one, as a four-colour map with its legend and a one-line count.
#pragma once

#include <QWidget>

#include "plot_theme.h"
#include "routing_diff.h"
#include "routing_snapshot.h"

class QCPColorMap;
class QCustomPlot;
class QLabel;

namespace modscope {

class RoutingDiffView : public QWidget {
    Q_OBJECT
public:
    explicit RoutingDiffView(QWidget* parent = nullptr);

    // Either may be null (nothing pinned yet, or no run): the view then says what is missing.
    void setSnapshots(SnapshotPtr live, SnapshotPtr pinned);
    void setTheme(const PlotTheme& theme);

    const RoutingDiff& diff() const { return diff_; }
    // "N of M routed cells differ; live processes X, pinned Y", and what was left out of the comparison.
    QString summaryText() const;
    QCustomPlot* plot() const { return plot_; }
    QCPColorMap* colorMap() const { return map_; }

private:
    void refill();
    void updateLegend();

    SnapshotPtr live_, pinned_;
    RoutingDiff diff_;
    PlotTheme theme_;
    QLabel* summary_ = nullptr;
    QCustomPlot* plot_ = nullptr;
    QCPColorMap* map_ = nullptr;
    QLabel* legend_ = nullptr;
};

}  // namespace modscope
