#include "plot_theme.h"

#include <qcustomplot.h>

namespace modscope {

bool PlotTheme::isDark(const QPalette& palette) {
    return palette.color(QPalette::Window).lightness() < 128;
}

PlotTheme PlotTheme::fromPalette(const QPalette& palette) {
    PlotTheme t;
    t.dark = isDark(palette);
    t.background = palette.color(QPalette::Base);
    t.foreground = palette.color(QPalette::Text);
    if (t.dark) {
        t.muted = QColor(150, 156, 166);
        t.grid = QColor(70, 74, 82);
        t.full_layer = QColor(92, 96, 104);
        t.accent = QColor(255, 92, 92);
        t.processed = QColor(86, 180, 233);
        t.capacity = QColor(200, 200, 200);
        t.skipped = QColor(64, 68, 76);
        t.warning = QColor(255, 196, 80);
        t.skipped_alpha = 72;
    } else {
        t.muted = QColor(105, 110, 118);
        t.grid = QColor(222, 224, 228);
        t.full_layer = QColor(178, 182, 190);
        t.accent = QColor(220, 30, 50);
        t.processed = QColor(0, 114, 178);
        t.capacity = QColor(60, 60, 60);
        t.skipped = QColor(220, 222, 226);
        t.warning = QColor(176, 110, 0);
        t.skipped_alpha = 64;
    }
    return t;
}

void PlotTheme::apply(QCustomPlot* plot) const {
    plot->setBackground(background);
    const QPen axis_pen(muted, 1);
    for (auto* rect : plot->axisRects()) {
        rect->setBackground(background);
        for (auto* axis : rect->axes()) {
            axis->setBasePen(axis_pen);
            axis->setTickPen(axis_pen);
            axis->setSubTickPen(axis_pen);
            axis->setTickLabelColor(foreground);
            axis->setLabelColor(foreground);
            axis->grid()->setPen(QPen(grid, 1, Qt::SolidLine));
            axis->grid()->setZeroLinePen(Qt::NoPen);
            axis->grid()->setSubGridPen(Qt::NoPen);
        }
    }
    if (plot->legend) {
        plot->legend->setBrush(background);
        plot->legend->setBorderPen(QPen(grid));
        plot->legend->setTextColor(foreground);
    }
    for (int i = 0; i < plot->plotLayout()->elementCount(); ++i) {
        if (auto* title = qobject_cast<QCPTextElement*>(plot->plotLayout()->elementAt(i)))
            title->setTextColor(foreground);
        if (auto* scale = qobject_cast<QCPColorScale*>(plot->plotLayout()->elementAt(i))) {
            auto* axis = scale->axis();
            axis->setBasePen(axis_pen);
            axis->setTickPen(axis_pen);
            axis->setSubTickPen(axis_pen);
            axis->setTickLabelColor(foreground);
            axis->setLabelColor(foreground);
        }
    }
}

}  // namespace modscope
