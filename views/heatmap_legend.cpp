#include "heatmap_legend.h"

#include "color_maps.h"
#include "expert_palette.h"

namespace modscope {

HeatmapLegend::HeatmapLegend(QCustomPlot* plot) : QCPLayoutElement(plot) {}

// Hidden, the row takes no height (the layout grid sizes rows by these hints, visible or not).
QSize HeatmapLegend::minimumOuterSizeHint() const {
    const QFontMetrics fm(mParentPlot->font());
    return QSize(0, visible() ? fm.height() + 14 : 0);
}

QSize HeatmapLegend::maximumOuterSizeHint() const {
    const QFontMetrics fm(mParentPlot->font());
    return QSize(QWIDGETSIZE_MAX, visible() ? fm.height() + 14 : 0);
}

void HeatmapLegend::draw(QCPPainter* painter) {
    const QRect r = mRect;
    QFont font = mParentPlot->font();
    const QFontMetrics fm(font);
    const int sw = fm.height() - 2;  // swatch size
    const int cy = r.center().y();

    // Right to left, so the title gets whatever width remains.
    struct Entry {
        QString text;
        int kind;
    };
    QVector<Entry> entries{{QStringLiteral("processed"), 0},
                           {QStringLiteral("skipped"), 1},
                           {QStringLiteral("full layer"), 2}};
    if (show_disagreement_) entries.append({QStringLiteral("predictor ≠ top-k"), 3});
    if (mixture_) {
        entries.append({QStringLiteral("experts"), 4});
        if (noop_) entries.append({QStringLiteral("no-op"), 5});
        entries.append({QStringLiteral("overflow"), 6});
    }
    int x = r.right() - 6;
    painter->setFont(font);
    for (int i = int(entries.size()) - 1; i >= 0; --i) {
        const auto& e = entries[i];
        const int tw = fm.horizontalAdvance(e.text);
        x -= tw;
        painter->setPen(theme_.foreground);
        painter->drawText(QRect(x, r.top(), tw, r.height()), Qt::AlignVCenter | Qt::AlignLeft, e.text);
        x -= sw + 6;
        const QRect box(x, cy - sw / 2, sw, sw);
        painter->setPen(Qt::NoPen);
        switch (e.kind) {
        case 0:
        case 1: {
            // The same logit colour, opaque and faded: exactly what the cells do.
            QLinearGradient g(box.topLeft(), box.topRight());
            QColor a = viridis(0.55), b = viridis(0.95);
            if (e.kind == 1) {
                a.setAlpha(theme_.skipped_alpha);
                b.setAlpha(theme_.skipped_alpha);
            }
            g.setColorAt(0, a);
            g.setColorAt(1, b);
            painter->setBrush(g);
            painter->drawRect(box);
            break;
        }
        case 2:
            painter->setBrush(theme_.full_layer);
            painter->drawRect(box);
            break;
        case 4:  // the first four experts' colours side by side
            for (int e = 0; e < 4; ++e)
                painter->fillRect(QRectF(box.left() + e * box.width() / 4.0, box.top(), box.width() / 4.0, box.height()),
                                  expertColor(e));
            break;
        case 5:
            paintExpertMark(painter, box, LayerTrace::ExpertFate::NoOp, -1, theme_);
            break;
        case 6:
            paintExpertMark(painter, box, LayerTrace::ExpertFate::Overflow, -1, theme_);
            break;
        case 3: {
            painter->setBrush(theme_.skipped);
            painter->drawRect(box);
            painter->setBrush(theme_.accent);
            const QPointF tri[3] = {box.topRight() + QPointF(1, 0), box.topRight() + QPointF(1 - sw * 0.6, 0),
                                    box.topRight() + QPointF(1, sw * 0.6)};
            painter->setAntialiasing(true);
            painter->drawPolygon(tri, 3);
            painter->setAntialiasing(false);
            break;
        }
        }
        x -= 18;
    }

    QFont bold = font;
    bold.setBold(true);
    painter->setFont(bold);
    painter->setPen(theme_.foreground);
    const QRect title_rect(r.left() + 6, r.top(), std::max(0, x - r.left() - 6), r.height());
    painter->drawText(title_rect, Qt::AlignVCenter | Qt::AlignLeft,
                      QFontMetrics(bold).elidedText(title_, Qt::ElideRight, title_rect.width()));
}

}  // namespace modscope
