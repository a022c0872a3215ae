// PredictorPanel: how well each routed layer's causal predictor matches top-k, with confusion counts,
// for the latest run; during generation, its accuracy over the generated tokens as lines.
#pragma once

#include <QWidget>

#include "plot_theme.h"
#include "routing_snapshot.h"

class QCustomPlot;
class QCPItemText;
class QLabel;
class QTableWidget;

namespace modscope {

class PredictorPanel : public QWidget {
    Q_OBJECT
public:
    explicit PredictorPanel(QWidget* parent = nullptr);

    void setSnapshot(SnapshotPtr snapshot);
    // Generation: clear the lines, then one point per generated token.
    void startGeneration();
    void addGenerationPoint(const GenerationPoint& point);
    // The generation's curve no longer describes what is shown (the text, mode or capacity changed).
    void clearGeneration();
    void setTheme(const PlotTheme& theme);

    QTableWidget* table() const { return table_; }
    QCustomPlot* plot() const { return plot_; }
    QString summary() const;  // the header line
    int generationPoints() const { return points_; }

private:
    void ensureGraphs(const GenerationPoint& point);
    void fitTable();

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    QLabel* header_;
    QTableWidget* table_;
    QCustomPlot* plot_;
    QCPItemText* plot_hint_;
    int points_ = 0;
};

}  // namespace modscope
