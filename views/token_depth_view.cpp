#include "token_depth_view.h"

#include <QEvent>
#include <QHelpEvent>
#include <QMouseEvent>
#include <QPainter>
#include <QScrollBar>
#include <QToolTip>

#include <algorithm>
#include <utility>

#include "color_maps.h"
#include "piece_text.h"

namespace modscope {
namespace {

constexpr int kMargin = 8;
constexpr int kPadX = 3;
constexpr int kPadY = 2;
constexpr int kGapX = 2;
constexpr int kGapY = 4;
constexpr int kSwatch = 22;

}  // namespace

TokenDepthView::TokenDepthView(QWidget* parent) : QAbstractScrollArea(parent) {
    setHorizontalScrollBarPolicy(Qt::ScrollBarAlwaysOff);
    viewport()->setMouseTracking(true);
    viewport()->setAutoFillBackground(false);
    setFrameShape(QFrame::NoFrame);
    theme_ = PlotTheme::fromPalette(palette());
    setMinimumHeight(80);
}

void TokenDepthView::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    if (selected_ >= T) selected_ = -1;
    hovered_ = -1;
    min_depth_ = max_depth_ = 0;
    if (snapshot_ && !snapshot_->empty()) {
        max_depth_ = snapshot_->layers();
        min_depth_ = max_depth_ - snapshot_->routedLayerCount();
    }
    labels_.resize(T);
    for (int t = 0; t < T; ++t) labels_[t] = chipText(t);
    relayout();
    viewport()->update();
}

void TokenDepthView::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    viewport()->update();
}

void TokenDepthView::selectToken(int token) {
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    if (token >= T) token = -1;
    if (token == selected_) return;
    selected_ = token;
    if (token >= 0 && token < chips_.size()) {
        // Keep the selected token in view.
        const QRect r = chips_[token];
        const int top = verticalScrollBar()->value();
        if (r.top() < top || r.bottom() > top + viewport()->height())
            verticalScrollBar()->setValue(std::max(0, r.center().y() - viewport()->height() / 2));
    }
    viewport()->update();
}

QString TokenDepthView::chipText(int t) const {
    const auto& s = *snapshot_;
    QString text;
    if (t < int(s.texts.size()) && !s.texts[t].empty()) text = visibleText(s.texts[t]);
    if (text.isEmpty()) text = pieceLabel(s.pieces[t], 24);
    if (text.trimmed().isEmpty()) text.replace(QLatin1Char(' '), QChar(0x2423));
    return text;
}

QColor TokenDepthView::chipColor(int t) const {
    const int d = t < int(snapshot_->depth.size()) ? snapshot_->depth[t] : 0;
    const int span = max_depth_ - min_depth_;
    return depthColor(span > 0 ? double(d - min_depth_) / span : 1.0, theme_.dark);
}

void TokenDepthView::relayout() {
    const int width = std::max(100, viewport()->width());
    const QFontMetrics fm(font());
    const int line_h = fm.height() + 2 * kPadY;
    legend_height_ = line_h + kGapY * 2;
    chips_.clear();
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    chips_.reserve(T);
    int x = kMargin, y = kMargin + legend_height_;
    for (int t = 0; t < T; ++t) {
        const int w = fm.horizontalAdvance(labels_[t]) + 2 * kPadX;
        if (x + w > width - kMargin && x > kMargin) {
            x = kMargin;
            y += line_h + kGapY;
        }
        chips_.append(QRect(x, y, w, line_h));
        x += w + kGapX;
        // A newline in the prompt starts a new line here too.
        if (t < int(snapshot_->texts.size()) && snapshot_->texts[t].find('\n') != std::string::npos) {
            x = kMargin;
            y += line_h + kGapY;
        }
    }
    content_height_ = (T ? chips_.back().bottom() : y) + line_h + 2 * kMargin;
    if (snapshot_ && snapshot_->truncated) content_height_ += line_h + kGapY;
    verticalScrollBar()->setRange(0, std::max(0, content_height_ - viewport()->height()));
    verticalScrollBar()->setPageStep(viewport()->height());
    verticalScrollBar()->setSingleStep(line_h + kGapY);
}

QRect TokenDepthView::chipRect(int token) const {
    return token >= 0 && token < chips_.size() ? chips_[token] : QRect();
}

int TokenDepthView::tokenAt(const QPoint& pos) const {
    const QPoint p = pos + QPoint(0, verticalScrollBar()->value());
    for (int t = 0; t < chips_.size(); ++t)
        if (chips_[t].adjusted(-1, -1, 1, 1).contains(p)) return t;
    return -1;
}

void TokenDepthView::paintEvent(QPaintEvent*) {
    QPainter p(viewport());
    const int top = verticalScrollBar()->value();
    p.fillRect(viewport()->rect(), theme_.background);
    p.translate(0, -top);
    paintContent(p, QRect(0, top, viewport()->width(), viewport()->height()), viewport()->width());
}

void TokenDepthView::renderContent(QPainter* painter, const QSize& size) {
    painter->fillRect(QRect(QPoint(0, 0), size), theme_.background);
    const int selected = std::exchange(selected_, -1), hovered = std::exchange(hovered_, -1);
    paintContent(*painter, QRect(QPoint(0, 0), size), size.width());
    selected_ = selected, hovered_ = hovered;
}

void TokenDepthView::paintContent(QPainter& p, const QRect& visible, int width) {
    const QFontMetrics fm(font());
    p.setFont(font());
    p.setRenderHint(QPainter::Antialiasing, true);
    if (!snapshot_ || snapshot_->empty()) {
        p.setPen(theme_.muted);
        p.drawText(QRect(kMargin, kMargin, width - 2 * kMargin, fm.height() * 2), Qt::AlignLeft | Qt::TextWordWrap,
                   tr("Per-token depth appears here: each token coloured by how many layers processed it."));
        return;
    }

    // Legend: what each colour means in layers.
    int x = kMargin;
    const int ly = kMargin;
    p.setPen(theme_.foreground);
    const QString caption = tr("Layers that processed each token:");
    p.drawText(QRect(x, ly, fm.horizontalAdvance(caption), fm.height() + 2 * kPadY), Qt::AlignVCenter, caption);
    x += fm.horizontalAdvance(caption) + 8;
    const int span = max_depth_ - min_depth_;
    for (int d = min_depth_; d <= max_depth_; ++d) {
        if (span > 12 && d != min_depth_ && d != max_depth_ && (d - min_depth_) % std::max(1, span / 8)) continue;
        const QColor c = depthColor(span > 0 ? double(d - min_depth_) / span : 1.0, theme_.dark);
        const QString label = QString::number(d);
        const int w = std::max(kSwatch, fm.horizontalAdvance(label) + 8);
        const QRect box(x, ly, w, fm.height() + 2 * kPadY);
        p.setPen(Qt::NoPen);
        p.setBrush(c);
        p.drawRoundedRect(box, 3, 3);
        p.setPen(textColorOn(c));
        p.drawText(box, Qt::AlignCenter, label);
        x += w + 2;
    }
    x += 10;
    p.setPen(theme_.muted);
    const QString hint = tr("of %1 (%2 routed) · underlined: generated · click a token to inspect it")
                             .arg(max_depth_)
                             .arg(span);
    p.drawText(QRect(x, ly, std::max(0, width - x - kMargin), fm.height() + 2 * kPadY),
               Qt::AlignVCenter | Qt::AlignLeft, fm.elidedText(hint, Qt::ElideRight, std::max(0, width - x - kMargin)));

    const auto& s = *snapshot_;
    for (int t = 0; t < chips_.size(); ++t) {
        const QRect r = chips_[t];
        if (r.bottom() < visible.top() - 4) continue;
        if (r.top() > visible.bottom() + 4) break;
        const QColor bg = chipColor(t);
        // A hairline edge keeps the palest chips (least compute) visible on a light canvas.
        p.setPen(QPen(theme_.dark ? bg.lighter(125) : bg.darker(112), 1));
        p.setBrush(bg);
        p.drawRoundedRect(QRectF(r).adjusted(0.5, 0.5, -0.5, -0.5), 3, 3);
        p.setPen(textColorOn(bg));
        p.drawText(r.adjusted(kPadX, 0, -kPadX, 0), Qt::AlignVCenter | Qt::AlignLeft, labels_[t]);
        if (s.isGenerated(t)) {
            p.setPen(QPen(theme_.foreground, 2));
            p.drawLine(r.bottomLeft() + QPoint(1, 2), r.bottomRight() + QPoint(-1, 2));
        }
        if (t == selected_ || t == hovered_) {
            p.setBrush(Qt::NoBrush);
            p.setPen(QPen(t == selected_ ? theme_.accent : theme_.foreground, t == selected_ ? 2.5 : 1));
            p.drawRoundedRect(QRectF(r).adjusted(-1, -1, 1, 1), 3, 3);
        }
    }
    if (s.truncated && !chips_.isEmpty()) {
        p.setPen(theme_.warning);
        const QRect r(kMargin, chips_.back().bottom() + kGapY + 2, width - 2 * kMargin, fm.height() + 2 * kPadY);
        p.drawText(r, Qt::AlignLeft | Qt::AlignVCenter,
                   fm.elidedText(tr("… %1 more bytes of the prompt were not run: the model's context is %2 tokens.")
                                     .arg(QLocale().toString(qulonglong(s.prompt_bytes - s.used_bytes)))
                                     .arg(s.max_seq_len),
                                 Qt::ElideRight, r.width()));
    }
}

QString TokenDepthView::tooltip(int t) const {
    const auto& s = *snapshot_;
    QStringList skipped, processed;
    for (const auto& layer : s.trace.layers) {
        if (!layer.routed) continue;
        (layer.selected[t] ? processed : skipped).append(QString::number(layer.index));
    }
    QString html = QStringLiteral("<b>%1</b>&nbsp;&nbsp;token %2%3<br>processed by <b>%4 of %5</b> layers")
                       .arg(labels_[t].toHtmlEscaped())
                       .arg(t)
                       .arg(s.isGenerated(t) ? QStringLiteral(" · generated") : QString())
                       .arg(s.depth[t])
                       .arg(s.layers());
    if (!processed.isEmpty()) html += QStringLiteral("<br>routed layers that took it: %1").arg(processed.join(QStringLiteral(", ")));
    if (!skipped.isEmpty()) html += QStringLiteral("<br>routed layers that skipped it: %1").arg(skipped.join(QStringLiteral(", ")));
    return html;
}

void TokenDepthView::resizeEvent(QResizeEvent* event) {
    QAbstractScrollArea::resizeEvent(event);
    relayout();
}

void TokenDepthView::changeEvent(QEvent* event) {
    QAbstractScrollArea::changeEvent(event);
    if (event->type() == QEvent::FontChange) {
        if (snapshot_)
            for (int t = 0; t < labels_.size(); ++t) labels_[t] = chipText(t);
        relayout();
    }
}

void TokenDepthView::mouseMoveEvent(QMouseEvent* event) {
    const int t = tokenAt(event->pos());
    if (t == hovered_) return;
    hovered_ = t;
    viewport()->update();
    Q_EMIT tokenHovered(t);
}

void TokenDepthView::mousePressEvent(QMouseEvent* event) {
    if (event->button() != Qt::LeftButton) return;
    const int t = tokenAt(event->pos());
    if (t < 0) return;
    selectToken(t == selected_ ? -1 : t);
    Q_EMIT tokenSelected(selected_);
}

void TokenDepthView::leaveEvent(QEvent* event) {
    QAbstractScrollArea::leaveEvent(event);
    if (hovered_ < 0) return;
    hovered_ = -1;
    viewport()->update();
    Q_EMIT tokenHovered(-1);
}

bool TokenDepthView::viewportEvent(QEvent* event) {
    if (event->type() == QEvent::ToolTip) {
        auto* help = static_cast<QHelpEvent*>(event);
        const int t = tokenAt(help->pos());
        if (t >= 0) {
            QToolTip::showText(help->globalPos(), tooltip(t), viewport());
        } else {
            QToolTip::hideText();
        }
        return true;
    }
    return QAbstractScrollArea::viewportEvent(event);
}

}  // namespace modscope
