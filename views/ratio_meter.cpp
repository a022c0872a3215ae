#include "ratio_meter.h"

#include <QPainter>

#include <algorithm>

namespace modscope {

RatioMeter::RatioMeter(const QString& caption, QWidget* parent) : QWidget(parent), caption_(caption) {
    theme_ = PlotTheme::fromPalette(palette());
    setSizePolicy(QSizePolicy::Expanding, QSizePolicy::Fixed);
}

void RatioMeter::setValue(double fraction, const QString& detail) {
    fraction_ = std::max(0.0, fraction);
    detail_ = detail;
    setToolTip(text());
    update();
}

void RatioMeter::clear(const QString& detail) {
    fraction_ = -1.0;
    detail_ = detail;
    setToolTip(text());
    update();
}

void RatioMeter::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    update();
}

QString RatioMeter::text() const {
    if (fraction_ < 0) return caption_ + QStringLiteral(": ") + (detail_.isEmpty() ? QStringLiteral("–") : detail_);
    return QStringLiteral("%1: %2% of dense (%3)").arg(caption_).arg(fraction_ * 100.0, 0, 'f', 1).arg(detail_);
}

QSize RatioMeter::sizeHint() const {
    const QFontMetrics fm(font());
    return QSize(360, fm.height() * 2 + 10);
}

QSize RatioMeter::minimumSizeHint() const {
    const QFontMetrics fm(font());
    return QSize(160, fm.height() * 2 + 10);
}

void RatioMeter::paintEvent(QPaintEvent*) {
    QPainter p(this);
    p.setRenderHint(QPainter::Antialiasing, true);
    const QFontMetrics fm(font());
    const int line = fm.height();
    QFont bold = font();
    bold.setBold(true);

    // First line: caption, big percentage, detail.
    p.setFont(bold);
    p.setPen(palette().color(QPalette::WindowText));
    const int cw = QFontMetrics(bold).horizontalAdvance(caption_);
    p.drawText(QRect(0, 0, cw, line), Qt::AlignLeft | Qt::AlignVCenter, caption_);
    QString value = fraction_ < 0 ? QStringLiteral("–") : QStringLiteral("%1%").arg(fraction_ * 100.0, 0, 'f', 1);
    const int vx = cw + 8;
    const int vw = QFontMetrics(bold).horizontalAdvance(value);
    p.drawText(QRect(vx, 0, vw, line), Qt::AlignLeft | Qt::AlignVCenter, value);
    p.setFont(font());
    p.setPen(theme_.muted);
    const QString detail = fraction_ < 0 ? detail_ : tr("of dense · %1").arg(detail_);
    const int dx = vx + vw + 6;
    p.drawText(QRect(dx, 0, width() - dx, line), Qt::AlignLeft | Qt::AlignVCenter,
               fm.elidedText(detail, Qt::ElideRight, std::max(0, width() - dx)));

    // Second line: the bar, dense = the full width; a tick at 100% when the value is beyond it.
    const QRectF track(0.5, line + 4.5, width() - 1.0, 8);
    p.setPen(Qt::NoPen);
    p.setBrush(theme_.skipped);
    p.drawRoundedRect(track, 3, 3);
    if (fraction_ >= 0) {
        QRectF fill = track;
        fill.setWidth(track.width() * std::min(1.0, fraction_));
        p.setBrush(theme_.processed);
        p.drawRoundedRect(fill, 3, 3);
    }
}

}  // namespace modscope
