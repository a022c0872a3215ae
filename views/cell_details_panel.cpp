#include "cell_details_panel.h"

#include <QHeaderView>
#include <QLabel>
#include <QTableWidget>
#include <QVBoxLayout>

#include <cmath>

#include "expert_palette.h"
#include "piece_text.h"
#include "routing_heatmap.h"

namespace modscope {
namespace {

// The layer's top-k threshold is the Logit cell's tooltip: a column for it left no room in a side panel.
enum Column { kLayer, kDecision, kLogit, kGate, kUpdate, kRank, kProb, kTopk, kColumns };

QTableWidgetItem* cell(const QString& text, Qt::Alignment align = Qt::AlignRight) {
    auto* item = new QTableWidgetItem(text);
    item->setFlags(Qt::ItemIsEnabled);
    item->setTextAlignment(align | Qt::AlignVCenter);
    return item;
}

}  // namespace

CellDetailsPanel::CellDetailsPanel(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(6, 6, 6, 6);
    layout->setSpacing(6);
    header_ = new QLabel(this);
    header_->setWordWrap(true);
    header_->setTextFormat(Qt::RichText);
    header_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    layout->addWidget(header_);
    table_ = new QTableWidget(0, kColumns, this);
    table_->setHorizontalHeaderLabels({tr("Layer"), tr("Decision"), tr("Logit"), tr("Gate"), tr("Δx/x"), tr("Rank"),
                                       tr("p"), tr("Top-k")});
    const QStringList tips = {tr("Layer (top row = last layer); routed layers have a router, full layers process every token"),
                              tr("What this run did with the token in this layer"), tr("Router logit r = w·x (its tooltip gives the layer's top-k threshold)"),
                              tr("Gate sigmoid(r): what scales a processed token's update"),
                              tr("How much the layer changed the token: |Δx| / |x| (0 where it was skipped)"),
                              tr("Rank of the router logit among the run's tokens (0 = highest)"),
                              tr("Causal predictor's probability that the token is in the top k"),
                              tr("Whether the token is in the top k of this layer's router logits")};
    for (int c = 0; c < kColumns; ++c) table_->horizontalHeaderItem(c)->setToolTip(tips[c]);
    table_->verticalHeader()->setVisible(false);
    table_->verticalHeader()->setDefaultSectionSize(table_->fontMetrics().height() + 6);
    table_->horizontalHeader()->setSectionResizeMode(QHeaderView::ResizeToContents);
    table_->horizontalHeader()->setStretchLastSection(true);
    table_->setEditTriggers(QAbstractItemView::NoEditTriggers);
    table_->setSelectionMode(QAbstractItemView::NoSelection);
    table_->setFocusPolicy(Qt::NoFocus);
    layout->addWidget(table_, 1);
    predictions_ = new QLabel(this);
    predictions_->setObjectName(QStringLiteral("cell-predictions"));
    predictions_->setWordWrap(true);
    predictions_->setTextFormat(Qt::RichText);
    predictions_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    layout->addWidget(predictions_);
    theme_ = PlotTheme::fromPalette(palette());
    refresh();
}

void CellDetailsPanel::setSnapshot(SnapshotPtr snapshot) {
    snapshot_ = std::move(snapshot);
    if (!snapshot_ || token_ >= snapshot_->tokens()) layer_ = token_ = -1;
    refresh();
}

void CellDetailsPanel::setCell(int layer, int token) {
    layer_ = layer;
    token_ = token;
    refresh();
}

void CellDetailsPanel::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    refresh();
}

QString CellDetailsPanel::headline() const { return header_->text(); }

void CellDetailsPanel::refresh() {
    if (!snapshot_ || snapshot_->empty() || token_ < 0 || token_ >= snapshot_->tokens()) {
        header_->setText(tr("Click a heatmap cell or a token to lock it here. Arrow keys move the lock; "
                            "Esc releases it."));
        table_->setRowCount(0);
        predictions_->clear();
        predictions_->hide();
        return;
    }
    const auto& s = *snapshot_;
    const int t = token_;
    header_->setText(tr("<b>%1</b> · token %2 of %3 · id %4 · processed by <b>%5 of %6</b> layers%7")
                         .arg(pieceLabel(s.pieces[t], 40).toHtmlEscaped())
                         .arg(t)
                         .arg(s.tokens())
                         .arg(s.trace.token_ids[t])
                         .arg(s.depth[t])
                         .arg(s.layers())
                         .arg(s.isGenerated(t) ? tr(" · generated") : QString()));
    const int L = s.layers();
    table_->setRowCount(L);
    // Top row = last layer, as in the heatmap.
    for (int l = 0; l < L; ++l) {
        const int row = L - 1 - l;
        const auto& layer = s.trace.layers[l];
        const bool processed = layer.selected[t];
        const double capacity = layerCapacity(s.trace, layer);
        const QString own = layer.routed && capacity != s.trace.capacity
                                ? QStringLiteral(" · %1%").arg(capacity * 100.0, 0, 'g', 4)
                                : QString();
        table_->setItem(row, kLayer,
                        cell(layer.routed ? tr("L%1 routed%2").arg(l).arg(own) : tr("L%1 full").arg(l), Qt::AlignLeft));
        if (!own.isEmpty()) table_->item(row, kLayer)->setToolTip(tr("This layer ran at its own capacity"));
        // A mixture layer says what its MLP did too: the expert, or why none ran (expert_palette.h).
        const QString mlp = layer.moe && t < int(layer.expert.size()) && layer.expertFate(t) != LayerTrace::ExpertFate::KeptOut
                                ? QStringLiteral(" · %1").arg(expertFateText(layer, t))
                                : QString();
        const int forced = layer.routed ? forcedDecision(s.trace, l, t) : -1;
        const QString value = layer.decision_value.size() == std::size_t(s.tokens())
                                  ? tr(" · value %1").arg(layer.decision_value[t], 0, 'f', 3)
                                  : QString();
        table_->setItem(row, kDecision, cell((processed ? tr("processed") : tr("skipped")) +
                                                 (forced >= 0 ? tr(" (forced)") : QString()) + value + mlp,
                                             Qt::AlignLeft));
        if (!mlp.isEmpty())
            table_->item(row, kDecision)->setToolTip(RoutingHeatmap::mixtureSummary(layer, t));
        const double update = updateRatio(layer, t);
        table_->setItem(row, kUpdate, cell(std::isfinite(update) ? QString::number(update, 'f', 3) : QStringLiteral("–")));
        if (layer.routed) {
            const float p = layer.predictor_prob[t];
            table_->setItem(row, kLogit, cell(QString::number(layer.router_logits[t], 'f', 3)));
            table_->setItem(row, kGate, cell(QString::number(layer.gate(t), 'f', 3)));
            table_->setItem(row, kRank, cell(QStringLiteral("%1").arg(layer.rank[t])));
            table_->item(row, kLogit)->setToolTip(tr("Top-k threshold of layer %1: %2 (the k-th largest logit, k = %3)")
                                                      .arg(l)
                                                      .arg(layer.topk_threshold, 0, 'f', 3)
                                                      .arg(layer.k));
            table_->setItem(row, kProb, cell(std::isfinite(p) ? QString::number(p, 'f', 3) : QStringLiteral("–")));
            table_->setItem(row, kTopk, cell(layer.topk_selected[t] ? tr("yes") : tr("no"), Qt::AlignLeft));
        } else {
            for (int c : {kLogit, kGate, kRank, kProb, kTopk}) table_->setItem(row, c, cell(QStringLiteral("–")));
        }
        QColor decision = processed ? theme_.processed : theme_.skipped;
        decision.setAlpha(processed ? 70 : 160);
        table_->item(row, kDecision)->setBackground(decision);
        if (l == layer_) {
            QColor hl = theme_.accent;
            hl.setAlpha(50);
            for (int c = 0; c < kColumns; ++c)
                if (c != kDecision) table_->item(row, c)->setBackground(hl);
            QFont f = table_->font();
            f.setBold(true);
            for (int c = 0; c < kColumns; ++c) table_->item(row, c)->setFont(f);
        }
    }
    predictions_->setText(predictionsText());
    predictions_->setVisible(!predictions_->text().isEmpty());
}

QString CellDetailsPanel::predictionsText() const {
    if (!snapshot_ || !snapshot_->hasLosses() || token_ < 0 || token_ + 1 >= snapshot_->tokens()) return {};
    const auto& s = *snapshot_;
    const int t = token_, n = s.trace.top_n;
    const auto i = static_cast<std::size_t>(t);
    QString text = tr("<b>Next token</b> %1: loss %2 nats")
                       .arg(pieceLabel(s.pieces[i + 1], 24).toHtmlEscaped())
                       .arg(s.trace.token_loss[i], 0, 'f', 3);
    if (n > 0)
        text += tr("<br><b>Top %1 here</b>: %2")
                    .arg(n)
                    .arg(topPredictionsText(s.trace.top_ids, s.trace.top_probs, s.top_pieces, n, t).toHtmlEscaped());
    if (s.baseline_token_loss.size() == s.trace.token_loss.size()) {
        text += tr("<br><b>Without the forced decisions</b>: loss %1").arg(s.baseline_token_loss[i], 0, 'f', 3);
        if (n > 0)
            text += tr("; top %1: %2")
                        .arg(n)
                        .arg(topPredictionsText(s.baseline_top_ids, s.baseline_top_probs, s.baseline_top_pieces, n, t)
                                 .toHtmlEscaped());
    }
    if (s.reference_token_loss.size() == s.trace.token_loss.size())
        text += tr("<br><b>%1</b> (reference): loss %2")
                    .arg(QString::fromStdString(s.reference_name).toHtmlEscaped())
                    .arg(s.reference_token_loss[i], 0, 'f', 3);
    return text;
}

}  // namespace modscope
