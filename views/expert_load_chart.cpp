#include "expert_load_chart.h"

#include <QHelpEvent>
#include <QToolTip>
#include <QVBoxLayout>

#include <qcustomplot.h>

#include "expert_palette.h"
#include "token_axis_ticker.h"

namespace modscope {

ExpertLoadChart::ExpertLoadChart(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(0, 0, 0, 0);
    plot_ = new QCustomPlot(this);
    plot_->setMinimumHeight(130);  // as the capacity chart beside it
    plot_->setMinimumWidth(180);
    plot_->plotLayout()->insertRow(0);
    subtitle_ = new QCPTextElement(plot_, QString());
    plot_->plotLayout()->addElement(0, 0, subtitle_);
    plot_->plotLayout()->setRowStretchFactor(0, 0.001);
    group_ = new QCPBarsGroup(plot_);
    group_->setSpacingType(QCPBarsGroup::stAbsolute);
    group_->setSpacing(1);
    // Drawn over the bars: every expert of a layer may take up to this many of its tokens.
    capacity_ = new QCPBars(plot_->xAxis, plot_->yAxis);
    capacity_->setName(tr("capacity per expert"));
    capacity_->setWidth(0.84);
    ticker_.reset(new TokenAxisTicker);
    useLayerCountAxes(plot_, ticker_);
    plot_->setMouseTracking(true);
    plot_->installEventFilter(this);
    layout->addWidget(plot_);
    setTheme(PlotTheme::fromPalette(palette()));
    setSnapshot(nullptr);
}

void ExpertLoadChart::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(plot_);
    capacity_->setPen(QPen(theme_.capacity, 1.4, Qt::DashLine));
    capacity_->setBrush(Qt::NoBrush);
    subtitle_->setFont(plot_->font());
    subtitle_->setTextColor(theme_.muted);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void ExpertLoadChart::rebuildBars(int experts) {
    if (experts_.size() == experts) return;
    for (QCPBars* b : experts_) plot_->removePlottable(b);
    experts_.clear();
    for (int e = 0; e < experts; ++e) {
        auto* bars = new QCPBars(plot_->xAxis, plot_->yAxis);
        bars->setName(tr("expert %1").arg(e));
        bars->setWidth(0.8 / std::max(1, experts));
        bars->setPen(Qt::NoPen);
        bars->setBrush(expertColor(e));
        bars->setBarsGroup(group_);
        experts_.append(bars);
    }
    capacity_->setLayer(QStringLiteral("axes"));  // over the expert bars, which were added after it
}

void ExpertLoadChart::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    layers_.clear();
    int E = 0, max_capacity = 1;
    QVector<QString> labels;
    int overflow = 0, noop = 0;
    if (snapshot_ && !snapshot_->empty()) {
        for (const auto& l : snapshot_->trace.layers) {
            if (!l.moe || l.expert_load.empty()) continue;
            layers_.append(l.index);
            E = std::max(E, l.n_experts);
            max_capacity = std::max(max_capacity, l.expert_capacity);
            labels.append(QStringLiteral("L%1").arg(l.index));
            overflow += l.expert_overflow;
            noop += countMixture(l).noop;
        }
    }
    setVisible(!layers_.isEmpty());
    rebuildBars(E);
    QVector<double> keys, caps;
    QVector<QVector<double>> values(E);
    for (int i = 0; i < layers_.size(); ++i) {
        const auto& l = snapshot_->trace.layers[layers_[i]];
        keys.append(i);
        caps.append(l.expert_capacity);
        for (int e = 0; e < E; ++e) values[e].append(e < int(l.expert_load.size()) ? l.expert_load[e] : 0);
    }
    for (int e = 0; e < E; ++e) experts_[e]->setData(keys, values[e], true);
    capacity_->setData(keys, caps, true);
    ticker_->setLabels(labels);
    ticker_->setStep(1);
    plot_->xAxis->setRange(-0.6, std::max<int>(layers_.size(), 1) - 0.4);
    plot_->yAxis->setRange(0, max_capacity * 1.1);
    // Short lines: the chart shares the dock's width. The dashed boxes read as the capacity chart's beside it;
    // the tooltip has each layer's numbers and capacity.
    subtitle_->setText(layers_.isEmpty() ? QString()
                                         : tr("Tokens per expert\noverflow %1%2")
                                               .arg(overflow)
                                               .arg(noop > 0 ? tr(" · no-op %1").arg(noop) : QString()));
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

QString ExpertLoadChart::subtitle() const { return subtitle_->text(); }

QVector<QVector<double>> ExpertLoadChart::loads() const {
    QVector<QVector<double>> out;
    for (QCPBars* b : experts_) {
        QVector<double> v;
        for (auto it = b->data()->constBegin(); it != b->data()->constEnd(); ++it) v.append(it->value);
        out.append(v);
    }
    return out;
}

bool ExpertLoadChart::eventFilter(QObject* watched, QEvent* event) {
    if (watched == plot_ && event->type() == QEvent::ToolTip && snapshot_ && !layers_.isEmpty()) {
        auto* help = static_cast<QHelpEvent*>(event);
        const int i = int(std::lround(plot_->xAxis->pixelToCoord(help->pos().x())));
        if (i >= 0 && i < layers_.size()) {
            const auto& l = snapshot_->trace.layers[layers_[i]];
            QStringList loads;
            for (int e = 0; e < int(l.expert_load.size()); ++e) loads << tr("expert %1: %2").arg(e).arg(l.expert_load[e]);
            QToolTip::showText(help->globalPos(),
                               tr("L%1: %2\ncapacity %3 tokens per expert · overflow %4")
                                   .arg(l.index)
                                   .arg(loads.join(QStringLiteral(", ")))
                                   .arg(l.expert_capacity)
                                   .arg(l.expert_overflow),
                               plot_);
        }
        return true;
    }
    return QWidget::eventFilter(watched, event);
}

}  // namespace modscope
