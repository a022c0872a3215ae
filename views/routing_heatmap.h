// RoutingHeatmap: layers x tokens, coloured by router logit, with processed and skipped cells told apart.
//
// One QCPColorMap holds every cell (the logit picks the colour, a processed cell is opaque, a skipped one
// fades into the canvas), one HeatmapOverlay paints marks for the visible cells only, and one
// TokenAxisTicker labels only the visible tokens. Nothing is created per cell or per label, so 2,048
// tokens x 32 layers repaint like 20 x 6.
#pragma once

#include <QPoint>

#include <qcustomplot.h>

#include "heatmap_color_scale.h"
#include "plot_theme.h"
#include "routing_snapshot.h"

namespace modscope {

class HeatmapLegend;

// The routed layers that ran at a capacity of their own, as "L3 50%, L5 25%"; empty when none did.
QString ownLayerCapacities(const RunTrace& run);
class HeatmapOverlay;
class TokenAxisTicker;

class RoutingHeatmap : public QCustomPlot {
    Q_OBJECT
public:
    explicit RoutingHeatmap(QWidget* parent = nullptr);

    // Shows a run. The zoom is kept when the token count is unchanged or grew by streaming; a selection
    // is kept while its cell still exists. repaint_now paints before returning (the latency path: the
    // heatmap first, the other panels after); otherwise the repaint is queued.
    void setSnapshot(SnapshotPtr snapshot, bool repaint_now = false);
    const SnapshotPtr& snapshot() const { return snapshot_; }

    // Results belong to an older prompt than the one in the editor.
    void setStale(bool stale);
    bool isStale() const { return stale_; }
    void setTheme(const PlotTheme& theme);
    void setPlaceholder(const QString& text);
    QString placeholder() const;  // the text shown while there is no run

    // How logits map to colours (heatmap_color_scale.h). The companion is another run whose logits count
    // toward the range (the pinned run beside the live one, and the live run beside the pinned one).
    void setColorScale(const HeatmapColorScale& scale);
    const HeatmapColorScale& colorScale() const { return color_scale_; }
    void setScaleCompanion(SnapshotPtr companion);
    // The logits at the ends of the gradient: for the whole map, or (per-layer scale) for layer l.
    QCPRange logitRange(int layer = -1) const;

    // Decision values (docs/MODEL.md "Interventions") on a diverging scale in place of the router logits, where
    // the run has them; showsDecisionValues() says whether the map shows them now.
    void setShowDecisionValues(bool show);
    bool showsDecisionValues() const;
    // The per-layer summary of the values: "layer 1 took 5 of its 8 most valuable tokens · …", or compact
    // "most valuable taken: L1 5/8 · …" (the title row); empty without values.
    QString decisionValueSummary(bool compact = false) const;

    // What forcing a decision asks (overrideRequested's action).
    enum class Force { Skip = 0, Process = 1, Clear = -1 };

    // Locks a cell (layer, token); -1 clears.
    void selectCell(int layer, int token);
    int selectedLayer() const { return sel_layer_; }
    int selectedToken() const { return sel_token_; }
    // Shows every token and layer.
    void resetView();
    // Without the token and position axes and the title row: the rows get their room where the window is
    // short, beside a heatmap whose axes and key show the same columns (zoom linked).
    void setCompact(bool compact);
    bool isCompact() const { return compact_; }
    // The heatmap as a figure: the data without the hover and the locked cell (paints nothing itself).
    QString exportFigure(const QString& path);

    // Cells of the colour map (columns = tokens, rows = layers); 0 x 0 for an empty run.
    int columnCount() const;
    QString title() const;  // the title row: mode, capacity, size, what was generated
    int tokensPerColumn() const { return bin_; }  // > 1 when zoomed out past one pixel per token
    int rowCount() const;
    QCPColorMap* colorMap() const { return map_; }
    const TokenAxisTicker* tokenTicker() const { return token_ticker_.data(); }
    const TokenAxisTicker* layerTicker() const { return layer_ticker_.data(); }
    // The cell under a widget position, or (-1, -1).
    QPair<int, int> cellAt(const QPoint& pos) const;  // (layer, token)
    // What hovering a cell shows: token, position, layer, logit, rank, threshold, probability, decision.
    QString cellSummary(int layer, int token) const;
    // A mixture layer's part of it: the router's choice and runner-up with their probabilities, and which
    // expert ran the token or why none did.
    static QString mixtureSummary(const LayerTrace& layer, int token);

Q_SIGNALS:
    void cellSelected(int layer, int token);
    void selectionCleared();
    void cellHovered(int layer, int token);  // (-1, -1) when the mouse leaves the cells
    // Force a routed layer's decision on a token, or with token -1 on every token of the layer (keys P, S and
    // Delete on the locked cell; the context menu of a cell or of a layer's label).
    void overrideRequested(int layer, int token, modscope::RoutingHeatmap::Force action);
    void clearOverridesRequested();

protected:
    void mousePressEvent(QMouseEvent* event) override;
    void mouseMoveEvent(QMouseEvent* event) override;
    void mouseReleaseEvent(QMouseEvent* event) override;
    void mouseDoubleClickEvent(QMouseEvent* event) override;
    void leaveEvent(QEvent* event) override;
    void keyPressEvent(QKeyEvent* event) override;
    void contextMenuEvent(QContextMenuEvent* event) override;
    void resizeEvent(QResizeEvent* event) override;

private:
    void fillColorMap();
    int tokensPerBinFor(const QCPRange& range) const;
    // Re-bins the colour map when the zoom changed how many tokens share a pixel; true when it did.
    bool updateBinning();
    void updateLayerAxis();
    void updateTitle();
    void onTokenRangeChanged(const QCPRange& range);
    // Picks label steps from the pixels a token and a layer get now; true when a step changed.
    bool updateTickSteps();
    void replotOverlay();
    void moveSelection(int d_layer, int d_token);

    void updateScaleAxis();
    void fillDecisionValues(int kx, int ky, int bins, int n);

    SnapshotPtr snapshot_;
    SnapshotPtr companion_;
    HeatmapColorScale color_scale_;
    QCPRange shared_range_{-1.0, 1.0};
    std::vector<QCPRange> layer_ranges_;  // per layer, for the per-layer scale
    QSharedPointer<QCPAxisTicker> scale_ticker_;
    PlotTheme theme_;
    QCPColorMap* map_ = nullptr;
    QCPColorScale* scale_ = nullptr;
    HeatmapOverlay* overlay_ = nullptr;
    HeatmapLegend* legend_ = nullptr;
    QSharedPointer<TokenAxisTicker> token_ticker_;
    QSharedPointer<TokenAxisTicker> position_ticker_;
    QSharedPointer<TokenAxisTicker> layer_ticker_;
    int sel_layer_ = -1, sel_token_ = -1;
    int hover_layer_ = -1, hover_token_ = -1;
    bool stale_ = false;
    bool compact_ = false;
    bool clamping_ = false;
    bool painted_ = false;
    int bin_ = 1;  // tokens per colour-map column
    QVector<QString> layer_labels_long_;
    bool layer_labels_dirty_ = true;
    QPoint press_pos_;
    bool pressed_ = false;
    bool show_values_ = false;
    bool values_shown_ = false;  // the map holds decision values now
};

}  // namespace modscope
