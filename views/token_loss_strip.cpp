#include "token_loss_strip.h"

#include <QToolTip>

#include <cmath>
#include <limits>

#include "piece_text.h"

namespace modscope {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double sumOf(const std::vector<float>& v, std::size_t n) {
    double s = 0.0;
    for (std::size_t i = 0; i < n && i < v.size(); ++i)
        if (std::isfinite(v[i])) s += v[i];
    return s;
}

QString signedNats(double v, int decimals = 3) {
    return (v > 0 ? QStringLiteral("+") : QString()) + QString::number(v, 'f', decimals);
}

}  // namespace

TokenLossStrip::TokenLossStrip(QWidget* parent) : QCustomPlot(parent) {
    setObjectName(QStringLiteral("loss-strip"));
    // Its height comes out of the heatmap's minimum (routing_heatmap.cpp): a short window squeezes both.
    setMinimumHeight(40);
    setMaximumHeight(80);
    setSizePolicy(QSizePolicy::Expanding, QSizePolicy::Preferred);
    setInteractions({});
    setMouseTracking(true);
    axisRect()->setAutoMargins(QCP::msNone);
    axisRect()->setMargins(QMargins(60, 18, 10, 2));
    xAxis->setVisible(false);
    yAxis->setTickLabelFont(QFont(font().family(), std::max(7, font().pointSize() - 2)));
    yAxis->ticker()->setTickCount(2);
    yAxis->setPadding(2);
    up_ = new QCPBars(xAxis, yAxis);
    down_ = new QCPBars(xAxis, yAxis);
    for (QCPBars* b : {up_, down_}) {
        b->setWidth(0.8);
        b->setPen(Qt::NoPen);
        b->setAntialiased(false);
    }
    heading_ = new QCPItemText(this);
    heading_->setClipToAxisRect(false);
    heading_->position->setType(QCPItemPosition::ptAbsolute);
    heading_->setPositionAlignment(Qt::AlignLeft | Qt::AlignTop);
    heading_->setPadding(QMargins(0, 1, 0, 0));
    rebuild();
}

QSize TokenLossStrip::sizeHint() const { return QSize(QCustomPlot::sizeHint().width(), 72); }

void TokenLossStrip::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    rebuild();
}

void TokenLossStrip::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(this);
    xAxis->setVisible(false);
    rebuild();
}

void TokenLossStrip::alignColumns(const QCPRange& tokens, int left, int right) {
    const QMargins m(std::max(0, left), 18, std::max(0, width() - right), 2);
    if (xAxis->range() == tokens && axisRect()->margins() == m) return;
    xAxis->setRange(tokens);
    axisRect()->setMargins(m);
    heading_->position->setCoords(m.left(), 1);
    replot(QCustomPlot::rpQueuedReplot);
}

double TokenLossStrip::barValue(int t) const {
    if (!snapshot_ || !snapshot_->hasLosses() || t < 0 || t >= snapshot_->tokens()) return kNaN;
    const auto i = static_cast<std::size_t>(t);
    const double loss = snapshot_->trace.token_loss[i];
    switch (shows_) {
    case Shows::AgainstBaseline: return loss - snapshot_->baseline_token_loss[i];
    case Shows::AgainstReference: return loss - snapshot_->reference_token_loss[i];
    case Shows::Loss: return loss;
    case Shows::Nothing: break;
    }
    return kNaN;
}

QString TokenLossStrip::heading() const {
    if (!snapshot_ || snapshot_->empty()) return {};
    if (!snapshot_->hasLosses())
        return snapshot_->generated_from >= 0
                   ? tr("loss of the next token: not computed for a generation's view (Run › Re-run shows it)")
                   : tr("loss of the next token: computing…");
    const auto n = snapshot_->trace.token_loss.size() - 1;  // the last position has no next token
    if (n == 0) return tr("loss of the next token: one token has none");
    const double mine = sumOf(snapshot_->trace.token_loss, n);
    switch (shows_) {
    case Shows::AgainstBaseline: {
        const double base = sumOf(snapshot_->baseline_token_loss, n);
        return tr("Δ loss from the forced decisions: %1 nats summed over %2 positions (%3 → %4 each)")
            .arg(signedNats(mine - base))
            .arg(n)
            .arg(base / double(n), 0, 'f', 3)
            .arg(mine / double(n), 0, 'f', 3);
    }
    case Shows::AgainstReference: {
        const double ref = sumOf(snapshot_->reference_token_loss, n);
        return tr("loss − %1's: %2 nats summed over %3 positions (%4 against %5 each)")
            .arg(QString::fromStdString(snapshot_->reference_name))
            .arg(signedNats(mine - ref))
            .arg(n)
            .arg(mine / double(n), 0, 'f', 3)
            .arg(ref / double(n), 0, 'f', 3);
    }
    case Shows::Loss:
    case Shows::Nothing: break;
    }
    return tr("loss of the next token: %1 nats each over %2 positions (%3 summed)")
        .arg(mine / double(n), 0, 'f', 3)
        .arg(n)
        .arg(mine, 0, 'f', 2);
}

void TokenLossStrip::rebuild() {
    const bool losses = snapshot_ && snapshot_->hasLosses();
    const auto T = losses ? static_cast<std::size_t>(snapshot_->tokens()) : 0;
    shows_ = !losses                                          ? Shows::Nothing
             : snapshot_->baseline_token_loss.size() == T     ? Shows::AgainstBaseline
             : snapshot_->reference_token_loss.size() == T    ? Shows::AgainstReference
                                                              : Shows::Loss;
    QVector<double> keys, ups, downs;
    double lo = 0.0, hi = 0.0;
    for (int t = 0; t < int(T); ++t) {
        const double v = barValue(t);
        if (!std::isfinite(v)) continue;
        keys << t;
        ups << std::max(v, 0.0);
        downs << std::min(v, 0.0);
        lo = std::min(lo, v), hi = std::max(hi, v);
    }
    up_->setData(keys, ups, true);
    down_->setData(keys, downs, true);
    const bool diverging = shows_ == Shows::AgainstBaseline || shows_ == Shows::AgainstReference;
    // A loss is drawn in the colour of processed work; a change red where it rose, blue where it fell.
    const QColor rise = diverging ? QColor(0xd6, 0x60, 0x4d) : theme_.processed.isValid() ? theme_.processed : QColor(0x44, 0x77, 0xaa);
    up_->setBrush(rise);
    down_->setBrush(QColor(0x43, 0x93, 0xc3));
    if (diverging) {
        const double m = std::max({std::abs(lo), std::abs(hi), 1e-3});
        yAxis->setRange(-m * 1.05, m * 1.05);
    } else {
        yAxis->setRange(0.0, std::max(hi, 1e-3) * 1.05);
    }
    yAxis->setVisible(losses);
    heading_->setText(heading());
    heading_->setColor(theme_.foreground.isValid() ? theme_.foreground : QColor(Qt::black));
    replot(QCustomPlot::rpQueuedReplot);
}

int TokenLossStrip::tokenAt(const QPoint& pos) const {
    if (!snapshot_ || !axisRect()->rect().contains(pos)) return -1;
    const int t = static_cast<int>(std::lround(xAxis->pixelToCoord(pos.x())));
    return t >= 0 && t < snapshot_->tokens() ? t : -1;
}

QString TokenLossStrip::tokenSummary(int t) const {
    if (!snapshot_ || !snapshot_->hasLosses() || t < 0 || t >= snapshot_->tokens()) return {};
    const auto i = static_cast<std::size_t>(t);
    const auto& s = *snapshot_;
    const QString here = pieceLabel(s.pieces[i], 16);
    if (t + 1 == s.tokens())
        return tr("position %1 %2: the last token, nothing follows to predict").arg(t).arg(here);
    const double loss = s.trace.token_loss[i];
    QStringList lines;
    lines << tr("position %1 %2 → next %3").arg(t).arg(here, pieceLabel(s.pieces[i + 1], 16));
    lines << tr("loss %1 nats (p = %2)").arg(loss, 0, 'f', 3).arg(std::exp(-loss), 0, 'f', 3);
    if (shows_ == Shows::AgainstBaseline)
        lines << tr("without the forced decisions: %1 (Δ %2)")
                     .arg(s.baseline_token_loss[i], 0, 'f', 3)
                     .arg(signedNats(loss - s.baseline_token_loss[i]));
    if (s.reference_token_loss.size() == s.trace.token_loss.size())
        lines << tr("%1: %2 (Δ %3)")
                     .arg(QString::fromStdString(s.reference_name))
                     .arg(s.reference_token_loss[i], 0, 'f', 3)
                     .arg(signedNats(loss - s.reference_token_loss[i]));
    if (s.trace.top_n > 0)
        lines << tr("top %1: %2").arg(s.trace.top_n).arg(topPredictionsText(s.trace.top_ids, s.trace.top_probs, s.top_pieces, s.trace.top_n, t));
    if (shows_ == Shows::AgainstBaseline && s.trace.top_n > 0)
        lines << tr("without them: %1").arg(topPredictionsText(s.baseline_top_ids, s.baseline_top_probs,
                                                               s.baseline_top_pieces, s.trace.top_n, t));
    return lines.join(QLatin1Char('\n'));
}

void TokenLossStrip::mouseMoveEvent(QMouseEvent* event) {
    QCustomPlot::mouseMoveEvent(event);
    const int t = tokenAt(event->pos());
    if (t >= 0)
        QToolTip::showText(event->globalPosition().toPoint(), tokenSummary(t), this);
    else
        QToolTip::hideText();
    Q_EMIT tokenHovered(t);
}

void TokenLossStrip::leaveEvent(QEvent* event) {
    QCustomPlot::leaveEvent(event);
    Q_EMIT tokenHovered(-1);
}

}  // namespace modscope
