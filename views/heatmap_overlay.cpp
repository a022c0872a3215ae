#include "heatmap_overlay.h"

#include "expert_palette.h"

#include <algorithm>
#include <cmath>

namespace modscope {

HeatmapOverlay::HeatmapOverlay(QCustomPlot* plot, QCPAxisRect* rect)
    : QCPLayerable(plot, QStringLiteral("marks")), rect_(rect) {}

void HeatmapOverlay::applyDefaultAntialiasingHint(QCPPainter* painter) const {
    painter->setAntialiasing(false);
}

QRect HeatmapOverlay::clipRect() const { return rect_->rect(); }

QRectF HeatmapOverlay::cellRect(int token, int layer) const {
    const auto* x = rect_->axis(QCPAxis::atBottom);
    const auto* y = rect_->axis(QCPAxis::atLeft);
    const double x0 = x->coordToPixel(token - 0.5), x1 = x->coordToPixel(token + 0.5);
    const double y0 = y->coordToPixel(layer - 0.5), y1 = y->coordToPixel(layer + 0.5);
    return QRectF(QPointF(std::min(x0, x1), std::min(y0, y1)), QPointF(std::max(x0, x1), std::max(y0, y1)));
}

void HeatmapOverlay::draw(QCPPainter* painter) {
    const QRect area = rect_->rect();
    if (!snapshot_ || snapshot_->empty()) {
        if (!placeholder_.isEmpty()) {
            painter->setPen(theme_.muted);
            QFont f = painter->font();
            f.setPointSizeF(f.pointSizeF() * 1.25);
            painter->setFont(f);
            painter->drawText(area.adjusted(24, 24, -24, -24), Qt::AlignCenter | Qt::TextWordWrap, placeholder_);
        }
        return;
    }
    const auto& s = *snapshot_;
    const int T = s.tokens(), L = s.layers();
    const auto* xa = rect_->axis(QCPAxis::atBottom);
    const double cell_w = std::abs(xa->coordToPixel(1.0) - xa->coordToPixel(0.0));
    const int first = std::max(0, int(std::floor(xa->range().lower)));
    const int last = std::min(T - 1, int(std::ceil(xa->range().upper)));

    // Row separators in the canvas colour: rows read as bands even where neighbours share a colour.
    painter->setPen(QPen(theme_.background, L > 24 ? 1 : 2));
    for (int l = 1; l < L; ++l) {
        const double y = rect_->axis(QCPAxis::atLeft)->coordToPixel(l - 0.5);
        painter->drawLine(QLineF(area.left(), y, area.right(), y));
    }
    if (cell_w >= 3.0 * kMinMarkCellWidth) {
        painter->setPen(QPen(theme_.background, 1));
        for (int t = first; t <= last + 1; ++t) {
            const double x = xa->coordToPixel(t - 0.5);
            painter->drawLine(QLineF(x, area.top(), x, area.bottom()));
        }
    }

    // Mixture layers: a full layer's cell takes its token's expert colour (the row has no logits to show);
    // a routed layer's (staged MoDE) keeps its logit colour above a band in the expert's colour.
    for (const auto& layer : s.trace.layers) {
        if (!layer.moe || layer.expert.size() != std::size_t(T)) continue;
        for (int t = first; t <= last; ++t) {
            const QRectF r = cellRect(t, layer.index);
            const QRectF mark = layer.routed ? QRectF(r.left(), r.bottom() - r.height() * 0.3, r.width(), r.height() * 0.3)
                                             : r;
            paintExpertMark(painter, mark, layer.expertFate(t), layer.expert[t], theme_);
        }
    }

    // Where the predictor and top-k disagree: a corner triangle, only when a cell is wide enough to carry one.
    if (show_disagreement_ && cell_w >= kMinMarkCellWidth) {
        painter->setAntialiasing(true);
        painter->setPen(Qt::NoPen);
        painter->setBrush(theme_.accent);
        for (const auto& layer : s.trace.layers) {
            if (!layer.routed || layer.predictor_selected.size() != std::size_t(T)) continue;
            for (int t = first; t <= last; ++t) {
                if (layer.predictor_selected[t] == layer.topk_selected[t]) continue;
                const QRectF r = cellRect(t, layer.index);
                const double m = std::min({r.width(), r.height(), 14.0}) * 0.45;
                const QPointF tri[3] = {r.topRight(), r.topRight() + QPointF(-m, 0), r.topRight() + QPointF(0, m)};
                painter->drawPolygon(tri, 3);
            }
        }
        painter->setAntialiasing(false);
    }

    // Decisions forced by hand: a frame in the warning colour, with P or S where the cell has room.
    if (!s.trace.overrides.empty()) {
        QFont f = painter->font();
        f.setBold(true);
        painter->setFont(f);
        for (const auto& layer : s.trace.layers) {
            if (!layer.routed) continue;
            for (int t = first; t <= last; ++t) {
                const int forced = forcedDecision(s.trace, layer.index, t);
                if (forced < 0) continue;
                const QRectF r = cellRect(t, layer.index);
                painter->setPen(QPen(theme_.warning, cell_w >= kMinMarkCellWidth ? 2 : 1));
                painter->setBrush(Qt::NoBrush);
                painter->drawRect(r.adjusted(1, 1, -1, -1));
                if (r.width() >= 14 && r.height() >= 14) {
                    painter->setPen(theme_.foreground);
                    painter->drawText(r, Qt::AlignCenter, forced ? QStringLiteral("P") : QStringLiteral("S"));
                }
            }
        }
    }

    // Tokens from generated_from on were sampled: a dashed boundary before the first.
    if (s.generated_from > 0 && s.generated_from < T) {
        const double x = xa->coordToPixel(s.generated_from - 0.5);
        painter->setPen(QPen(theme_.foreground, 2, Qt::DashLine));
        painter->drawLine(QLineF(x, area.top(), x, area.bottom()));
    }

    painter->setBrush(Qt::NoBrush);
    if (cursor_shown_ && hover_token_ >= 0 && hover_token_ < T && hover_layer_ >= 0 && hover_layer_ < L) {
        painter->setPen(QPen(theme_.foreground, 1));
        painter->drawRect(cellRect(hover_token_, hover_layer_).adjusted(0, 0, -1, -1));
    }
    if (cursor_shown_ && sel_token_ >= 0 && sel_token_ < T) {
        // The whole column, then the cell: the details panel lists every layer of this token.
        const QRectF col = cellRect(sel_token_, 0).united(cellRect(sel_token_, L - 1));
        painter->setPen(QPen(theme_.accent, 1, Qt::DashLine));
        painter->drawRect(col.adjusted(0, 0, -1, -1));
        if (sel_layer_ >= 0 && sel_layer_ < L) {
            painter->setPen(QPen(theme_.accent, 3));
            painter->drawRect(cellRect(sel_token_, sel_layer_).adjusted(1, 1, -2, -2));
        }
    }

    if (stale_) {
        // Results are for an older prompt: say so where the eye is, without hiding the data.
        const QString text = QStringLiteral("updating…");
        QFont f = painter->font();
        f.setBold(true);
        painter->setFont(f);
        const QFontMetrics fm(f);
        const QRect box(area.right() - fm.horizontalAdvance(text) - 24, area.top() + 8,
                        fm.horizontalAdvance(text) + 16, fm.height() + 8);
        painter->setAntialiasing(true);
        painter->setPen(Qt::NoPen);
        QColor bg = theme_.warning;
        bg.setAlpha(225);
        painter->setBrush(bg);
        painter->drawRoundedRect(box, 4, 4);
        painter->setPen(theme_.dark ? QColor(20, 20, 20) : QColor(255, 255, 255));
        painter->drawText(box, Qt::AlignCenter, text);
        painter->setAntialiasing(false);
    }
}

}  // namespace modscope
