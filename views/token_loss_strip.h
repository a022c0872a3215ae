// TokenLossStrip: each position's loss of the next token as bars, column for column above the heatmap
// (docs/MODEL.md "Interventions").
//
// What a bar shows follows what the run has: with overrides, the change they made to each position's loss
// (against the same run without them); else, with a reference model, the routed model's loss minus the
// reference's; else the loss itself. Hovering a bar gives the loss, the token that came next and the model's
// five most probable next tokens there.
#pragma once

#include <QPoint>

#include <qcustomplot.h>

#include "plot_theme.h"
#include "routing_snapshot.h"

namespace modscope {

class TokenLossStrip : public QCustomPlot {
    Q_OBJECT
public:
    enum class Shows { Nothing, Loss, AgainstReference, AgainstBaseline };

    explicit TokenLossStrip(QWidget* parent = nullptr);
    QSize sizeHint() const override;

    void setSnapshot(SnapshotPtr snapshot);
    void setTheme(const PlotTheme& theme);
    // The heatmap's columns: its token range and its cells' left and right edges in this widget's x.
    void alignColumns(const QCPRange& tokens, int left, int right);

    Shows shows() const { return shows_; }
    // The strip's heading: what the bars are, with the totals ("Δ loss from overrides: +0.84 nats …").
    QString heading() const;
    // The value of position t's bar (NaN where there is none) and what hovering it shows.
    double barValue(int token) const;
    QString tokenSummary(int token) const;
    int tokenAt(const QPoint& pos) const;  // -1 outside the bars

Q_SIGNALS:
    void tokenHovered(int token);

protected:
    void mouseMoveEvent(QMouseEvent* event) override;
    void leaveEvent(QEvent* event) override;

private:
    void rebuild();

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    Shows shows_ = Shows::Nothing;
    QCPBars* up_ = nullptr;    // loss, or a loss that rose
    QCPBars* down_ = nullptr;  // a loss that fell
    QCPItemText* heading_ = nullptr;
};

}  // namespace modscope
