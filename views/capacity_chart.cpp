#include "capacity_chart.h"

#include <QHelpEvent>
#include <QToolTip>
#include <QHBoxLayout>
#include <QVBoxLayout>

#include <qcustomplot.h>

#include "expert_load_chart.h"
#include "ratio_meter.h"
#include "token_axis_ticker.h"

namespace modscope {
namespace {

QString bytesText(std::int64_t bytes) {
    return QLocale().formattedDataSize(bytes, 1, QLocale::DataSizeTraditionalFormat);
}

QString flopsText(double flops) {
    if (flops >= 1e9) return QStringLiteral("%1 GFLOPs").arg(flops / 1e9, 0, 'f', 2);
    if (flops >= 1e6) return QStringLiteral("%1 MFLOPs").arg(flops / 1e6, 0, 'f', 1);
    return QStringLiteral("%1 kFLOPs").arg(flops / 1e3, 0, 'f', 1);
}

}  // namespace

CapacityChart::CapacityChart(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(6, 6, 6, 6);
    layout->setSpacing(6);
    flops_ = new RatioMeter(tr("FLOPs"), this);
    kv_ = new RatioMeter(tr("KV cache"), this);
    layout->addWidget(flops_);
    layout->addWidget(kv_);

    plot_ = new QCustomPlot(this);
    plot_->setMinimumHeight(130);
    plot_->plotLayout()->insertRow(0);
    subtitle_ = new QCPTextElement(plot_, QString());
    plot_->plotLayout()->addElement(0, 0, subtitle_);
    routed_ = new QCPBars(plot_->xAxis, plot_->yAxis);
    routed_->setName(tr("processed"));
    routed_->setWidth(0.56);
    full_ = new QCPBars(plot_->xAxis, plot_->yAxis);
    full_->setName(tr("full layer (all tokens)"));
    full_->setWidth(0.56);
    // Drawn last, over the bars: k stays visible when causal routing processes more than k.
    capacity_ = new QCPBars(plot_->xAxis, plot_->yAxis);
    capacity_->setName(tr("capacity k"));
    capacity_->setWidth(0.78);
    ticker_.reset(new TokenAxisTicker);
    useLayerCountAxes(plot_, ticker_);
    // The legend gets a row of its own under the bars: inside the axis rect it would cover the full layers.
    plot_->legend->setVisible(true);
    plot_->legend->setFillOrder(QCPLegend::foColumnsFirst);
    plot_->legend->setWrap(3);
    plot_->legend->setIconSize(12, 10);
    plot_->legend->setMargins(QMargins(4, 2, 4, 2));
    plot_->axisRect()->insetLayout()->take(plot_->legend);
    plot_->plotLayout()->addElement(2, 0, plot_->legend);
    plot_->plotLayout()->setRowStretchFactor(0, 0.001);
    plot_->plotLayout()->setRowStretchFactor(2, 0.001);
    plot_->plotLayout()->setRowSpacing(2);
    plot_->setMouseTracking(true);
    plot_->installEventFilter(this);
    // A mixture model's expert loads sit beside the layers' bars: the dock has no height to spare on a laptop.
    auto* charts = new QHBoxLayout;
    charts->setSpacing(4);
    charts->addWidget(plot_, 1);
    experts_ = new ExpertLoadChart(this);
    charts->addWidget(experts_, 1);
    layout->addLayout(charts, 1);

    setTheme(PlotTheme::fromPalette(palette()));
    setSnapshot(nullptr);
}

void CapacityChart::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(plot_);
    capacity_->setPen(QPen(theme_.capacity, 1.4, Qt::DashLine));
    capacity_->setBrush(Qt::NoBrush);
    routed_->setPen(Qt::NoPen);
    routed_->setBrush(theme_.processed);
    full_->setPen(Qt::NoPen);
    full_->setBrush(theme_.full_layer);
    QFont f = plot_->font();
    subtitle_->setFont(f);
    subtitle_->setTextColor(theme_.muted);
    flops_->setTheme(theme_);
    kv_->setTheme(theme_);
    experts_->setTheme(theme_);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void CapacityChart::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    experts_->setSnapshot(snapshot_);
    generation_kv_ = false;
    QVector<double> keys, cap, routed_keys, routed_vals, full_keys, full_vals;
    QVector<QString> labels;
    int T = 0;
    if (snapshot_ && !snapshot_->empty()) {
        T = snapshot_->tokens();
        for (const auto& layer : snapshot_->trace.layers) {
            if (layer.routed) {
                keys.append(layer.index);
                cap.append(layer.k);
            }
            labels.append(QStringLiteral("L%1").arg(layer.index));
            (layer.routed ? routed_keys : full_keys).append(layer.index);
            (layer.routed ? routed_vals : full_vals).append(layer.processed);
        }
    }
    capacity_->setData(keys, cap, true);
    routed_->setData(routed_keys, routed_vals, true);
    full_->setData(full_keys, full_vals, true);
    ticker_->setLabels(labels);
    const int L = int(labels.size());
    ticker_->setStep(L > 16 ? (L > 32 ? 8 : 4) : 1);
    plot_->xAxis->setRange(-0.6, std::max(L, 1) - 0.4);
    // Headroom above T for the legend.
    plot_->yAxis->setRange(0, std::max(T, 1) * 1.05);

    if (snapshot_ && !snapshot_->empty() && snapshot_->trace.dense_flops > 0) {
        const auto& tr_ = snapshot_->trace;
        // At full capacity a MoD model does all a dense one does plus its routers and predictors: more, not
        // "0.99x less".
        const double ratio = tr_.flops / tr_.dense_flops;
        const QString saving = ratio <= 1.0 ? tr("%1× less").arg(1.0 / std::max(ratio, 1e-9), 0, 'f', 2)
                                            : tr("%1% more (routers and predictors)").arg((ratio - 1.0) * 100.0, 0, 'f', 1);
        flops_->setValue(ratio, tr("%1 of %2 · %3").arg(flopsText(tr_.flops), flopsText(tr_.dense_flops), saving));
    } else {
        flops_->clear(tr("no run"));
    }
    if (snapshot_ && snapshot_->dense_kv_cache_bytes > 0) {
        kv_->setValue(double(snapshot_->kv_cache_bytes) / double(snapshot_->dense_kv_cache_bytes),
                      tr("%1 of %2 for these tokens")
                          .arg(bytesText(snapshot_->kv_cache_bytes), bytesText(snapshot_->dense_kv_cache_bytes)));
    } else {
        kv_->clear(tr("no run"));
    }
    updateSubtitle();
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void CapacityChart::setGenerationKvCache(std::int64_t bytes, std::int64_t dense_bytes) {
    if (dense_bytes <= 0) return;
    generation_kv_ = true;
    kv_->setValue(double(bytes) / double(dense_bytes),
                  tr("%1 of %2 while generating").arg(bytesText(bytes), bytesText(dense_bytes)));
    updateSubtitle();
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void CapacityChart::updateSubtitle() {
    if (!snapshot_ || snapshot_->empty()) {
        subtitle_->setText(tr("Tokens processed per layer"));
        return;
    }
    // The exported figure carries the meters' numbers too.
    QString text = tr("Tokens processed per layer, of %1\nFLOPs %2% of dense · KV cache %3% of dense")
                       .arg(snapshot_->tokens())
                       .arg(flops_->fraction() * 100.0, 0, 'f', 1)
                       .arg(kv_->fraction() * 100.0, 0, 'f', 1);
    // k = ceil(capacity x T) is at least 1 (capacityToK): below one token's worth a routed layer still takes
    // one, which the bars would otherwise show without a reason.
    if (snapshot_->routedLayerCount() > 0 && snapshot_->trace.capacity * snapshot_->tokens() < 1.0)
        text += tr("\nk is at least 1: capacity %1% of %2 tokens rounds up to one token per routed layer")
                    .arg(snapshot_->trace.capacity * 100.0, 0, 'g', 3)
                    .arg(snapshot_->tokens());
    subtitle_->setText(text);
}

QString CapacityChart::subtitle() const { return subtitle_->text(); }

QVector<double> CapacityChart::processedBars() const {
    QVector<double> v;
    if (!snapshot_ || snapshot_->empty()) return v;
    v.resize(snapshot_->layers());
    for (auto it = routed_->data()->constBegin(); it != routed_->data()->constEnd(); ++it)
        v[int(it->key)] = it->value;
    for (auto it = full_->data()->constBegin(); it != full_->data()->constEnd(); ++it)
        v[int(it->key)] = it->value;
    return v;
}

bool CapacityChart::eventFilter(QObject* watched, QEvent* event) {
    if (watched == plot_ && event->type() == QEvent::ToolTip && snapshot_ && !snapshot_->empty()) {
        auto* help = static_cast<QHelpEvent*>(event);
        const int l = int(std::lround(plot_->xAxis->pixelToCoord(help->pos().x())));
        if (l >= 0 && l < snapshot_->layers()) {
            const auto& layer = snapshot_->trace.layers[l];
            QToolTip::showText(help->globalPos(),
                               layer.routed ? tr("L%1 (routed): processed %2 of %3 tokens, capacity k = %4")
                                                  .arg(l).arg(layer.processed).arg(snapshot_->tokens()).arg(layer.k)
                                            : tr("L%1 (full): processed all %2 tokens").arg(l).arg(layer.processed),
                               plot_);
        }
        return true;
    }
    return QWidget::eventFilter(watched, event);
}

}  // namespace modscope
