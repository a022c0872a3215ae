#include "routing_heatmap.h"

#include <QContextMenuEvent>
#include <QMenu>
#include <QToolTip>

#include <algorithm>
#include <cmath>
#include <limits>

#include "color_maps.h"
#include "figure_export.h"
#include "heatmap_legend.h"
#include "heatmap_overlay.h"
#include "piece_text.h"
#include "token_axis_ticker.h"

namespace modscope {
namespace {

constexpr double kMinVisibleTokens = 4.0;

QString layerLabel(const RunTrace& run, const LayerTrace& layer) {
    const double capacity = layerCapacity(run, layer);
    if (layer.routed && capacity != run.capacity)  // a capacity of its own, which the title does not give
        return QStringLiteral("L%1 %2%%3").arg(layer.index).arg(capacity * 100.0, 0, 'g', 4).arg(layer.moe ? QStringLiteral(" MoE") : QString());
    // A mixture layer: "staged" (MoD routing before it), "MoE" (a full layer's plain mixture) or "MoDE"
    // (integrated: no-op choices among its experts).
    if (layer.moe)
        return QStringLiteral("L%1 %2").arg(layer.index).arg(layer.routed ? QStringLiteral("staged")
                                                             : layer.noop_experts > 0 ? QStringLiteral("MoDE")
                                                                                      : QStringLiteral("MoE"));
    return QStringLiteral("L%1 %2").arg(layer.index).arg(layer.routed ? QStringLiteral("routed") : QStringLiteral("full"));
}

QString number(double v, int decimals = 3) {
    return std::isfinite(v) ? QString::number(v, 'f', decimals) : QStringLiteral("–");
}

}  // namespace

QString ownLayerCapacities(const RunTrace& run) {
    QStringList own;
    for (const auto& l : run.layers)
        if (l.routed && layerCapacity(run, l) != run.capacity)
            own << QStringLiteral("L%1 %2%").arg(l.index).arg(layerCapacity(run, l) * 100.0, 0, 'g', 4);
    return own.join(QStringLiteral(", "));
}

RoutingHeatmap::RoutingHeatmap(QWidget* parent) : QCustomPlot(parent) {
    setNoAntialiasingOnDrag(true);
    setPlottingHint(QCP::phCacheLabels, true);
    setMouseTracking(true);
    setFocusPolicy(Qt::StrongFocus);
    setMinimumSize(320, 180);  // the loss strip above it (token_loss_strip.h) takes the other 40

    // The overlay repaints alone (hover, selection) from its own buffer, above the colour map.
    addLayer(QStringLiteral("marks"), layer(QStringLiteral("main")), QCustomPlot::limAbove);
    layer(QStringLiteral("marks"))->setMode(QCPLayer::lmBuffered);

    plotLayout()->insertRow(0);
    legend_ = new HeatmapLegend(this);
    plotLayout()->addElement(0, 0, legend_);
    plotLayout()->setRowStretchFactor(0, 0.001);

    map_ = new QCPColorMap(xAxis, yAxis);
    map_->setInterpolate(false);
    map_->setTightBoundary(false);
    scale_ = new QCPColorScale(this);
    plotLayout()->addElement(1, 1, scale_);
    scale_->setType(QCPAxis::atRight);
    scale_->setBarWidth(12);
    scale_->axis()->setLabel(QStringLiteral("router logit"));
    scale_ticker_ = scale_->axis()->ticker();
    map_->setColorScale(scale_);
    auto* group = new QCPMarginGroup(this);
    axisRect()->setMarginGroup(QCP::msBottom | QCP::msTop, group);
    scale_->setMarginGroup(QCP::msBottom | QCP::msTop, group);

    overlay_ = new HeatmapOverlay(this, axisRect());

    token_ticker_.reset(new TokenAxisTicker);
    xAxis->setTicker(token_ticker_);
    xAxis->setTickLabelRotation(-90);
    xAxis->setSubTicks(false);
    xAxis->grid()->setVisible(false);
    xAxis->setTickLength(0, 3);
    position_ticker_.reset(new TokenAxisTicker);
    xAxis2->setVisible(true);
    xAxis2->setTicker(position_ticker_);
    xAxis2->setSubTicks(false);
    xAxis2->grid()->setVisible(false);
    xAxis2->setLabel(QStringLiteral("token position"));
    xAxis2->setTickLength(0, 3);
    layer_ticker_.reset(new TokenAxisTicker);
    yAxis->setTicker(layer_ticker_);
    yAxis->setSubTicks(false);
    yAxis->grid()->setVisible(false);
    yAxis->setTickLength(0, 3);
    yAxis->setLabel(QStringLiteral("layer"));

    axisRect()->setRangeDrag(Qt::Horizontal);
    axisRect()->setRangeZoom(Qt::Horizontal);
    setInteractions(QCP::iRangeDrag | QCP::iRangeZoom);
    connect(xAxis, qOverload<const QCPRange&>(&QCPAxis::rangeChanged), this,
            &RoutingHeatmap::onTokenRangeChanged);
    // Tick label steps depend on the axis rect's size, known only once the layout ran.
    connect(this, &QCustomPlot::afterReplot, this, [this] { painted_ = true; });
    connect(this, &QCustomPlot::afterLayout, this, [this] {
        const bool ticks = updateTickSteps();
        const bool bins = updateBinning();
        if (ticks || bins) replot(QCustomPlot::rpQueuedReplot);
    });

    setTheme(PlotTheme::fromPalette(palette()));
    setSnapshot(nullptr);
}

void RoutingHeatmap::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(this);
    map_->setGradient(viridisGradient(theme_.full_layer));
    scale_->setGradient(map_->gradient());
    overlay_->setTheme(theme_);
    legend_->setTheme(theme_);
    // Alpha depends on the theme: refill so skipped cells fade into this canvas.
    fillColorMap();
    replot(QCustomPlot::rpQueuedReplot);
}

void RoutingHeatmap::setCompact(bool compact) {
    if (compact_ == compact) return;
    compact_ = compact;
    xAxis->setTickLabels(!compact);
    xAxis2->setVisible(!compact);
    legend_->setVisible(!compact);  // the title and the key are the live heatmap's
    replot(QCustomPlot::rpQueuedReplot);
}

void RoutingHeatmap::setPlaceholder(const QString& text) {
    overlay_->setPlaceholder(text);
    replotOverlay();
}

void RoutingHeatmap::setStale(bool stale) {
    if (stale_ == stale) return;
    stale_ = stale;
    overlay_->setStale(stale);
    replotOverlay();
}

void RoutingHeatmap::setSnapshot(SnapshotPtr snapshot, bool repaint_now) {
    const int old_tokens = snapshot_ ? snapshot_->tokens() : 0;
    const int old_layers = snapshot_ ? snapshot_->layers() : 0;
    const QCPRange old_range = xAxis->range();
    snapshot_ = std::move(snapshot);
    overlay_->setSnapshot(snapshot_);
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    const int L = snapshot_ && !snapshot_->empty() ? snapshot_->layers() : 0;

    QVector<QString> pieces, positions, layers;
    pieces.reserve(T);
    positions.reserve(T);
    for (int t = 0; t < T; ++t) {
        pieces.append(tokenLabel(snapshot_->pieces[t], t < int(snapshot_->texts.size()) ? snapshot_->texts[t] : std::string()));
        positions.append(QString::number(t));
    }
    for (int l = 0; l < L; ++l) layers.append(layerLabel(snapshot_->trace, snapshot_->trace.layers[l]));
    layer_labels_long_ = std::move(layers);
    layer_labels_dirty_ = true;  // updateTickSteps picks long or short labels
    token_ticker_->setLabels(std::move(pieces));
    // Thinned labels go to the tokens the most layers processed.
    QVector<int> priorities;
    if (snapshot_) priorities = QVector<int>(snapshot_->depth.begin(), snapshot_->depth.end());
    token_ticker_->setPriorities(priorities.size() == T ? std::move(priorities) : QVector<int>());
    position_ticker_->setLabels(std::move(positions));
    overlay_->setShowDisagreement(snapshot_ && snapshot_->routedLayerCount() > 0);
    legend_->setShowDisagreement(snapshot_ && snapshot_->routedLayerCount() > 0);
    {
        bool mixture = false, noop = false;
        for (const auto& l : snapshot_ ? snapshot_->trace.layers : std::vector<LayerTrace>{})
            mixture = mixture || l.moe, noop = noop || (l.moe && l.noop_experts > 0);
        legend_->setMixture(mixture, noop);
    }

    if (sel_token_ >= T || sel_layer_ >= L) {
        sel_layer_ = sel_token_ = -1;
        overlay_->setSelection(-1, -1);
        Q_EMIT selectionCleared();
    }
    hover_layer_ = hover_token_ = -1;
    overlay_->setHover(-1, -1);

    updateTitle();
    yAxis->setRange(-0.5, std::max(L, 1) - 0.5);
    // Keep the user's zoom while typing or streaming; a new model or a shorter text shows everything.
    const bool keep = T > 0 && L == old_layers && old_tokens > 0 && T >= old_tokens &&
                      old_range.size() < old_tokens - 0.01;
    if (keep) {
        // Streaming: follow the newest token when it was in view.
        if (old_range.upper >= old_tokens - 1.0 && T > old_tokens) {
            const double shift = T - old_tokens;
            xAxis->setRange(old_range.lower + shift, old_range.upper + shift);
        } else {
            onTokenRangeChanged(old_range);
        }
    } else {
        xAxis->setRange(-0.5, std::max(T, 1) - 0.5);
    }
    bin_ = tokensPerBinFor(xAxis->range());
    fillColorMap();
    updateTickSteps();
    replot(repaint_now && isVisible() ? QCustomPlot::rpImmediateRefresh : QCustomPlot::rpQueuedReplot);
}

int RoutingHeatmap::tokensPerBinFor(const QCPRange& range) const {
    // More tokens in view than pixels: a pixel column shows a bin of tokens instead of every other token
    // (nearest-neighbour scaling would silently drop columns, and with them processed cells).
    const double pixels = std::max(1, axisRect()->width());
    const double visible = std::max(1.0, range.size());
    return std::max(1, int(std::ceil(visible / pixels)));
}

void RoutingHeatmap::fillColorMap() {
    auto* data = map_->data();
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    const int L = snapshot_ && !snapshot_->empty() ? snapshot_->layers() : 0;
    if (T == 0 || L == 0) {
        data->setSize(0, 0);
        map_->setVisible(false);
        scale_->setVisible(false);
        bin_ = 1;
        return;
    }
    map_->setVisible(true);
    scale_->setVisible(true);
    const int n = std::max(1, bin_);
    const int bins = (T + n - 1) / n;
    // QCPColorMap spreads keySize cells over keyRange: one cell would have no width, so a single column or
    // layer is drawn as two identical half cells.
    const int kx = bins == 1 ? 2 : bins, ky = L == 1 ? 2 : L;
    data->setSize(kx, ky);
    const double first_center = (std::min(n, T) - 1) / 2.0;
    data->setRange(bins == 1 ? QCPRange(first_center - 0.25 * n, first_center + 0.25 * n)
                             : QCPRange(first_center, first_center + double(bins - 1) * n),
                   L == 1 ? QCPRange(-0.25, 0.25) : QCPRange(0, L - 1));
    const double nan = std::numeric_limits<double>::quiet_NaN();
    // Each layer's range of finite logits over this run and the companion run.
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<double> layer_lo(L, inf), layer_hi(L, -inf);
    for (const auto* s : {snapshot_.get(), companion_.get()}) {
        if (s == nullptr || s->empty()) continue;
        for (int l = 0; l < std::min(L, s->layers()); ++l)
            for (const float v : s->trace.layers[l].router_logits)
                if (std::isfinite(v)) layer_lo[l] = std::min(layer_lo[l], double(v)), layer_hi[l] = std::max(layer_hi[l], double(v));
    }
    double lo = inf, hi = -inf;
    for (int l = 0; l < L; ++l) lo = std::min(lo, layer_lo[l]), hi = std::max(hi, layer_hi[l]);
    const auto widen = [](double& a, double& b) {
        if (!(a < b)) {
            a = std::isfinite(a) ? a - 1.0 : -1.0;
            b = std::isfinite(b) ? b + 1.0 : 1.0;
        }
    };
    widen(lo, hi);
    layer_ranges_.assign(L, QCPRange(lo, hi));
    for (int l = 0; l < L; ++l) {
        widen(layer_lo[l], layer_hi[l]);
        layer_ranges_[l] = QCPRange(layer_lo[l], layer_hi[l]);
    }
    values_shown_ = show_values_ && snapshot_->trace.decision_values;
    if (values_shown_) {
        fillDecisionValues(kx, ky, bins, n);
        return;
    }
    map_->setGradient(viridisGradient(theme_.full_layer));
    scale_->setGradient(map_->gradient());
    const bool per_layer = color_scale_.mode == HeatmapColorScale::Mode::PerLayer;
    const auto skipped_alpha = static_cast<unsigned char>(theme_.skipped_alpha);
    for (int ly = 0; ly < ky; ++ly) {
        const auto& layer = snapshot_->trace.layers[L == 1 ? 0 : ly];
        const bool has_logits = layer.routed && layer.router_logits.size() == std::size_t(T);
        for (int bx = 0; bx < kx; ++bx) {
            const int b = bins == 1 ? 0 : bx;
            if (!has_logits) {
                data->setCell(bx, ly, nan);
                data->setAlpha(bx, ly, 255);
                continue;
            }
            // A bin shows its most decisive token: the largest logit among those processed, else among all;
            // it is opaque when any token in it was processed, more so the more were.
            const int t0 = b * n, t1 = std::min(T, t0 + n);
            double best_all = -std::numeric_limits<double>::infinity(), best_processed = best_all;
            int processed = 0;
            for (int t = t0; t < t1; ++t) {
                const double v = layer.router_logits[t];
                if (!std::isfinite(v)) continue;
                best_all = std::max(best_all, v);
                if (t < int(layer.selected.size()) && layer.selected[t]) {
                    ++processed;
                    best_processed = std::max(best_processed, v);
                }
            }
            double v = processed ? best_processed : best_all;
            if (per_layer && std::isfinite(v)) {  // 0 ... 1 over the layer's own range
                const QCPRange& r = layer_ranges_[L == 1 ? 0 : ly];
                v = (v - r.lower) / r.size();
            }
            data->setCell(bx, ly, std::isfinite(v) ? v : nan);
            if (processed == 0) {
                data->setAlpha(bx, ly, skipped_alpha);
            } else if (n == 1) {
                data->setAlpha(bx, ly, 255);
            } else {
                const double f = double(processed) / double(t1 - t0);
                data->setAlpha(bx, ly, static_cast<unsigned char>(std::lround(150.0 + 105.0 * f)));
            }
        }
    }
    shared_range_ = QCPRange(lo, hi);
    switch (color_scale_.mode) {
    case HeatmapColorScale::Mode::Shared: map_->setDataRange(shared_range_); break;
    case HeatmapColorScale::Mode::PerLayer: map_->setDataRange(QCPRange(0.0, 1.0)); break;
    case HeatmapColorScale::Mode::Fixed:
        map_->setDataRange(QCPRange(color_scale_.fixed_min, color_scale_.fixed_max));
        break;
    }
    updateScaleAxis();
}

void RoutingHeatmap::fillDecisionValues(int kx, int ky, int bins, int n) {
    auto* data = map_->data();
    const int T = snapshot_->tokens(), L = snapshot_->layers();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    double extreme = 1e-3;
    for (int ly = 0; ly < ky; ++ly) {
        const auto& layer = snapshot_->trace.layers[L == 1 ? 0 : ly];
        const bool has = layer.routed && layer.decision_value.size() == std::size_t(T);
        for (int bx = 0; bx < kx; ++bx) {
            const int b = bins == 1 ? 0 : bx;
            // A bin shows its most extreme value; skipped tokens are a little lighter, so that the decision
            // still shows under its value.
            double v = nan;
            bool any_processed = false;
            for (int t = b * n; has && t < std::min(T, (b + 1) * n); ++t) {
                const double x = layer.decision_value[t];
                if (std::isfinite(x) && !(std::abs(x) <= std::abs(v))) v = x;
                any_processed = any_processed || layer.selected[t];
            }
            data->setCell(bx, ly, v);
            data->setAlpha(bx, ly, !has || any_processed ? 255 : 185);
            if (std::isfinite(v)) extreme = std::max(extreme, std::abs(v));
        }
    }
    map_->setGradient(decisionValueGradient(theme_.full_layer, theme_.dark));
    scale_->setGradient(map_->gradient());
    map_->setDataRange(QCPRange(-extreme, extreme));
    updateScaleAxis();
}

void RoutingHeatmap::setShowDecisionValues(bool show) {
    if (show == show_values_) return;
    show_values_ = show;
    fillColorMap();
    updateScaleAxis();
    updateTitle();
    replot(QCustomPlot::rpQueuedReplot);
}

bool RoutingHeatmap::showsDecisionValues() const { return values_shown_; }

QString RoutingHeatmap::decisionValueSummary(bool compact) const {
    if (!snapshot_ || !snapshot_->trace.decision_values) return {};
    QStringList parts;
    for (const auto& l : snapshot_->trace.layers) {
        if (!l.routed || l.decision_value.empty()) continue;
        parts << (compact ? QStringLiteral("L%1 %2/%3").arg(l.index).arg(valuableSelected(l)).arg(l.processed)
                          : QStringLiteral("layer %1 took %2 of its %3 most valuable tokens")
                                .arg(l.index)
                                .arg(valuableSelected(l))
                                .arg(l.processed));
    }
    return (compact ? QStringLiteral("most valuable taken: ") : QString()) + parts.join(QStringLiteral(" · "));
}

void RoutingHeatmap::setColorScale(const HeatmapColorScale& scale) {
    if (scale == color_scale_) return;
    color_scale_ = scale;
    if (!(color_scale_.fixed_min < color_scale_.fixed_max)) color_scale_.fixed_max = color_scale_.fixed_min + 1.0;
    updateScaleAxis();
    fillColorMap();
    replot(QCustomPlot::rpQueuedReplot);
}

void RoutingHeatmap::setScaleCompanion(SnapshotPtr companion) {
    if (companion == companion_) return;
    companion_ = std::move(companion);
    fillColorMap();
    replot(QCustomPlot::rpQueuedReplot);
}

QCPRange RoutingHeatmap::logitRange(int layer) const {
    switch (color_scale_.mode) {
    case HeatmapColorScale::Mode::Fixed: return QCPRange(color_scale_.fixed_min, color_scale_.fixed_max);
    case HeatmapColorScale::Mode::PerLayer:
        if (layer >= 0 && layer < int(layer_ranges_.size())) return layer_ranges_[layer];
        return shared_range_;
    case HeatmapColorScale::Mode::Shared: break;
    }
    return shared_range_;
}

void RoutingHeatmap::updateScaleAxis() {
    auto* axis = scale_->axis();
    if (values_shown_) {
        axis->setTicker(scale_ticker_);
        axis->setLabel(QStringLiteral("decision value (nats; + worth making)"));
    } else if (color_scale_.mode == HeatmapColorScale::Mode::PerLayer) {
        QSharedPointer<QCPAxisTickerText> text(new QCPAxisTickerText);
        text->addTick(0.0, QStringLiteral("min"));
        text->addTick(1.0, QStringLiteral("max"));
        axis->setTicker(text);
        axis->setLabel(QStringLiteral("router logit, each layer's range"));
    } else {
        axis->setTicker(scale_ticker_);
        axis->setLabel(color_scale_.mode == HeatmapColorScale::Mode::Fixed ? QStringLiteral("router logit (fixed)")
                                                                           : QStringLiteral("router logit"));
    }
}

bool RoutingHeatmap::updateBinning() {
    const int n = tokensPerBinFor(xAxis->range());
    if (n == bin_) return false;
    bin_ = n;
    fillColorMap();
    return true;
}

void RoutingHeatmap::updateTitle() {
    if (!snapshot_ || snapshot_->empty()) {
        legend_->setTitle(QStringLiteral("Routing"));
        return;
    }
    const auto& s = *snapshot_;
    const QString own = ownLayerCapacities(s.trace);
    if (show_values_ && s.trace.decision_values) {
        // The values' summary is what this view is for: the rest of the title gives it room.
        QString title = QStringLiteral("%1 %2% · %3 tokens · ")
                            .arg(s.trace.mode == RoutingMode::Causal ? QStringLiteral("Causal") : QStringLiteral("Top-k"))
                            .arg(s.trace.capacity * 100.0, 0, 'g', 4)
                            .arg(s.tokens());
        if (!s.trace.overrides.empty())
            title += QStringLiteral("%1 forced · ").arg(s.trace.overrides.size());
        legend_->setTitle(title + decisionValueSummary(true));
        return;
    }
    QString title = QStringLiteral("%1 routing · capacity %2%%3 · %4 tokens × %5 layers (%6 routed)")
                        .arg(s.trace.mode == RoutingMode::Causal ? QStringLiteral("Causal") : QStringLiteral("Top-k"))
                        .arg(s.trace.capacity * 100.0, 0, 'g', 4)
                        .arg(own.isEmpty() ? QString() : QStringLiteral(" (%1)").arg(own))
                        .arg(s.tokens())
                        .arg(s.layers())
                        .arg(s.routedLayerCount());
    if (s.generated_from >= 0) title += QStringLiteral(" · generated from token %1 on").arg(s.generated_from);
    if (s.truncated) title += QStringLiteral(" · prompt truncated");
    if (!s.trace.overrides.empty())
        title += QStringLiteral(" · %1 forced (%2)")
                     .arg(s.trace.overrides.size())
                     .arg(s.trace.keep_capacity ? QStringLiteral("keeping capacity") : QStringLiteral("exact flips"));
    legend_->setTitle(title);
}

QString RoutingHeatmap::title() const { return legend_->title(); }

QString RoutingHeatmap::placeholder() const { return overlay_->placeholder(); }

QString RoutingHeatmap::exportFigure(const QString& path) {
    overlay_->setCursorShown(false);
    const QString error = exportPlot(this, path);
    overlay_->setCursorShown(true);
    return error;
}

int RoutingHeatmap::columnCount() const {
    if (!snapshot_ || snapshot_->empty()) return 0;
    // Token columns the colour map covers: keySize cells of bin_ tokens each (the last may be partial).
    const int cells = (snapshot_->tokens() + bin_ - 1) / bin_ == 1 ? 1 : map_->data()->keySize();
    return std::min(snapshot_->tokens(), cells * bin_);
}

int RoutingHeatmap::rowCount() const {
    if (!snapshot_ || snapshot_->empty()) return 0;
    return snapshot_->layers() == 1 ? 1 : map_->data()->valueSize();
}

void RoutingHeatmap::onTokenRangeChanged(const QCPRange& range) {
    if (clamping_) return;
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    const double lo_bound = -0.5, hi_bound = std::max(T, 1) - 0.5;
    const double full = hi_bound - lo_bound;
    double size = std::clamp(range.size(), std::min(kMinVisibleTokens, full), full);
    double lo = range.center() - size / 2;
    lo = std::clamp(lo, lo_bound, hi_bound - size);
    const QCPRange clamped(lo, lo + size);
    clamping_ = true;
    if (std::abs(clamped.lower - range.lower) > 1e-9 || std::abs(clamped.upper - range.upper) > 1e-9)
        xAxis->setRange(clamped);
    xAxis2->setRange(clamped);
    clamping_ = false;
    updateTickSteps();
    updateBinning();
}

bool RoutingHeatmap::updateTickSteps() {
    const QFontMetrics fm(xAxis->tickLabelFont());
    const double width = std::max(1, axisRect()->width());
    const double height = std::max(1, axisRect()->height());
    const double px_token = width / std::max(1e-9, xAxis->range().size());
    const double px_layer = height / std::max(1e-9, yAxis->range().size());
    // Rotated piece labels need a line height each; positions need room for their digits.
    const int piece_step = TokenAxisTicker::stepFor(px_token, fm.height() + 3);
    const int digits = int(QString::number(std::max(1, snapshot_ ? snapshot_->tokens() : 1)).size());
    const int position_step = TokenAxisTicker::stepFor(px_token, fm.horizontalAdvance(QString(digits + 2, QLatin1Char('0'))));
    const int layer_step = TokenAxisTicker::stepFor(px_layer, fm.height() + 1);
    const bool changed = piece_step != token_ticker_->step() || position_step != position_ticker_->step() ||
                         layer_step != layer_ticker_->step();
    if (layer_step != layer_ticker_->step() || layer_labels_dirty_) {
        layer_labels_dirty_ = false;
        // Thinned labels name the layer only: "routed"/"full" on every other row would mark one kind only
        // (the rows' colours still tell them apart).
        QVector<QString> labels = layer_labels_long_;
        if (layer_step > 1)
            for (int l = 0; l < labels.size(); ++l) labels[l] = QStringLiteral("L%1").arg(l);
        layer_ticker_->setLabels(std::move(labels));
        // Thinned, the labels go to the rows with the most routed layers among them: the rows a reader
        // looks up (every other layer routed keeps L1, L3, L5 rather than the full ones).
        int best = 0, best_count = -1;
        for (int o = 0; o < layer_step && snapshot_; ++o) {
            int count = 0;
            for (int l = o; l < int(snapshot_->trace.layers.size()); l += layer_step) count += snapshot_->trace.layers[l].routed;
            if (count > best_count) best = o, best_count = count;
        }
        layer_ticker_->setOffset(best);
    }
    token_ticker_->setStep(piece_step);
    position_ticker_->setStep(position_step);
    layer_ticker_->setStep(layer_step);
    return changed;
}

void RoutingHeatmap::resetView() {
    const int T = snapshot_ ? snapshot_->tokens() : 0;
    const int L = snapshot_ && !snapshot_->empty() ? snapshot_->layers() : 0;
    xAxis->setRange(-0.5, std::max(T, 1) - 0.5);
    yAxis->setRange(-0.5, std::max(L, 1) - 0.5);
    replot(QCustomPlot::rpQueuedReplot);
}

QPair<int, int> RoutingHeatmap::cellAt(const QPoint& pos) const {
    if (!snapshot_ || snapshot_->empty() || !axisRect()->rect().contains(pos)) return {-1, -1};
    const int t = int(std::lround(xAxis->pixelToCoord(pos.x())));
    const int l = int(std::lround(yAxis->pixelToCoord(pos.y())));
    if (t < 0 || t >= snapshot_->tokens() || l < 0 || l >= snapshot_->layers()) return {-1, -1};
    return {l, t};
}

QString RoutingHeatmap::cellSummary(int l, int t) const {
    if (!snapshot_ || snapshot_->empty() || l < 0 || t < 0 || l >= snapshot_->layers() || t >= snapshot_->tokens())
        return {};
    const auto& s = *snapshot_;
    const auto& layer = s.trace.layers[l];
    const int T = s.tokens();
    QString html = QStringLiteral("<b>%1</b>&nbsp;&nbsp;token %2 of %3 (id %4)%5<br>")
                       .arg(pieceLabel(s.pieces[t], 40).toHtmlEscaped())
                       .arg(t)
                       .arg(T)
                       .arg(s.trace.token_ids[t])
                       .arg(s.isGenerated(t) ? QStringLiteral(" · generated") : QString());
    const double update = updateRatio(layer, t);
    const QString update_text = std::isfinite(update) ? QStringLiteral("%1 (|Δx| / |x|)").arg(number(update))
                                                      : QStringLiteral("– (not in this trace)");
    if (!layer.routed) {
        html += QStringLiteral("Layer %1 · <b>full</b>: processes every token<br>").arg(l);
        if (layer.moe) return html + mixtureSummary(layer, t);
        return html + QStringLiteral("Decision: <b>processed</b>");
    }
    const bool processed = layer.selected[t];
    const bool in_topk = layer.topk_selected[t];
    const float prob = t < int(layer.predictor_prob.size()) ? layer.predictor_prob[t] : NAN;
    const double capacity = layerCapacity(s.trace, layer);
    const bool own_capacity = capacity != s.trace.capacity;
    html += QStringLiteral("Layer %1 · <b>routed layer</b>: takes k = %2 of the %3 tokens%4<br>")
                .arg(l)
                .arg(layer.k)
                .arg(T)
                .arg(own_capacity ? QStringLiteral(" (its own capacity, %1%)").arg(capacity * 100.0, 0, 'g', 4)
                                  : QString());
    html += QStringLiteral("<table cellspacing=0 cellpadding=1>");
    auto row = [&](const QString& a, const QString& b) {
        html += QStringLiteral("<tr><td>%1&nbsp;&nbsp;</td><td>%2</td></tr>").arg(a, b);
    };
    row(QStringLiteral("router logit"), number(layer.router_logits[t]));
    row(QStringLiteral("gate"), QStringLiteral("%1 (sigmoid of the logit; scales the update)").arg(number(layer.gate(t))));
    row(QStringLiteral("update"), processed ? update_text
                                            : QStringLiteral("%1 (skipped: the token rides the residual stream)")
                                                  .arg(std::isfinite(update) ? number(update) : QStringLiteral("0")));
    row(QStringLiteral("rank"), QStringLiteral("%1 of %2 (0 = highest)").arg(layer.rank[t]).arg(T));
    row(QStringLiteral("top-k threshold"), QStringLiteral("%1 (k-th largest logit)").arg(number(layer.topk_threshold)));
    row(QStringLiteral("in top-k"), in_topk ? QStringLiteral("yes") : QStringLiteral("no"));
    if (const int f = forcedDecision(s.trace, l, t); f >= 0)
        row(QStringLiteral("forced"), f ? QStringLiteral("<b>process</b> (an override; Delete clears it)")
                                        : QStringLiteral("<b>skip</b> (an override; Delete clears it)"));
    if (layer.decision_value.size() == std::size_t(T))
        row(QStringLiteral("decision value"),
            QStringLiteral("%1 nats: the summed loss %2 if this token were %3")
                .arg(number(layer.decision_value[t]))
                .arg(layer.decision_value[t] >= 0 ? QStringLiteral("rises by that") : QStringLiteral("falls by that"))
                .arg(processed ? QStringLiteral("skipped") : QStringLiteral("processed")));
    // Causal mode's rule (docs/MODEL.md), term by term, from what the trace holds of the tokens before t.
    const auto& c = s.config;
    const bool budget = c.predictor_budget_gain > 0.0, prefix = c.predictor_prefix_topk;
    if (!budget && !prefix) {
        row(QStringLiteral("predictor p"),
            QStringLiteral("%1 %2 %3 → %4")
                .arg(number(prob))
                .arg(prob > s.predictor_threshold ? QStringLiteral("&gt;") : QStringLiteral("≤"))
                .arg(s.predictor_threshold, 0, 'g', 3)
                .arg(prob > s.predictor_threshold ? QStringLiteral("process") : QStringLiteral("skip")));
    } else {
        row(QStringLiteral("predictor p"), QStringLiteral("%1 (threshold %2)").arg(number(prob)).arg(s.predictor_threshold, 0, 'g', 3));
        if (budget) {
            const auto& decided = layer.predictor_selected;
            const long before = std::count(decided.begin(), decided.begin() + std::min<std::size_t>(t, decided.size()), 1);
            const double allowed = capacity * (t + 1);
            const double shift = c.predictor_budget_gain * (allowed - before);
            row(QStringLiteral("budget"), QStringLiteral("%1 of %2 earlier %3 taken, %4 allowed → logit %5%6")
                                              .arg(before)
                                              .arg(t)
                                              .arg(t == 1 ? QStringLiteral("token") : QStringLiteral("tokens"))
                                              .arg(number(allowed, 2))
                                              .arg(shift >= 0 ? QStringLiteral("+") : QString())
                                              .arg(number(shift, 2)));
            // The score the rule compares: sigmoid(predictor logit + budget shift) against the threshold.
            if (prob > 0.0f && prob < 1.0f) {
                const double score = 1.0 / (1.0 + std::exp(-(std::log(double(prob) / (1.0 - double(prob))) + shift)));
                row(QStringLiteral("combined p"), QStringLiteral("%1 %2 %3")
                                                      .arg(number(score))
                                                      .arg(score > s.predictor_threshold ? QStringLiteral("&gt;")
                                                                                         : QStringLiteral("≤"))
                                                      .arg(s.predictor_threshold, 0, 'g', 3));
            }
        }
        if (prefix) {
            const auto& r = layer.router_logits;
            const long higher = std::count_if(r.begin(), r.begin() + t, [&](float v) { return v > r[t]; });
            const int kt = capacityToK(capacity, t + 1);
            row(QStringLiteral("prefix top-k"), QStringLiteral("%1 earlier %2 higher, top %3 so far → %4")
                                                    .arg(higher)
                                                    .arg(higher == 1 ? QStringLiteral("token ranks") : QStringLiteral("tokens rank"))
                                                    .arg(kt)
                                                    .arg(higher < kt ? QStringLiteral("may process") : QStringLiteral("skip")));
        }
        row(QStringLiteral("causal rule"), layer.predictor_selected.size() > std::size_t(t) && layer.predictor_selected[t]
                                                ? QStringLiteral("process")
                                                : QStringLiteral("skip"));
    }
    html += QStringLiteral("</table>");
    const QString rule = s.trace.mode == RoutingMode::Causal ? QStringLiteral("by the predictor (causal)")
                                                             : QStringLiteral("by top-k");
    html += QStringLiteral("Decision: <b>%1</b> %2").arg(processed ? QStringLiteral("processed") : QStringLiteral("skipped"), rule);
    if (layer.moe) html += QStringLiteral("<br>") + mixtureSummary(layer, t);
    return html;
}

QString RoutingHeatmap::mixtureSummary(const LayerTrace& layer, int t) {
    if (layer.expert.size() <= std::size_t(t)) return {};
    const int E = layer.n_experts;
    const auto choice = [&](int c) {
        return c >= E ? QStringLiteral("no-op %1").arg(c - E) : QStringLiteral("expert %1").arg(c);
    };
    QString html = QStringLiteral("Mixture of %1 experts%2, capacity %3 each (of the %4 tokens that reach it)<br>")
                       .arg(E)
                       .arg(layer.noop_experts > 0 ? QStringLiteral(" and %1 no-op choices").arg(layer.noop_experts) : QString())
                       .arg(layer.expert_capacity)
                       .arg(countMixture(layer).reached);
    const int c = layer.expert_choice[t];
    if (c < 0) return html + QStringLiteral("MLP: <b>did not run</b> (the MoD router kept the token out of the block)");
    html += QStringLiteral("router: %1 (p %2)").arg(choice(c), number(layer.expert_prob[t]));
    if (layer.expert_runner_up[t] >= 0)
        html += QStringLiteral(", runner-up %1 (p %2)").arg(choice(layer.expert_runner_up[t]), number(layer.expert_runner_up_prob[t]));
    html += QStringLiteral("<br>");
    switch (layer.expertFate(t)) {
    case LayerTrace::ExpertFate::Ran:
        return html + QStringLiteral("MLP: <b>expert %1</b>, its output scaled by p").arg(layer.expert[t]);
    case LayerTrace::ExpertFate::NoOp:
        return html + QStringLiteral("MLP: <b>skipped</b> (a no-op choice: the token passes the MLP unchanged)");
    case LayerTrace::ExpertFate::Overflow:
        return html + QStringLiteral("MLP: <b>skipped</b> (overflow: expert %1 had already taken its share of the "
                                     "tokens so far)")
                          .arg(c);
    case LayerTrace::ExpertFate::KeptOut: break;
    }
    return html;
}

void RoutingHeatmap::selectCell(int layer, int token) {
    const bool valid = snapshot_ && !snapshot_->empty() && layer >= 0 && token >= 0 &&
                       layer < snapshot_->layers() && token < snapshot_->tokens();
    if (!valid) layer = token = -1;
    if (layer == sel_layer_ && token == sel_token_) return;
    sel_layer_ = layer;
    sel_token_ = token;
    overlay_->setSelection(layer, token);
    if (valid) {
        // Bring a selection made elsewhere (the text view, the keyboard) into view.
        const QCPRange r = xAxis->range();
        if (token < r.lower + 0.5 || token > r.upper - 0.5) {
            const double size = r.size();
            xAxis->setRange(token - size / 2, token + size / 2);
            replot(QCustomPlot::rpQueuedReplot);
        }
        Q_EMIT cellSelected(layer, token);
    } else {
        Q_EMIT selectionCleared();
    }
    replotOverlay();
}

void RoutingHeatmap::moveSelection(int d_layer, int d_token) {
    if (!snapshot_ || snapshot_->empty()) return;
    int l = sel_layer_ < 0 ? 0 : sel_layer_ + d_layer;
    int t = sel_token_ < 0 ? std::max(0, int(std::ceil(xAxis->range().lower))) : sel_token_ + d_token;
    selectCell(std::clamp(l, 0, snapshot_->layers() - 1), std::clamp(t, 0, snapshot_->tokens() - 1));
}

void RoutingHeatmap::replotOverlay() {
    // Only the overlay's buffer is redrawn; the colour map and axes come from their own buffers (which
    // exist after the first full replot).
    if (!painted_) {
        replot(QCustomPlot::rpQueuedReplot);
        return;
    }
    if (auto* l = layer(QStringLiteral("marks"))) l->replot();
}

void RoutingHeatmap::mousePressEvent(QMouseEvent* event) {
    pressed_ = event->button() == Qt::LeftButton;
    press_pos_ = event->pos();
    QCustomPlot::mousePressEvent(event);
}

void RoutingHeatmap::mouseMoveEvent(QMouseEvent* event) {
    QCustomPlot::mouseMoveEvent(event);
    if (event->buttons() != Qt::NoButton) return;
    const auto [l, t] = cellAt(event->pos());
    if (l == hover_layer_ && t == hover_token_) return;
    hover_layer_ = l;
    hover_token_ = t;
    overlay_->setHover(l, t);
    replotOverlay();
    Q_EMIT cellHovered(l, t);
    if (l >= 0) {
        QToolTip::showText(event->globalPosition().toPoint(), cellSummary(l, t), this);
    } else {
        QToolTip::hideText();
    }
}

void RoutingHeatmap::mouseReleaseEvent(QMouseEvent* event) {
    QCustomPlot::mouseReleaseEvent(event);
    if (!pressed_ || event->button() != Qt::LeftButton) return;
    pressed_ = false;
    if ((event->pos() - press_pos_).manhattanLength() > 4) return;  // a drag, not a click
    const auto [l, t] = cellAt(event->pos());
    if (l < 0) return;
    if (l == sel_layer_ && t == sel_token_) {
        selectCell(-1, -1);  // clicking the locked cell unlocks it
    } else {
        selectCell(l, t);
    }
}

void RoutingHeatmap::mouseDoubleClickEvent(QMouseEvent* event) {
    QCustomPlot::mouseDoubleClickEvent(event);
    if (event->button() == Qt::LeftButton) resetView();
}

void RoutingHeatmap::leaveEvent(QEvent* event) {
    QCustomPlot::leaveEvent(event);
    if (hover_layer_ < 0) return;
    hover_layer_ = hover_token_ = -1;
    overlay_->setHover(-1, -1);
    replotOverlay();
    Q_EMIT cellHovered(-1, -1);
}

void RoutingHeatmap::keyPressEvent(QKeyEvent* event) {
    const QCPRange r = xAxis->range();
    switch (event->key()) {
    case Qt::Key_Left: moveSelection(0, -1); break;
    case Qt::Key_Right: moveSelection(0, 1); break;
    case Qt::Key_Up: moveSelection(1, 0); break;
    case Qt::Key_Down: moveSelection(-1, 0); break;
    case Qt::Key_Escape: selectCell(-1, -1); break;
    case Qt::Key_Home:
    case Qt::Key_0: resetView(); break;
    case Qt::Key_Plus:
    case Qt::Key_Equal: xAxis->scaleRange(0.5, sel_token_ >= 0 ? sel_token_ : r.center()); replot(rpQueuedReplot); break;
    case Qt::Key_Minus: xAxis->scaleRange(2.0, r.center()); replot(rpQueuedReplot); break;
    case Qt::Key_P:
    case Qt::Key_S:
    case Qt::Key_Delete:
    case Qt::Key_Backspace: {
        const bool routed = snapshot_ && sel_layer_ >= 0 && sel_layer_ < snapshot_->layers() &&
                            snapshot_->trace.layers[sel_layer_].routed;
        if (!routed || sel_token_ < 0) {
            QCustomPlot::keyPressEvent(event);
            return;
        }
        const Force action = event->key() == Qt::Key_P   ? Force::Process
                             : event->key() == Qt::Key_S ? Force::Skip
                                                         : Force::Clear;
        Q_EMIT overrideRequested(sel_layer_, sel_token_, action);
        break;
    }
    default: QCustomPlot::keyPressEvent(event); return;
    }
    event->accept();
}

void RoutingHeatmap::contextMenuEvent(QContextMenuEvent* event) {
    if (!snapshot_ || snapshot_->empty()) return;
    auto [l, t] = cellAt(event->pos());
    // Over the layer labels, left of the cells: that layer's row.
    if (l < 0 && event->pos().x() < axisRect()->left() && event->pos().y() >= axisRect()->top() &&
        event->pos().y() <= axisRect()->bottom()) {
        const int row = static_cast<int>(std::lround(yAxis->pixelToCoord(event->pos().y())));
        if (row >= 0 && row < snapshot_->layers()) l = row, t = -1;
    }
    if (l < 0) return;
    const bool routed = snapshot_->trace.layers[l].routed;
    QMenu menu(this);
    if (t >= 0) {
        const QString piece = pieceLabel(snapshot_->pieces[t], 16);
        auto* process = menu.addAction(tr("Process %1 in Layer %2").arg(piece).arg(l));
        process->setShortcut(QKeySequence(Qt::Key_P));
        connect(process, &QAction::triggered, this, [this, l, t] { Q_EMIT overrideRequested(l, t, Force::Process); });
        auto* skip = menu.addAction(tr("Skip %1 in Layer %2").arg(piece).arg(l));
        skip->setShortcut(QKeySequence(Qt::Key_S));
        connect(skip, &QAction::triggered, this, [this, l, t] { Q_EMIT overrideRequested(l, t, Force::Skip); });
        auto* clear = menu.addAction(tr("Clear This Override"));
        clear->setShortcut(QKeySequence(Qt::Key_Delete));
        clear->setEnabled(forcedDecision(snapshot_->trace, l, t) >= 0);
        connect(clear, &QAction::triggered, this, [this, l, t] { Q_EMIT overrideRequested(l, t, Force::Clear); });
        for (QAction* a : {process, skip, clear}) a->setEnabled(a->isEnabled() && routed);
        menu.addSeparator();
    }
    auto* skip_all = menu.addAction(tr("Layer %1: Skip Every Token").arg(l));
    connect(skip_all, &QAction::triggered, this, [this, l] { Q_EMIT overrideRequested(l, -1, Force::Skip); });
    auto* process_all = menu.addAction(tr("Layer %1: Process Every Token").arg(l));
    connect(process_all, &QAction::triggered, this, [this, l] { Q_EMIT overrideRequested(l, -1, Force::Process); });
    auto* clear_layer = menu.addAction(tr("Layer %1: Clear Its Overrides").arg(l));
    connect(clear_layer, &QAction::triggered, this, [this, l] { Q_EMIT overrideRequested(l, -1, Force::Clear); });
    for (QAction* a : {skip_all, process_all, clear_layer}) a->setEnabled(routed);
    if (!routed) menu.addSection(tr("Only a routed layer's decisions can be forced"));
    menu.addSeparator();
    auto* clear_all = menu.addAction(tr("Clear All Overrides"));
    clear_all->setEnabled(!snapshot_->trace.overrides.empty());
    connect(clear_all, &QAction::triggered, this, [this] { Q_EMIT clearOverridesRequested(); });
    menu.exec(event->globalPos());
}

void RoutingHeatmap::resizeEvent(QResizeEvent* event) {
    QCustomPlot::resizeEvent(event);
    updateTickSteps();
}

}  // namespace modscope
