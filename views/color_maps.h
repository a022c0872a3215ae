// Colour maps shared by the plots: one per quantity, so a colour never means two things.
#pragma once

#include <QColor>

#include <qcustomplot.h>

namespace modscope {

// Router logits: viridis (perceptually uniform, readable in grey and by the colour-blind). QCustomPlot
// 2.1 has no viridis preset, so it is built from matplotlib's stops. NaN cells (full layers, which have
// no router) take nan_color.
QCPColorGradient viridisGradient(const QColor& nan_color);
QColor viridis(double t);  // t in [0, 1]

// Decision values (docs/MODEL.md "Interventions"), diverging around 0: blue where a decision was worth making
// (flipping it raises the loss), red where flipping it would lower the loss; the middle is the canvas's
// neutral (light grey, or dark grey on a dark canvas). NaN cells (full layers) take nan_color.
QCPColorGradient decisionValueGradient(const QColor& nan_color, bool dark);

// Per-token depth (layers that processed a token): a warm sequential scale, light = little compute,
// deep orange = every layer. t in [0, 1]. On a dark canvas the ramp runs the other way in lightness
// (dim to bright), so little compute recedes into the background there too.
QColor depthColor(double t, bool dark = false);

// Black or white, whichever reads better on background.
QColor textColorOn(const QColor& background);

}  // namespace modscope
