// CellDetailsPanel: the locked heatmap cell in full. Every layer's view of that token (logit, gate, update, rank,
// threshold, predictor probability, decision), with the locked layer highlighted.
#pragma once

#include <QWidget>

#include "plot_theme.h"
#include "routing_snapshot.h"

class QLabel;
class QTableWidget;

namespace modscope {

class CellDetailsPanel : public QWidget {
    Q_OBJECT
public:
    explicit CellDetailsPanel(QWidget* parent = nullptr);

    void setSnapshot(SnapshotPtr snapshot);
    void setCell(int layer, int token);  // token -1: nothing locked
    void setTheme(const PlotTheme& theme);
    int token() const { return token_; }
    int layer() const { return layer_; }
    QString headline() const;
    QTableWidget* table() const { return table_; }
    QString predictionsText() const;

private:
    void refresh();

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    int layer_ = -1, token_ = -1;
    QLabel* header_;
    QTableWidget* table_;
    QLabel* predictions_;  // the locked position's loss and top predictions, before and after the overrides
};

}  // namespace modscope
