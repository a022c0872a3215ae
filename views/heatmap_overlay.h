// HeatmapOverlay: what the routing heatmap paints on top of its colour map, for the visible cells only.
//
// One QCPLayerable instead of QCP items: row separators, the locked selection, the boundary of generated
// tokens, and (when cells are wide enough to see them) corner marks on tokens where the causal predictor
// and top-k disagree. Cost is bounded by what fits on screen, not by tokens x layers.
#pragma once

#include <QString>

#include <qcustomplot.h>

#include "plot_theme.h"
#include "routing_snapshot.h"

namespace modscope {

class HeatmapOverlay : public QCPLayerable {
public:
    HeatmapOverlay(QCustomPlot* plot, QCPAxisRect* rect);

    void setSnapshot(SnapshotPtr snapshot) { snapshot_ = std::move(snapshot); }
    void setTheme(const PlotTheme& theme) { theme_ = theme; }
    void setSelection(int layer, int token) { sel_layer_ = layer, sel_token_ = token; }
    void setHover(int layer, int token) { hover_layer_ = layer, hover_token_ = token; }
    void setStale(bool stale) { stale_ = stale; }
    void setPlaceholder(const QString& text) { placeholder_ = text; }
    const QString& placeholder() const { return placeholder_; }
    void setShowDisagreement(bool show) { show_disagreement_ = show; }
    // The hover and the locked cell: drawn on screen, left out of exported figures.
    void setCursorShown(bool shown) { cursor_shown_ = shown; }

    // Below this cell width (pixels) per-cell marks are not drawn: they would be noise.
    static constexpr double kMinMarkCellWidth = 7.0;

protected:
    void applyDefaultAntialiasingHint(QCPPainter* painter) const override;
    QRect clipRect() const override;
    void draw(QCPPainter* painter) override;

private:
    QRectF cellRect(int token, int layer) const;

    QCPAxisRect* rect_;
    SnapshotPtr snapshot_;
    PlotTheme theme_;
    int sel_layer_ = -1, sel_token_ = -1;
    int hover_layer_ = -1, hover_token_ = -1;
    bool stale_ = false;
    bool show_disagreement_ = true;
    bool cursor_shown_ = true;
    QString placeholder_;
};

}  // namespace modscope
