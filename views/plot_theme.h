// PlotTheme: the colours every plot takes from the application palette, so light and dark themes (and a
// system switching between them) restyle QCustomPlot, which does not follow QPalette by itself.
#pragma once

#include <QColor>
#include <QFont>
#include <QPalette>

class QCustomPlot;

namespace modscope {

struct PlotTheme {
    bool dark = false;
    QColor background;  // plot canvas
    QColor foreground;  // axis labels, text
    QColor muted;       // secondary text, axis lines
    QColor grid;
    QColor full_layer;  // rows of layers without a router (they process every token)
    QColor accent;      // selection, the current value
    QColor processed;   // bars of processed tokens
    QColor capacity;    // the capacity k a layer may take
    QColor skipped;     // tokens a layer skipped, where a plot shows them as a colour
    QColor warning;
    int skipped_alpha = 64;  // opacity of skipped cells in the heatmap: they fade into the canvas

    static PlotTheme fromPalette(const QPalette& palette);
    static bool isDark(const QPalette& palette);

    // Canvas, axes, grid, tick labels and legend of every axis rect of plot.
    void apply(QCustomPlot* plot) const;
};

}  // namespace modscope
