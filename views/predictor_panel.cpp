#include "predictor_panel.h"

#include <QHeaderView>
#include <QLabel>
#include <QTableWidget>
#include <QVBoxLayout>

#include <qcustomplot.h>

#include "color_maps.h"

namespace modscope {
namespace {

enum Column { kLayer, kAccuracy, kPrecision, kRecall, kTp, kFp, kTn, kFn, kColumns };

QTableWidgetItem* cell(const QString& text, bool right = true) {
    auto* item = new QTableWidgetItem(text);
    item->setFlags(Qt::ItemIsEnabled | Qt::ItemIsSelectable);
    item->setTextAlignment((right ? Qt::AlignRight : Qt::AlignLeft) | Qt::AlignVCenter);
    return item;
}

QString percent(double v) { return QStringLiteral("%1%").arg(v * 100.0, 0, 'f', 1); }

// Distinct, colour-blind-safe line colours (Okabe-Ito) for per-layer lines.
QColor lineColor(int i) {
    static const QColor colors[] = {QColor(0, 114, 178), QColor(230, 159, 0), QColor(0, 158, 115),
                                    QColor(204, 121, 167), QColor(86, 180, 233), QColor(213, 94, 0),
                                    QColor(240, 228, 66)};
    return colors[i % 7];
}

}  // namespace

PredictorPanel::PredictorPanel(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(6, 6, 6, 6);
    layout->setSpacing(6);
    header_ = new QLabel(this);
    header_->setWordWrap(true);
    header_->setTextFormat(Qt::RichText);
    layout->addWidget(header_);

    table_ = new QTableWidget(0, kColumns, this);
    table_->setHorizontalHeaderLabels({tr("Layer"), tr("Accuracy"), tr("Precision"), tr("Recall"), tr("TP"),
                                       tr("FP"), tr("TN"), tr("FN")});
    table_->horizontalHeaderItem(kTp)->setToolTip(tr("predictor processes, top-k processes"));
    table_->horizontalHeaderItem(kFp)->setToolTip(tr("predictor processes, top-k skips"));
    table_->horizontalHeaderItem(kTn)->setToolTip(tr("predictor skips, top-k skips"));
    table_->horizontalHeaderItem(kFn)->setToolTip(tr("predictor skips, top-k processes"));
    table_->verticalHeader()->setVisible(false);
    table_->verticalHeader()->setDefaultSectionSize(table_->fontMetrics().height() + 6);
    table_->horizontalHeader()->setSectionResizeMode(QHeaderView::Stretch);
    for (int c : {kLayer, kAccuracy, kPrecision, kRecall})
        table_->horizontalHeader()->setSectionResizeMode(c, QHeaderView::ResizeToContents);
    table_->horizontalHeader()->setMinimumSectionSize(36);
    table_->setVerticalScrollBarPolicy(Qt::ScrollBarAsNeeded);
    table_->setSizePolicy(QSizePolicy::Preferred, QSizePolicy::Maximum);
    table_->setEditTriggers(QAbstractItemView::NoEditTriggers);
    table_->setSelectionMode(QAbstractItemView::NoSelection);
    table_->setFocusPolicy(Qt::NoFocus);
    table_->setAlternatingRowColors(true);
    layout->addWidget(table_);

    plot_ = new QCustomPlot(this);
    plot_->setMinimumHeight(100);
    plot_->xAxis->setLabel(tr("generated token"));
    plot_->yAxis->setLabel(tr("accuracy"));
    plot_->yAxis->setRange(0, 1.05);
    // 0, 0.5 and 1: in the few pixels a laptop screen leaves it, more ticks would print over each other.
    QSharedPointer<QCPAxisTickerFixed> yticks(new QCPAxisTickerFixed);
    yticks->setTickStep(0.5);
    yticks->setScaleStrategy(QCPAxisTickerFixed::ssNone);
    plot_->yAxis->setTicker(yticks);
    plot_->xAxis->setRange(0, 8);
    QSharedPointer<QCPAxisTickerFixed> xticks(new QCPAxisTickerFixed);
    xticks->setTickStep(1);
    xticks->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
    plot_->xAxis->setTicker(xticks);
    plot_->legend->setVisible(true);
    plot_->legend->setFillOrder(QCPLegend::foColumnsFirst);
    plot_->legend->setWrap(5);
    plot_->legend->setIconSize(14, 8);
    plot_->legend->setMargins(QMargins(4, 2, 4, 2));
    plot_->axisRect()->insetLayout()->take(plot_->legend);
    plot_->plotLayout()->addElement(1, 0, plot_->legend);
    plot_->plotLayout()->setRowStretchFactor(1, 0.001);
    plot_->plotLayout()->setRowSpacing(2);
    layout->addWidget(plot_, 1);
    // One graph from the start: an empty legend would pin the plot's width to its own (zero) width.
    plot_->addGraph()->setName(tr("all routed"));
    plot_hint_ = new QCPItemText(plot_);
    plot_hint_->position->setType(QCPItemPosition::ptAxisRectRatio);
    plot_hint_->position->setCoords(0.5, 0.5);
    plot_hint_->setText(tr("Generate (Ctrl+G) to follow the predictor's\naccuracy on each generated token"));
    plot_hint_->setTextAlignment(Qt::AlignCenter);

    setTheme(PlotTheme::fromPalette(palette()));
    setSnapshot(nullptr);
}

void PredictorPanel::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    theme_.apply(plot_);
    plot_hint_->setColor(theme_.muted);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

QString PredictorPanel::summary() const { return header_->text(); }

void PredictorPanel::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    if (!snapshot_ || snapshot_->empty()) {
        header_->setText(tr("No run yet."));
        table_->setRowCount(0);
        fitTable();
        return;
    }
    const auto& s = *snapshot_;
    const int routed = s.routedLayerCount();
    if (routed == 0) {
        header_->setText(tr("This model has no routed layers: every layer processes every token."));
        table_->setRowCount(0);
        fitTable();
        return;
    }
    const bool causal = s.trace.mode == RoutingMode::Causal;
    // Models calibrated with --calibrate-causal correct the predictor with the earlier tokens (docs/MODEL.md).
    const bool corrected = s.config.predictor_budget_gain > 0.0 || s.config.predictor_prefix_topk;
    const QString who = corrected ? tr("the predictor's choices, corrected by budget and prefix rank,")
                                  : tr("the predictor's choices");
    header_->setText(
        tr("<b>Causal predictor vs. top-k</b> at capacity %1% over %2 tokens. %3 Overall accuracy <b>%4</b>.")
            .arg(s.trace.capacity * 100.0, 0, 'g', 4)
            .arg(s.tokens())
            .arg(causal ? tr("Mode <b>causal</b>: %1 ran; top-k is what training would have picked.").arg(who)
                        : tr("Mode <b>top-k</b>: top-k ran; %1 are scored as if they had decided.").arg(who))
            .arg(percent(s.agreement_total.accuracy())));
    table_->setRowCount(routed + 1);
    int row = 0;
    auto fill = [&](int r, const QString& name, const AgreementCounts& a, bool bold) {
        table_->setItem(r, kLayer, cell(name, false));
        table_->setItem(r, kAccuracy, cell(percent(a.accuracy())));
        table_->setItem(r, kPrecision, cell(percent(a.precision())));
        table_->setItem(r, kRecall, cell(percent(a.recall())));
        table_->setItem(r, kTp, cell(QString::number(a.tp)));
        table_->setItem(r, kFp, cell(QString::number(a.fp)));
        table_->setItem(r, kTn, cell(QString::number(a.tn)));
        table_->setItem(r, kFn, cell(QString::number(a.fn)));
        for (int c = 0; c < kColumns; ++c) {
            QFont f = table_->font();
            f.setBold(bold);
            table_->item(r, c)->setFont(f);
        }
        // Accuracy cell tinted with the same scale as everything else that is "good = bright".
        QColor tint = viridis(a.accuracy());
        tint.setAlpha(90);
        table_->item(r, kAccuracy)->setBackground(tint);
    };
    for (const auto& layer : s.trace.layers) {
        if (!layer.routed) continue;
        fill(row++, tr("L%1").arg(layer.index), s.agreement[layer.index], false);
    }
    fill(row, tr("all"), s.agreement_total, true);
    fitTable();
}

void PredictorPanel::fitTable() {
    // At most as tall as its rows (kMaxVisibleRows of them; a 32-layer model scrolls): the space below belongs
    // to the accuracy plot. On a small screen it gives way down to two rows and scrolls, so that the window
    // still fits a laptop's screen.
    constexpr int kMaxVisibleRows = 9, kMinVisibleRows = 2;
    const int frame = table_->horizontalHeader()->sizeHint().height() + 2 * table_->frameWidth();
    int h = frame, min_h = frame;
    for (int r = 0; r < std::min(table_->rowCount(), kMaxVisibleRows); ++r) {
        h += table_->rowHeight(r);
        if (r < kMinVisibleRows) min_h += table_->rowHeight(r);
    }
    table_->setMaximumHeight(h);
    table_->setMinimumHeight(min_h);
}

void PredictorPanel::startGeneration() {
    points_ = 0;
    for (int i = 0; i < plot_->graphCount(); ++i) plot_->graph(i)->data()->clear();
    plot_->xAxis->setRange(0, 8);
    plot_hint_->setVisible(false);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void PredictorPanel::clearGeneration() {
    points_ = 0;
    for (int i = 0; i < plot_->graphCount(); ++i) plot_->graph(i)->data()->clear();
    plot_hint_->setVisible(true);
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

void PredictorPanel::ensureGraphs(const GenerationPoint& point) {
    const int wanted = int(point.routed_layers.size()) + 1;
    if (plot_->graphCount() == wanted && points_ > 0) return;
    plot_->clearGraphs();
    for (int i = 0; i < int(point.routed_layers.size()); ++i) {
        auto* g = plot_->addGraph();
        g->setName(tr("L%1").arg(point.routed_layers[i]));
        g->setPen(QPen(lineColor(i), 1.5));
    }
    auto* all = plot_->addGraph();
    all->setName(tr("all routed"));
    all->setPen(QPen(theme_.foreground, 2.5));
    all->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 4));
}

void PredictorPanel::addGenerationPoint(const GenerationPoint& point) {
    if (plot_hint_->visible()) startGeneration();
    ensureGraphs(point);
    const double x = point.index + 1;
    for (int i = 0; i < int(point.layer_accuracy.size()) && i < plot_->graphCount() - 1; ++i)
        plot_->graph(i)->addData(x, point.layer_accuracy[i]);
    plot_->graph(plot_->graphCount() - 1)->addData(x, point.accuracy);
    ++points_;
    plot_->xAxis->setRange(0.5, std::max(8.0, x + 0.5));
    plot_->replot(QCustomPlot::rpQueuedReplot);
}

}  // namespace modscope
