#include "routing_diff_view.h"

#include <QLabel>
#include <QVBoxLayout>

#include <qcustomplot.h>

namespace modscope {
namespace {

// One colour per cell code, kFull first: the gradient's levels land exactly on these stops.
struct DiffColors {
    QColor full, neither, live_only, pinned_only, both, expert_changed;
};

DiffColors colorsFor(const PlotTheme& theme) {
    DiffColors c;
    c.full = theme.full_layer;
    c.neither = theme.background;
    // Orange and blue stay apart for the common colour-vision deficiencies; "both" is a dark neutral so
    // that only the differences draw the eye, and it cannot be taken for the pale full-layer rows.
    c.live_only = theme.dark ? QColor(0xff, 0xa3, 0x48) : QColor(0xe6, 0x61, 0x00);
    c.pinned_only = theme.dark ? QColor(0x62, 0xa0, 0xea) : QColor(0x1a, 0x5f, 0xb4);
    c.both = theme.dark ? QColor(0xde, 0xdd, 0xda) : QColor(0x5e, 0x5c, 0x64);
    // A purple apart from both: the same decision, another expert.
    c.expert_changed = theme.dark ? QColor(0xdc, 0x8a, 0xdd) : QColor(0x91, 0x41, 0xac);
    return c;
}

QString swatch(const QColor& color, const QString& text, bool hollow = false) {
    return QStringLiteral("<span style=\"color:%1\">%2</span>&nbsp;%3")
        .arg(color.name(), hollow ? QStringLiteral("&#9633;") : QStringLiteral("&#9632;"), text.toHtmlEscaped());
}

}  // namespace

RoutingDiffView::RoutingDiffView(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(6, 4, 6, 4);
    layout->setSpacing(2);
    summary_ = new QLabel(this);
    summary_->setObjectName(QStringLiteral("diff-summary"));
    summary_->setWordWrap(true);
    summary_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    plot_ = new QCustomPlot(this);
    plot_->setMinimumHeight(70);
    legend_ = new QLabel(this);
    legend_->setTextFormat(Qt::RichText);
    layout->addWidget(summary_);
    layout->addWidget(plot_, 1);
    layout->addWidget(legend_);

    map_ = new QCPColorMap(plot_->xAxis, plot_->yAxis);
    map_->setInterpolate(false);
    map_->setTightBoundary(false);  // cells centred on whole positions, as in the heatmap
    plot_->yAxis->setLabel(tr("layer"));
    plot_->xAxis->setLabel(tr("position"));
    auto ticker = QSharedPointer<QCPAxisTickerFixed>::create();
    ticker->setTickStep(1.0);
    ticker->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
    ticker->setTickCount(3);  // the rows are short: a few layer labels, not one each
    plot_->yAxis->setTicker(ticker);
    auto xticker = QSharedPointer<QCPAxisTickerFixed>::create();
    xticker->setTickStep(1.0);
    xticker->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
    plot_->xAxis->setTicker(xticker);
    for (QCPAxis* a : {plot_->xAxis, plot_->yAxis}) {
        a->setSubTicks(false);
        a->grid()->setVisible(false);
    }
    // Only the tokens pan and zoom, as in the heatmap (the layers always fit).
    plot_->setInteractions(QCP::iRangeDrag | QCP::iRangeZoom);
    plot_->axisRect()->setRangeDrag(Qt::Horizontal);
    plot_->axisRect()->setRangeZoom(Qt::Horizontal);
    setTheme(PlotTheme::fromPalette(palette()));
    refill();
}

void RoutingDiffView::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(plot_);
    const DiffColors c = colorsFor(theme_);
    QCPColorGradient g;
    g.clearColorStops();
    g.setColorStopAt(0.0, c.full);
    g.setColorStopAt(0.2, c.neither);
    g.setColorStopAt(0.4, c.live_only);
    g.setColorStopAt(0.6, c.pinned_only);
    g.setColorStopAt(0.8, c.both);
    g.setColorStopAt(1.0, c.expert_changed);
    g.setLevelCount(6);
    map_->setGradient(g);
    map_->setDataRange(QCPRange(RoutingDiff::kFull, RoutingDiff::kExpertChanged));
    updateLegend();
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void RoutingDiffView::setSnapshots(SnapshotPtr live, SnapshotPtr pinned) {
    const int old_tokens = diff_.tokens;
    live_ = std::move(live);
    pinned_ = std::move(pinned);
    diff_ = live_ && pinned_ ? RoutingDiff::of(*live_, *pinned_) : RoutingDiff{};
    refill();
    if (diff_.tokens != old_tokens) plot_->xAxis->setRange(-0.5, std::max(diff_.tokens, 1) - 0.5);
    plot_->yAxis->setRange(-0.5, std::max(diff_.layers, 1) - 0.5);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void RoutingDiffView::refill() {
    const int T = diff_.tokens, L = diff_.layers;
    map_->data()->setSize(std::max(T, 1), std::max(L, 1));
    map_->data()->setRange(QCPRange(0, std::max(T - 1, 0)), QCPRange(0, std::max(L - 1, 0)));
    map_->data()->fill(RoutingDiff::kNeither);
    for (int l = 0; l < L; ++l)
        for (int t = 0; t < T; ++t) map_->data()->setCell(t, l, diff_.at(l, t));
    map_->setVisible(T > 0 && L > 0);
    summary_->setText(summaryText());
}

QString RoutingDiffView::summaryText() const {
    if (!pinned_) return tr("Nothing pinned: Run › Pin Run (Ctrl+P) freezes the run shown for comparison.");
    if (!live_ || diff_.tokens == 0 || diff_.layers == 0) return tr("No cells in common to compare.");
    QString text = tr("%1 of %2 routed cells differ; live processes %3, pinned %4")
                       .arg(diff_.differing)
                       .arg(diff_.routed_cells)
                       .arg(diff_.live_processed)
                       .arg(diff_.pinned_processed);
    if (diff_.expert_cells > 0)
        text += tr("; in mixture layers %1 of %2 tokens processed in both ran another expert (or one run's MLP did not run)")
                    .arg(diff_.expert_differing)
                    .arg(diff_.expert_cells);
    QStringList notes;
    if (diff_.tokensTruncated())
        notes << tr("the first %1 positions only (live %2 tokens, pinned %3)")
                     .arg(diff_.tokens)
                     .arg(diff_.live_tokens)
                     .arg(diff_.pinned_tokens);
    if (diff_.layersTruncated())
        notes << tr("the first %1 layers only (live %2, pinned %3)").arg(diff_.layers).arg(diff_.live_layers).arg(diff_.pinned_layers);
    if (!notes.isEmpty()) text += tr(" — compared over %1").arg(notes.join(tr(" and ")));
    return text;
}

void RoutingDiffView::updateLegend() {
    const DiffColors c = colorsFor(theme_);
    // "Skipped in both" is the canvas colour, which would vanish on the legend's background: an outline.
    legend_->setText(QStringList{swatch(c.live_only, tr("processed only live")),
                                 swatch(c.pinned_only, tr("processed only pinned")),
                                 swatch(c.both, tr("processed in both")), swatch(theme_.muted, tr("skipped in both"), /*hollow=*/true),
                                 swatch(c.full, tr("full layer (no router)")),
                                 swatch(c.expert_changed, tr("another expert"))}
                         .join(QStringLiteral("&nbsp;&nbsp;&nbsp;")));
}

}  // namespace modscope
