#include "corpus_window.h"

#include <QComboBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QListWidget>
#include <QProgressBar>
#include <QPushButton>
#include <QTabWidget>
#include <QVBoxLayout>

#include <qcustomplot.h>

#include <cmath>

#include "color_maps.h"
#include "figure_export.h"
#include "piece_text.h"

namespace modscope {

namespace {

constexpr int kListed = 15;  // bars per piece chart

QCustomPlot* makePlot(QWidget* parent) {
    auto* p = new QCustomPlot(parent);
    p->setMinimumHeight(180);
    p->setInteractions({});
    return p;
}

// Horizontal bars of rates (0 ... 1) with a label per bar, the first at the top.
void fillRateBars(QCustomPlot* plot, const QStringList& labels, const std::vector<double>& rates, const QColor& color,
                  const QString& title) {
    plot->clearPlottables();
    plot->clearItems();
    auto* bars = new QCPBars(plot->yAxis, plot->xAxis);
    bars->setBrush(color);
    bars->setPen(Qt::NoPen);
    bars->setWidth(0.7);
    QSharedPointer<QCPAxisTickerText> ticker(new QCPAxisTickerText);
    QVector<double> keys, values;
    const int n = labels.size();
    for (int i = 0; i < n; ++i) {
        keys << double(n - 1 - i);
        values << rates[std::size_t(i)];
        ticker->addTick(double(n - 1 - i), labels[i]);
    }
    bars->setData(keys, values);
    plot->yAxis->setTicker(ticker);
    plot->yAxis->setRange(-0.6, std::max(n, 1) - 0.4);
    plot->xAxis->setRange(0.0, 1.0);
    plot->xAxis->setLabel(title);
    plot->replot();
}

}  // namespace

CorpusWindow::CorpusWindow(QWidget* parent) : QWidget(parent, Qt::Window) {
    setObjectName(QStringLiteral("corpus-window"));
    setWindowTitle(tr("Corpus — ModScope"));
    resize(1100, 720);
    auto* layout = new QVBoxLayout(this);
    auto* top = new QHBoxLayout;
    header_ = new QLabel(tr("No statistics yet: open a statistics file (modscope-stats) or run them on a corpus."), this);
    header_->setWordWrap(true);
    header_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    auto* open = new QPushButton(tr("Open Statistics…"), this);
    auto* run = new QPushButton(tr("Run on a Corpus…"), this);
    run->setToolTip(tr("Count the open model's routing over text files, .jsonl files or a folder, in the background"));
    auto* save = new QPushButton(tr("Export Figure…"), this);
    save->setObjectName(QStringLiteral("corpus-export"));
    connect(open, &QPushButton::clicked, this, &CorpusWindow::openRequested);
    connect(run, &QPushButton::clicked, this, &CorpusWindow::runRequested);
    connect(save, &QPushButton::clicked, this, [this] {
        const QString path = QFileDialog::getSaveFileName(this, tr("Export Figure"), QStringLiteral("modscope-corpus.png"),
                                                          tr("PNG image (*.png);;SVG drawing (*.svg);;PDF document (*.pdf)"));
        if (!path.isEmpty()) exportFigure(path);
    });
    top->addWidget(header_, 1);
    top->addWidget(open);
    top->addWidget(run);
    top->addWidget(save);
    layout->addLayout(top);

    auto* bar = new QHBoxLayout;
    bar->addWidget(new QLabel(tr("Layer"), this));
    layer_box_ = new QComboBox(this);
    connect(layer_box_, qOverload<int>(&QComboBox::currentIndexChanged), this, [this](int i) {
        if (i >= 0) selectLayer(i);
    });
    bar->addWidget(layer_box_);
    progress_ = new QProgressBar(this);
    progress_->setObjectName(QStringLiteral("corpus-progress"));
    progress_->setRange(0, 1000);
    progress_->hide();
    cancel_ = new QPushButton(tr("Cancel"), this);
    cancel_->hide();
    connect(cancel_, &QPushButton::clicked, this, &CorpusWindow::cancelRequested);
    bar->addStretch(1);
    bar->addWidget(progress_, 2);
    bar->addWidget(cancel_);
    layout->addLayout(bar);

    tabs_ = new QTabWidget(this);
    auto* pieces = new QWidget(tabs_);
    auto* pieces_layout = new QVBoxLayout(pieces);
    auto* charts = new QHBoxLayout;
    processed_plot_ = makePlot(pieces);
    skipped_plot_ = makePlot(pieces);
    charts->addWidget(processed_plot_);
    charts->addWidget(skipped_plot_);
    pieces_layout->addLayout(charts, 3);
    contexts_label_ = new QLabel(tr("Click a bar to list the piece's contexts; double-click a context to run it."), pieces);
    pieces_layout->addWidget(contexts_label_);
    contexts_ = new QListWidget(pieces);
    contexts_->setObjectName(QStringLiteral("corpus-contexts"));
    contexts_->setMaximumHeight(110);
    connect(contexts_, &QListWidget::itemActivated, this, [this](QListWidgetItem* item) {
        Q_EMIT contextChosen(item->data(Qt::UserRole).toString());
    });
    pieces_layout->addWidget(contexts_, 1);
    tabs_->addTab(pieces, tr("Pieces"));
    classes_plot_ = makePlot(tabs_);
    tabs_->addTab(classes_plot_, tr("Token Classes"));
    positions_plot_ = makePlot(tabs_);
    tabs_->addTab(positions_plot_, tr("Positions"));
    auto* layers = new QWidget(tabs_);
    auto* layers_layout = new QHBoxLayout(layers);
    co_plot_ = makePlot(layers);
    paths_plot_ = makePlot(layers);
    layers_layout->addWidget(co_plot_, 2);
    layers_layout->addWidget(paths_plot_, 3);
    tabs_->addTab(layers, tr("Co-selection and Depth"));
    layout->addWidget(tabs_, 1);

    for (QCustomPlot* p : {processed_plot_, skipped_plot_}) {
        connect(p, &QCustomPlot::mousePress, this, [this, p](QMouseEvent* e) {
            const auto& ids = p == processed_plot_ ? processed_ids_ : skipped_ids_;
            const int n = int(ids.size());
            const int row = n - 1 - int(std::lround(p->yAxis->pixelToCoord(e->pos().y())));
            if (row >= 0 && row < n && p->axisRect()->rect().contains(e->pos())) selectPiece(ids[std::size_t(row)]);
        });
    }
    setTheme(PlotTheme::fromPalette(palette()));
}

void CorpusWindow::setStats(std::shared_ptr<const CorpusStats> stats, const QString& origin) {
    stats_ = std::move(stats);
    if (!stats_) return;
    const auto& s = *stats_;
    QStringList sources;
    for (const auto& src : s.sources) sources << QFileInfo(QString::fromStdString(src)).fileName();
    header_->setText(tr("<b>%1</b> · %2 · %3 tokens in %4 windows of %5 · %6 at capacity %7%%8%9")
                         .arg(QString::fromStdString(s.model_name).toHtmlEscaped(), sources.join(QStringLiteral(", ")).toHtmlEscaped())
                         .arg(QLocale().toString(qlonglong(s.tokens)))
                         .arg(QLocale().toString(qlonglong(s.windows)))
                         .arg(s.window)
                         .arg(QString::fromLatin1(toString(s.mode)))
                         .arg(s.capacity * 100.0, 0, 'g', 4)
                         .arg(s.partial ? tr(" · <b>partial</b> (stopped early)") : QString())
                         .arg(origin.isEmpty() ? QString() : QStringLiteral(" · ") + origin.toHtmlEscaped()));
    {
        QSignalBlocker block(layer_box_);
        layer_box_->clear();
        for (const auto& l : s.layers) layer_box_->addItem(tr("L%1").arg(l.index));
    }
    layer_ = 0;
    piece_ = -1;
    rebuild();
}

void CorpusWindow::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    for (QCustomPlot* p : {processed_plot_, skipped_plot_, classes_plot_, positions_plot_, co_plot_, paths_plot_}) theme_.apply(p);
    rebuild();
}

void CorpusWindow::setProgress(bool running, double fraction, qint64 tokens) {
    progress_->setVisible(running);
    cancel_->setVisible(running);
    progress_->setValue(static_cast<int>(std::lround(1000.0 * std::clamp(fraction, 0.0, 1.0))));
    progress_->setFormat(tr("%1 tokens · %2%").arg(QLocale().toString(tokens)).arg(100.0 * fraction, 0, 'f', 0));
}

void CorpusWindow::selectLayer(int routed_index) {
    if (!stats_ || routed_index < 0 || routed_index >= int(stats_->layers.size())) return;
    layer_ = routed_index;
    if (layer_box_->currentIndex() != routed_index) {
        QSignalBlocker block(layer_box_);
        layer_box_->setCurrentIndex(routed_index);
    }
    rebuild();
}

void CorpusWindow::selectPiece(int id) {
    piece_ = id;
    showContexts();
}

QString CorpusWindow::headline() const { return header_->text(); }

QString CorpusWindow::exportFigure(const QString& path) { return exportWidget(tabs_->currentWidget(), path); }

void CorpusWindow::rebuild() {
    if (!stats_ || stats_->layers.empty()) return;
    fillPieces();
    fillClasses();
    fillPositions();
    fillLayers();
    showContexts();
}

void CorpusWindow::fillPieces() {
    const auto& s = *stats_;
    const auto& l = s.layers[std::size_t(layer_)];
    const int min_count = 20;
    processed_ids_ = rankedPieces(l, min_count, true, kListed);
    skipped_ids_ = rankedPieces(l, min_count, false, kListed);
    for (const bool processed : {true, false}) {
        const auto& ids = processed ? processed_ids_ : skipped_ids_;
        QStringList labels;
        std::vector<double> rates;
        for (int id : ids) {
            labels << QStringLiteral("%1 (%2)").arg(pieceLabel(s.pieces[std::size_t(id)], 14)).arg(l.id_tokens[std::size_t(id)]);
            const double rate = double(l.id_processed[std::size_t(id)]) / double(l.id_tokens[std::size_t(id)]);
            rates.push_back(processed ? rate : 1.0 - rate);  // each chart's bars grow with what it ranks
        }
        fillRateBars(processed ? processed_plot_ : skipped_plot_, labels, rates,
                     processed ? theme_.processed : theme_.skipped.darker(130),
                     processed ? tr("L%1: most often processed (share; at least %2 occurrences)").arg(l.index).arg(min_count)
                               : tr("L%1: most often skipped (share skipped)").arg(l.index));
    }
}

void CorpusWindow::fillClasses() {
    const auto& l = stats_->layers[std::size_t(layer_)];
    auto* plot = classes_plot_;
    plot->clearPlottables();
    auto* group = new QCPBarsGroup(plot);
    auto* rate = new QCPBars(plot->xAxis, plot->yAxis);
    auto* agree = new QCPBars(plot->xAxis, plot->yAxis);
    rate->setName(tr("share processed"));
    agree->setName(tr("predictor balanced accuracy"));
    rate->setBrush(theme_.processed);
    agree->setBrush(theme_.accent);
    QSharedPointer<QCPAxisTickerText> ticker(new QCPAxisTickerText);
    for (int c = 0; c < kTokenClasses; ++c) {
        const auto tokens = l.class_tokens[std::size_t(c)];
        ticker->addTick(c, QStringLiteral("%1\n%2").arg(QString::fromLatin1(toString(TokenClass(c)))).arg(tokens));
        rate->addData(c, tokens ? double(l.class_processed[std::size_t(c)]) / double(tokens) : 0.0);
        const auto& a = l.class_predictor[std::size_t(c)];
        agree->addData(c, a.total() ? a.balancedAccuracy() : 0.0);
    }
    for (QCPBars* b : {rate, agree}) {
        b->setWidth(0.35);
        b->setPen(Qt::NoPen);
        b->setBarsGroup(group);
    }
    plot->xAxis->setTicker(ticker);
    plot->xAxis->setRange(-0.6, kTokenClasses - 0.4);
    plot->yAxis->setRange(0.0, 1.2);  // room above the bars for the legend
    plot->yAxis->setLabel(tr("L%1 by token class (tokens under each)").arg(l.index));
    plot->legend->setVisible(true);
    plot->replot();
}

void CorpusWindow::fillPositions() {
    const auto& l = stats_->layers[std::size_t(layer_)];
    auto* plot = positions_plot_;
    plot->clearGraphs();
    auto* rate = plot->addGraph();
    auto* agree = plot->addGraph();
    rate->setName(tr("share processed"));
    agree->setName(tr("predictor accuracy"));
    rate->setPen(QPen(theme_.processed, 2));
    agree->setPen(QPen(theme_.accent, 1.5));
    for (std::size_t p = 0; p < l.position_tokens.size(); ++p) {
        if (l.position_tokens[p] == 0) continue;
        rate->addData(double(p), double(l.position_processed[p]) / double(l.position_tokens[p]));
        agree->addData(double(p), l.position_predictor[p].accuracy());
    }
    plot->xAxis->setRange(0.0, double(std::max<std::size_t>(1, l.position_tokens.size() - 1)));
    plot->xAxis->setLabel(tr("position in the window"));
    plot->yAxis->setRange(0.0, 1.2);
    plot->yAxis->setLabel(tr("L%1").arg(l.index));
    plot->legend->setVisible(true);
    plot->replot();
}

void CorpusWindow::fillLayers() {
    const auto& s = *stats_;
    const int R = int(s.layers.size());
    // Co-selection: the Jaccard overlap of each pair of routed layers' selections, with the value written in.
    auto* co = co_plot_;
    co->clearPlottables();
    co->clearItems();
    auto* map = new QCPColorMap(co->xAxis, co->yAxis);
    map->setInterpolate(false);
    map->data()->setSize(std::max(R, 2), std::max(R, 2));
    map->data()->setRange(QCPRange(0, std::max(R, 2) - 1), QCPRange(0, std::max(R, 2) - 1));
    QSharedPointer<QCPAxisTickerText> ticks(new QCPAxisTickerText);
    for (int i = 0; i < R; ++i) {
        ticks->addTick(i, QStringLiteral("L%1").arg(s.layers[std::size_t(i)].index));
        for (int j = 0; j < R; ++j) {
            const auto both = s.co_selected[std::size_t(i)][std::size_t(j)];
            const auto pi = s.co_selected[std::size_t(i)][std::size_t(i)], pj = s.co_selected[std::size_t(j)][std::size_t(j)];
            const double jac = pi + pj - both ? double(both) / double(pi + pj - both) : 0.0;
            map->data()->setCell(i, j, jac);
            auto* text = new QCPItemText(co);
            text->position->setCoords(i, j);
            text->setText(QString::number(jac, 'f', 2));
            text->setColor(textColorOn(viridis(jac)));
        }
    }
    map->setGradient(viridisGradient(theme_.full_layer));
    map->setDataRange(QCPRange(0.0, 1.0));
    co->xAxis->setTicker(ticks);
    co->yAxis->setTicker(ticks);
    co->xAxis->setRange(-0.5, R - 0.5);
    co->yAxis->setRange(-0.5, R - 0.5);
    co->xAxis->setLabel(tr("Jaccard overlap of the layers' selections"));
    co->replot();

    // Depth paths: tokens per set of routed layers that processed them.
    auto* paths = paths_plot_;
    paths->clearPlottables();
    auto* bars = new QCPBars(paths->xAxis, paths->yAxis);
    bars->setBrush(theme_.processed);
    bars->setPen(Qt::NoPen);
    QSharedPointer<QCPAxisTickerText> path_ticks(new QCPAxisTickerText);
    double top = 0.0;
    for (std::size_t m = 0; m < s.depth_paths.size(); ++m) {
        QStringList names;
        for (int r = 0; r < R; ++r)
            if (m >> r & 1u) names << QString::number(s.layers[std::size_t(r)].index);
        path_ticks->addTick(double(m), names.isEmpty() ? tr("none") : names.join(QLatin1Char('+')));
        const double share = s.tokens ? double(s.depth_paths[m]) / double(s.tokens) : 0.0;
        bars->addData(double(m), share);
        top = std::max(top, share);
    }
    paths->xAxis->setTicker(path_ticks);
    paths->xAxis->setTickLabelRotation(-45);
    paths->xAxis->setRange(-0.6, double(s.depth_paths.size()) - 0.4);
    paths->xAxis->setLabel(tr("routed layers that processed the token"));
    paths->yAxis->setRange(0.0, std::max(top * 1.1, 0.01));
    paths->yAxis->setLabel(tr("share of tokens"));
    paths->replot();
}

void CorpusWindow::showContexts() {
    contexts_->clear();
    if (!stats_ || piece_ < 0 || piece_ >= int(stats_->examples.size())) {
        contexts_label_->setText(tr("Click a bar to list the piece's contexts; double-click a context to run it."));
        return;
    }
    const auto& l = stats_->layers[std::size_t(layer_)];
    const auto id = std::size_t(piece_);
    const auto r = wilsonInterval(l.id_processed[id], l.id_tokens[id]);
    contexts_label_->setText(tr("%1: L%2 processed %3 of %4 (%5%, 95% %6–%7%) · its first contexts in the corpus:")
                                 .arg(pieceLabel(stats_->pieces[id], 24))
                                 .arg(l.index)
                                 .arg(l.id_processed[id])
                                 .arg(l.id_tokens[id])
                                 .arg(100.0 * r.rate, 0, 'f', 1)
                                 .arg(100.0 * r.low, 0, 'f', 1)
                                 .arg(100.0 * r.high, 0, 'f', 1));
    for (const auto& e : stats_->examples[id]) {
        const QString context = QString::fromStdString(e.context);
        QString plain = context;
        plain.remove(QChar(0x27E6)).remove(QChar(0x27E7));
        auto* item = new QListWidgetItem(tr("window %1, position %2:  %3").arg(e.window).arg(e.position).arg(visibleText(e.context)),
                                         contexts_);
        item->setData(Qt::UserRole, plain);
    }
}

}  // namespace modscope
