// CapacityChart: per layer, tokens processed against the capacity k (bars), and the compute this run
// spent against the dense model: FLOPs and KV cache, as percentages.
#pragma once

#include <QWidget>

#include "plot_theme.h"
#include "routing_snapshot.h"

class QCustomPlot;
class QCPBars;
class QCPTextElement;

namespace modscope {

class ExpertLoadChart;
class RatioMeter;
class TokenAxisTicker;

class CapacityChart : public QWidget {
    Q_OBJECT
public:
    explicit CapacityChart(QWidget* parent = nullptr);

    void setSnapshot(SnapshotPtr snapshot);
    // During generation the KV cache grows token by token; this overrides the prompt's estimate.
    void setGenerationKvCache(std::int64_t bytes, std::int64_t dense_bytes);
    void setTheme(const PlotTheme& theme);

    QCustomPlot* plot() const { return plot_; }
    RatioMeter* flopsMeter() const { return flops_; }
    RatioMeter* kvMeter() const { return kv_; }
    // Mixture layers' expert loads (hidden for a model without mixtures).
    ExpertLoadChart* expertLoad() const { return experts_; }
    // Processed tokens per layer as the bars show them (for tests).
    QVector<double> processedBars() const;
    QString subtitle() const;  // the chart's title lines, as its exported figure shows them

protected:
    bool eventFilter(QObject* watched, QEvent* event) override;

private:
    void updateSubtitle();

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    QCustomPlot* plot_;
    QCPBars* capacity_;
    QCPBars* routed_;
    QCPBars* full_;
    QCPTextElement* subtitle_;
    QSharedPointer<TokenAxisTicker> ticker_;
    RatioMeter* flops_;
    RatioMeter* kv_;
    ExpertLoadChart* experts_;
    bool generation_kv_ = false;
};

}  // namespace modscope
