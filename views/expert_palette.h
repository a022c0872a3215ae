// How the views draw a mixture layer's tokens (docs/MODEL.md "Mixture layers"): a colour per expert, and
// marks for the tokens whose MLP did not run. One look for the heatmap, its legend and the load chart.
#pragma once

#include <QColor>
#include <QPainter>
#include <QRectF>

#include "modscope/engine.h"
#include "plot_theme.h"

namespace modscope {

// A qualitative colour per expert: Okabe and Ito's palette (told apart by the colour-blind, readable on a
// light and a dark canvas), in an order that puts the colours least like the heatmap's viridis first; past
// seven experts the palette repeats, lighter and then darker.
QColor expertColor(int expert);

// Fills rect as a mixture token of that fate: its expert's colour where one ran; a diagonal hatch for a no-op
// choice; a cross-hatch in the warning colour for an overflow. A token the MoD router kept out gets nothing
// (the heatmap already shows it skipped).
void paintExpertMark(QPainter* painter, const QRectF& rect, LayerTrace::ExpertFate fate, int expert,
                     const PlotTheme& theme);

// A short phrase for why a token's MLP did not run, or which expert ran it ("expert 2").
QString expertFateText(const LayerTrace& layer, int token);

}  // namespace modscope
