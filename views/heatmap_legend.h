// HeatmapLegend: the heatmap's title row. What was run on the left, what each mark means on the right, so
// an exported figure explains itself.
#pragma once

#include <QString>

#include <qcustomplot.h>

#include "plot_theme.h"

namespace modscope {

class HeatmapLegend : public QCPLayoutElement {
public:
    explicit HeatmapLegend(QCustomPlot* plot);

    void setTitle(const QString& title) { title_ = title; }
    const QString& title() const { return title_; }
    void setTheme(const PlotTheme& theme) { theme_ = theme; }
    void setShowDisagreement(bool show) { show_disagreement_ = show; }
    // The run has mixture layers: their marks join the legend (experts, and no-op choices where it has any).
    void setMixture(bool mixture, bool noop) { mixture_ = mixture, noop_ = noop; }

protected:
    QSize minimumOuterSizeHint() const override;
    QSize maximumOuterSizeHint() const override;
    void draw(QCPPainter* painter) override;

private:
    QString title_;
    PlotTheme theme_;
    bool show_disagreement_ = true;
    bool mixture_ = false, noop_ = false;
};

}  // namespace modscope
