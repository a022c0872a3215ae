#include "main_window.h"

#include <QAction>
#include <QActionGroup>
#include <QApplication>
#include <QCloseEvent>
#include <QComboBox>
#include <QDir>
#include <QDockWidget>
#include <QDragEnterEvent>
#include <QDropEvent>
#include <QFile>
#include <QFileDialog>
#include <QFileInfo>
#include <QLabel>
#include <QMenuBar>
#include <QMessageBox>
#include <QMimeData>
#include <QProgressBar>
#include <QPushButton>
#include <QToolButton>
#include <QScreen>
#include <QSettings>
#include <QSignalBlocker>
#include <QDialog>
#include <QDialogButtonBox>
#include <QDoubleSpinBox>
#include <QFormLayout>
#include <QSlider>
#include <QSplitter>
#include <QStandardPaths>
#include <QStatusBar>
#include <QToolBar>
#include <QHBoxLayout>
#include <QVBoxLayout>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "capacity_chart.h"
#include "expert_load_chart.h"
#include "cell_details_panel.h"
#include "engine_session.h"
#include "figure_export.h"
#include "generation_controls.h"
#include "modscope/paths.h"
#include "token_loss_strip.h"
#include "corpus_window.h"
#include "modscope/corpus_run.h"
#include "message_banner.h"
#include "modscope/paths.h"
#include "modscope/trace_io.h"
#include "plot_theme.h"
#include "predictor_panel.h"
#include "prompt_editor.h"
#include "routing_controls.h"
#include "routing_diff_view.h"
#include "routing_heatmap.h"
#include "shortcut_sheet.h"
#include "snapshot_builder.h"
#include "token_depth_view.h"
#include "trace_export.h"

namespace modscope {
namespace {

constexpr int kDebounceMs = 150;
constexpr int kShortWindowHeight = 900;  // below: pinning arranges the compare dock for a laptop screen

// Routed layers' own capacities in settings, as modscope-trace --capacity writes them: "1:0.25,3:0.5".
QString layerCapacitiesText(const std::vector<double>& capacities) {
    QStringList parts;
    for (std::size_t l = 0; l < capacities.size(); ++l)
        if (capacities[l] >= 0) parts << QStringLiteral("%1:%2").arg(l).arg(capacities[l], 0, 'g', 17);
    return parts.join(QLatin1Char(','));
}

// Anything that is not a routed layer of this model with a capacity from 0 to 1 is left out.
std::vector<double> layerCapacitiesFromText(const QString& text, const ModelConfig& config) {
    std::vector<double> out;
    for (const QString& part : text.split(QLatin1Char(','), Qt::SkipEmptyParts)) {
        const auto fields = part.split(QLatin1Char(':'));
        bool ok_layer = false, ok_value = false;
        const int layer = fields.size() == 2 ? fields[0].toInt(&ok_layer) : -1;
        const double value = fields.size() == 2 ? fields[1].toDouble(&ok_value) : -1.0;
        if (!ok_layer || !ok_value || layer < 0 || layer >= config.n_layers || !config.isRouted(layer) ||
            !(value >= 0.0 && value <= 1.0))
            continue;
        if (out.size() <= std::size_t(layer)) out.resize(std::size_t(layer) + 1, -1.0);
        out[std::size_t(layer)] = value;
    }
    return out;
}
constexpr int kGenerationPaintMs = 33;  // at most ~30 view updates a second while tokens stream
constexpr int kMaxRecentModels = 8;
constexpr int kMaxSavedPromptChars = 64 * 1024;

const char* kSamplePrompt =
    "Mixture-of-Depths transformers spend compute where it matters: at every routed layer, a router "
    "picks the tokens worth processing and the rest skip ahead on the residual stream. Type here and "
    "watch each layer decide.";

QString formatParameters(std::int64_t n) {
    if (n >= 1000000000) return QStringLiteral("%1 B").arg(n / 1e9, 0, 'f', 2);
    if (n >= 1000000) return QStringLiteral("%1 M").arg(n / 1e6, 0, 'f', 2);
    if (n >= 1000) return QStringLiteral("%1 k").arg(n / 1e3, 0, 'f', 1);
    return QString::number(n);
}

QDockWidget* makeDock(const QString& title, const QString& name, QWidget* content, QMainWindow* window) {
    auto* dock = new QDockWidget(title, window);
    dock->setObjectName(name);  // saveState() needs it
    dock->setWidget(content);
    dock->setFeatures(QDockWidget::DockWidgetMovable | QDockWidget::DockWidgetFloatable |
                      QDockWidget::DockWidgetClosable);
    return dock;
}

}  // namespace

MainWindow::MainWindow(const Options& options, QWidget* parent)
    : QMainWindow(parent), options_(options), session_(std::make_unique<EngineSession>()) {
    setWindowTitle(tr("ModScope"));
    setAcceptDrops(true);
    setDockNestingEnabled(true);
    setDockOptions(QMainWindow::AnimatedDocks | QMainWindow::AllowNestedDocks | QMainWindow::AllowTabbedDocks);
    // The right column runs the full height; the prompt and the text view sit above and below the heatmap.
    setCorner(Qt::TopRightCorner, Qt::RightDockWidgetArea);
    setCorner(Qt::BottomRightCorner, Qt::RightDockWidgetArea);
    setCorner(Qt::TopLeftCorner, Qt::TopDockWidgetArea);
    setCorner(Qt::BottomLeftCorner, Qt::BottomDockWidgetArea);

    auto* central = new QWidget(this);
    auto* layout = new QVBoxLayout(central);
    layout->setContentsMargins(0, 0, 0, 0);
    layout->setSpacing(0);
    banner_ = new MessageBanner(central);
    heatmap_ = new RoutingHeatmap(central);
    heatmap_->setObjectName(QStringLiteral("heatmap"));
    // Replaying a trace changes what every panel means: a bar in the highlight colour says so and leads
    // back, where a status-bar message would be missed.
    replay_bar_ = new QWidget(central);
    replay_bar_->setObjectName(QStringLiteral("replay-bar"));
    replay_bar_->setStyleSheet(QStringLiteral("#replay-bar { background-color: palette(highlight); }"
                                              "#replay-bar QLabel { color: palette(highlighted-text); }"));
    replay_bar_->setAttribute(Qt::WA_StyledBackground);
    auto* replay_layout = new QHBoxLayout(replay_bar_);
    replay_layout->setContentsMargins(10, 4, 6, 4);
    replay_label_ = new QLabel(replay_bar_);
    replay_label_->setObjectName(QStringLiteral("replay-label"));
    replay_label_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    auto* live_button = new QPushButton(tr("Return to Live Model"), replay_bar_);
    live_button->setObjectName(QStringLiteral("return-live"));
    connect(live_button, &QPushButton::clicked, this, &MainWindow::returnToLive);
    replay_layout->addWidget(replay_label_, 1);
    replay_layout->addWidget(live_button);
    replay_bar_->hide();
    // Each position's loss above its column of the heatmap (docs/MODEL.md "Interventions").
    loss_strip_ = new TokenLossStrip(central);
    layout->addWidget(banner_);
    layout->addWidget(replay_bar_);
    layout->addWidget(loss_strip_);
    layout->addWidget(heatmap_, 1);
    setCentralWidget(central);

    buildDocks();
    buildActions();
    buildMenus();
    buildToolBar();

    status_device_ = new QLabel(this);
    status_model_ = new QLabel(this);
    status_tokens_ = new QLabel(this);
    status_latency_ = new QLabel(this);
    status_latency_->setToolTip(tr("From the start of the last run to the repainted heatmap (model time in brackets)"));
    // The decision values' progress, with a way out: they take a flip per routed cell.
    values_progress_ = new QProgressBar(this);
    values_progress_->setObjectName(QStringLiteral("decision-value-progress"));
    values_progress_->setMaximumWidth(220);
    values_progress_->setFormat(tr("decision values %p%"));
    values_progress_->hide();
    values_cancel_ = new QToolButton(this);
    values_cancel_->setText(tr("Cancel"));
    values_cancel_->setToolTip(tr("Stop computing decision values (View › Decision Values)"));
    values_cancel_->hide();
    connect(values_cancel_, &QToolButton::clicked, this, [this] { setDecisionValuesShown(false); });
    statusBar()->addPermanentWidget(values_progress_);
    statusBar()->addPermanentWidget(values_cancel_);
    for (QLabel* l : {status_device_, status_model_, status_tokens_, status_latency_}) {
        l->setContentsMargins(8, 0, 8, 0);
        statusBar()->addPermanentWidget(l);
    }

    debounce_.setSingleShot(true);
    debounce_.setInterval(kDebounceMs);
    connect(&debounce_, &QTimer::timeout, this, &MainWindow::requestRun);
    generation_paint_.setSingleShot(true);
    generation_paint_.setInterval(kGenerationPaintMs);
    connect(&generation_paint_, &QTimer::timeout, this, [this] {
        if (pending_generation_snapshot_) applySnapshot(std::exchange(pending_generation_snapshot_, nullptr));
    });

    connect(session_.get(), &EngineSession::modelLoaded, this, &MainWindow::onModelLoaded);
    connect(session_.get(), &EngineSession::modelLoadFailed, this, &MainWindow::onModelLoadFailed);
    connect(session_.get(), &EngineSession::runFinished, this, &MainWindow::onRunFinished);
    connect(session_.get(), &EngineSession::runFailed, this, &MainWindow::onRunFailed);
    connect(session_.get(), &EngineSession::runProgress, this, [this](int done, int total) {
        if (!interventions_.decision_values || total <= 0) return;
        values_progress_->setRange(0, total);
        values_progress_->setValue(done);
        values_progress_->setVisible(done < total);
        values_cancel_->setVisible(done < total);
    });
    connect(session_.get(), &EngineSession::referenceLoaded, this, [this](const QString& name, const QString&) {
        reference_name_ = name;
        if (!name.isEmpty()) statusBar()->showMessage(tr("Reference model: %1").arg(name), 4000);
        // A run queued behind the load already has its losses; one shown before it needs another.
        if (snapshot_ && !replaying_ && snapshot_->reference_name != name.toStdString() && !session_->isRunPending())
            requestRun();
    });
    connect(session_.get(), &EngineSession::referenceFailed, this, [this](const QString& message) {
        reference_name_.clear();
        // The bundled dense baseline fits the bundled models only: for another model it is quietly left out.
        if (reference_chosen_)
            showError(tr("No reference model: %1").arg(message));
        else
            statusBar()->showMessage(tr("No reference model: %1").arg(message), 6000);
    });
    connect(heatmap_, &RoutingHeatmap::overrideRequested, this, &MainWindow::forceDecision);
    connect(heatmap_, &RoutingHeatmap::clearOverridesRequested, this, &MainWindow::clearOverrides);
    // The loss strip's columns stand over the heatmap's.
    const auto alignLossStrip = [this] {
        const QRect cells = heatmap_->axisRect()->rect();
        loss_strip_->alignColumns(heatmap_->xAxis->range(), cells.left(), cells.right() + 1);
    };
    connect(heatmap_, &QCustomPlot::afterLayout, this, alignLossStrip);
    connect(heatmap_->xAxis, qOverload<const QCPRange&>(&QCPAxis::rangeChanged), this, alignLossStrip);
    connect(session_.get(), &EngineSession::generationStep, this, &MainWindow::onGenerationStep);
    connect(session_.get(), &EngineSession::generationFinished, this, &MainWindow::onGenerationFinished);
    connect(session_.get(), &EngineSession::generationFailed, this, &MainWindow::onGenerationFailed);

    connect(prompt_, &PromptEditor::edited, this, &MainWindow::onPromptEdited);
    connect(routing_, &RoutingControls::capacityChanged, this, [this] {
        endGenerationView();
        requestRun();
    });
    connect(routing_, &RoutingControls::layerCapacitiesChanged, this, [this] {
        endGenerationView();
        requestRun();
    });
    connect(routing_, &RoutingControls::modeChanged, this, [this](RoutingMode mode) {
        endGenerationView();
        QSignalBlocker a(topk_action_), b(causal_action_);
        topk_action_->setChecked(mode == RoutingMode::TopK);
        causal_action_->setChecked(mode == RoutingMode::Causal);
        requestRun();
    });
    connect(generation_, &GenerationControls::generateRequested, this, &MainWindow::startGeneration);
    connect(generation_, &GenerationControls::stopRequested, this, &MainWindow::stopGeneration);
    connect(heatmap_, &RoutingHeatmap::cellSelected, this, [this](int layer, int token) {
        details_->setCell(layer, token);
        depth_->selectToken(token);
    });
    connect(heatmap_, &RoutingHeatmap::selectionCleared, this, [this] {
        details_->setCell(-1, -1);
        depth_->selectToken(-1);
    });
    connect(depth_, &TokenDepthView::tokenSelected, this, [this](int token) {
        if (token < 0) {
            heatmap_->selectCell(-1, -1);
            return;
        }
        // Keep the locked layer when there is one; otherwise the first routed layer says the most.
        int layer = heatmap_->selectedLayer();
        if (layer < 0 && snapshot_)
            for (const auto& l : snapshot_->trace.layers)
                if (l.routed) {
                    layer = l.index;
                    break;
                }
        heatmap_->selectCell(std::max(layer, 0), token);
    });
    // Zoom and pan follow each other across the live heatmap, the pinned one and the diff; the guard stops
    // a clamped range from echoing back and forth.
    linkZoom(heatmap_, pinned_heatmap_->xAxis, pinned_heatmap_->yAxis);
    linkZoom(heatmap_, diff_view_->plot()->xAxis, nullptr);
    linkZoom(pinned_heatmap_, heatmap_->xAxis, heatmap_->yAxis);
    linkZoom(pinned_heatmap_, diff_view_->plot()->xAxis, nullptr);
    connect(diff_view_->plot()->xAxis, qOverload<const QCPRange&>(&QCPAxis::rangeChanged), this,
            [this](const QCPRange& range) {
                if (linking_zoom_) return;
                linking_zoom_ = true;
                for (RoutingHeatmap* h : {heatmap_, pinned_heatmap_}) {
                    h->xAxis->setRange(range);
                    h->replot(QCustomPlot::rpQueuedReplot);
                }
                linking_zoom_ = false;
            });
    // The pinned heatmap's columns stand under the live one's: its left margin (short layer labels) follows
    // the live heatmap's (long ones).
    connect(heatmap_, &QCustomPlot::afterLayout, this, [this] {
        if (!pinned_) return;
        auto* rect = pinned_heatmap_->axisRect();
        const int left = heatmap_->axisRect()->margins().left();
        if (rect->autoMargins().testFlag(QCP::msLeft) || rect->margins().left() != left) {
            rect->setAutoMargins(QCP::msRight | QCP::msTop | QCP::msBottom);
            rect->setMargins(QMargins(left, 0, 0, 0));
            pinned_heatmap_->replot(QCustomPlot::rpQueuedReplot);
        }
    });
    connect(heatmap_, &QCustomPlot::afterReplot, this, [this] {
        if (!measuring_paint_) return;
        measuring_paint_ = false;
        last_latency_ms_ = run_clock_.nsecsElapsed() / 1e6;
        updateStatus();
    });

    default_state_ = saveState();
    restoreSettings();
    compare_dock_->hide();  // a restored layout may show it, but nothing is pinned at start
    applyPlotTheme();
    heatmap_->setPlaceholder(tr("No model loaded yet.\nOpen one with File › Open Model (Ctrl+O), or drop its folder "
                                "on this window."));
    updateStatus();
}

QString MainWindow::samplePrompt() { return QString::fromUtf8(kSamplePrompt); }

MainWindow::~MainWindow() {
    closing_ = true;
    if (corpus_cancel_) corpus_cancel_->store(true);
    corpus_pool_.waitForDone();
    session_->shutdown();
}

// ---------------------------------------------------------------------------------------------- building

void MainWindow::buildDocks() {
    auto* prompt_box = new QWidget(this);
    auto* prompt_layout = new QVBoxLayout(prompt_box);
    prompt_layout->setContentsMargins(0, 0, 0, 0);
    prompt_layout->setSpacing(0);
    prompt_ = new PromptEditor(prompt_box);
    generation_ = new GenerationControls(prompt_box);
    prompt_layout->addWidget(prompt_, 1);
    prompt_layout->addWidget(generation_);
    prompt_dock_ = makeDock(tr("Prompt"), QStringLiteral("prompt-dock"), prompt_box, this);

    depth_ = new TokenDepthView(this);
    depth_dock_ = makeDock(tr("Per-token depth"), QStringLiteral("depth-dock"), depth_, this);
    details_ = new CellDetailsPanel(this);
    details_dock_ = makeDock(tr("Selected token"), QStringLiteral("details-dock"), details_, this);
    capacity_ = new CapacityChart(this);
    capacity_dock_ = makeDock(tr("Capacity and compute"), QStringLiteral("capacity-dock"), capacity_, this);
    predictor_ = new PredictorPanel(this);
    predictor_dock_ = makeDock(tr("Predictor accuracy"), QStringLiteral("predictor-dock"), predictor_, this);

    auto* compare = new QSplitter(Qt::Vertical, this);
    auto* pinned_box = new QWidget(compare);
    auto* pinned_layout = new QVBoxLayout(pinned_box);
    pinned_layout->setContentsMargins(6, 4, 6, 0);
    pinned_layout->setSpacing(2);
    pinned_label_ = new QLabel(pinned_box);
    pinned_label_->setObjectName(QStringLiteral("pinned-label"));
    pinned_heatmap_ = new RoutingHeatmap(pinned_box);
    pinned_heatmap_->setObjectName(QStringLiteral("pinned-heatmap"));
    pinned_heatmap_->setCompact(true);  // see pinRun
    pinned_heatmap_->setMinimumHeight(92);  // the compare dock fits without growing the window
    pinned_heatmap_->setPlaceholder(tr("Nothing pinned: Run › Pin Run (Ctrl+P) freezes the run shown."));
    pinned_layout->addWidget(pinned_label_);
    pinned_layout->addWidget(pinned_heatmap_, 1);
    diff_view_ = new RoutingDiffView(compare);
    diff_view_->setObjectName(QStringLiteral("diff-view"));
    compare->addWidget(pinned_box);
    compare->addWidget(diff_view_);
    compare->setStretchFactor(0, 1);
    compare->setStretchFactor(1, 1);
    compare_dock_ = makeDock(tr("Compare with pinned run"), QStringLiteral("compare-dock"), compare, this);

    addDockWidget(Qt::TopDockWidgetArea, prompt_dock_);
    addDockWidget(Qt::BottomDockWidgetArea, depth_dock_);
    addDockWidget(Qt::RightDockWidgetArea, capacity_dock_);
    addDockWidget(Qt::RightDockWidgetArea, predictor_dock_);
    addDockWidget(Qt::RightDockWidgetArea, details_dock_);
    addDockWidget(Qt::BottomDockWidgetArea, compare_dock_, Qt::Vertical);
    compare_dock_->hide();  // until a run is pinned
}

void MainWindow::linkZoom(RoutingHeatmap* from, QCPAxis* to_x, QCPAxis* to_y) {
    connect(from->xAxis, qOverload<const QCPRange&>(&QCPAxis::rangeChanged), this, [this, to_x](const QCPRange& r) {
        if (linking_zoom_) return;
        linking_zoom_ = true;
        to_x->setRange(r);
        to_x->parentPlot()->replot(QCustomPlot::rpQueuedReplot);
        linking_zoom_ = false;
    });
    if (!to_y) return;
    connect(from->yAxis, qOverload<const QCPRange&>(&QCPAxis::rangeChanged), this, [this, from, to_y](const QCPRange& r) {
        // Layers line up only when both runs have as many: otherwise each keeps all of its own rows.
        auto* to = qobject_cast<RoutingHeatmap*>(to_y->parentPlot());
        if (linking_zoom_ || !to || to->rowCount() != from->rowCount()) return;
        linking_zoom_ = true;
        to_y->setRange(r);
        to->replot(QCustomPlot::rpQueuedReplot);
        linking_zoom_ = false;
    });
}

void MainWindow::buildActions() {
    auto make = [this](const QString& text, const QList<QKeySequence>& keys, auto slot) {
        auto* a = new QAction(text, this);
        a->setShortcuts(keys);
        connect(a, &QAction::triggered, this, slot);
        addAction(a);  // shortcuts work while menus are hidden (full screen, tests)
        return a;
    };
    open_action_ = make(tr("&Open Model…"), {QKeySequence::Open}, &MainWindow::chooseModelDirectory);
    open_action_->setIcon(style()->standardIcon(QStyle::SP_DialogOpenButton));
    open_action_->setToolTip(tr("Open a model directory (config.json, weights.pt, tokenizer.model)"));
    reload_action_ = make(tr("&Reload Model"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_R)}, [this] {
        if (model_ && !model_->directory.empty()) openModel(QString::fromStdString(model_->directory));
    });
    open_trace_action_ = make(tr("Open &Trace…"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_O)}, &MainWindow::chooseTrace);
    open_trace_action_->setToolTip(tr("Replay a saved trace (.json) read-only, without its model"));
    return_live_action_ = make(tr("Return to &Live Model"), {}, &MainWindow::returnToLive);
    return_live_action_->setEnabled(false);
    pin_action_ = make(tr("&Pin Run"), {QKeySequence(Qt::CTRL | Qt::Key_P)}, &MainWindow::pinRun);
    unpin_action_ = make(tr("&Unpin"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_P)}, &MainWindow::unpin);
    updatePinActions();
    export_json_action_ = make(tr("Export Trace as &JSON…"), {QKeySequence(Qt::CTRL | Qt::Key_E)},
                               [this] { chooseTraceExport(QStringLiteral("json")); });
    export_csv_action_ = make(tr("Export Trace as &CSV…"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_E)},
                              [this] { chooseTraceExport(QStringLiteral("csv")); });
    export_heatmap_action_ = make(tr("Export &Heatmap…"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_H)},
                                  [this] { chooseFigureExport(QStringLiteral("heatmap")); });
    export_capacity_action_ = make(tr("Export Ca&pacity Chart…"), {},
                                   [this] { chooseFigureExport(QStringLiteral("capacity")); });
    export_predictor_action_ = make(tr("Export P&redictor Panel…"), {},
                                    [this] { chooseFigureExport(QStringLiteral("predictor")); });
    export_loss_action_ = make(tr("Export &Loss Strip…"), {}, [this] { chooseFigureExport(QStringLiteral("loss")); });
    export_depth_action_ = make(tr("Export Token &Depth…"), {},
                                [this] { chooseFigureExport(QStringLiteral("depth")); });
    export_window_action_ = make(tr("Export &Window…"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_S)},
                                 [this] { chooseFigureExport(QStringLiteral("window")); });
    // Some platforms define no standard Quit keys: Ctrl+Q everywhere.
    quit_action_ = make(tr("&Quit"), {QKeySequence(Qt::CTRL | Qt::Key_Q)}, &QWidget::close);

    generate_action_ = make(tr("&Generate"), {QKeySequence(Qt::CTRL | Qt::Key_G)}, &MainWindow::startGeneration);
    stop_action_ = make(tr("&Stop Generating"), {QKeySequence(Qt::CTRL | Qt::Key_Period)}, &MainWindow::stopGeneration);
    stop_action_->setEnabled(false);
    rerun_action_ = make(tr("Re-&run"), {QKeySequence(Qt::CTRL | Qt::Key_R)}, &MainWindow::runNow);
    topk_action_ = make(tr("&Top-k Routing"), {QKeySequence(Qt::CTRL | Qt::Key_1)},
                        [this] { chooseMode(RoutingMode::TopK); });
    causal_action_ = make(tr("&Causal Routing"), {QKeySequence(Qt::CTRL | Qt::Key_2)},
                          [this] { chooseMode(RoutingMode::Causal); });
    auto* mode_group = new QActionGroup(this);
    for (QAction* a : {topk_action_, causal_action_}) {
        a->setCheckable(true);
        mode_group->addAction(a);
    }
    topk_action_->setChecked(true);
    capacity_up_action_ = make(tr("Capacity +5%"), {QKeySequence(Qt::CTRL | Qt::Key_BracketRight)},
                               [this] { routing_->setCapacity(std::min(1.0, routing_->capacity() + 0.05)); });
    capacity_down_action_ = make(tr("Capacity −5%"), {QKeySequence(Qt::CTRL | Qt::Key_BracketLeft)},
                                 [this] { routing_->setCapacity(std::max(0.0, routing_->capacity() - 0.05)); });

    reset_view_action_ = make(tr("Reset Heatmap &Zoom"), {QKeySequence(Qt::CTRL | Qt::Key_0)},
                              [this] { heatmap_->resetView(); });
    reset_view_action_->setIcon(style()->standardIcon(QStyle::SP_BrowserReload));
    focus_prompt_action_ = make(tr("&Focus Prompt"), {QKeySequence(Qt::CTRL | Qt::Key_L)}, [this] {
        prompt_dock_->show();
        prompt_->editor()->setFocus();
    });
    reset_layout_action_ = make(tr("Restore Default &Layout"), {}, &MainWindow::resetLayout);
    shortcuts_action_ = make(tr("&Keyboard Shortcuts"), {QKeySequence::HelpContents, QKeySequence(Qt::CTRL | Qt::Key_Slash)},
                             &MainWindow::showShortcuts);
    about_action_ = make(tr("&About ModScope"), {}, &MainWindow::showAbout);
    decision_values_action_ = make(tr("&Decision Values"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_D)},
                                   [this] { setDecisionValuesShown(decision_values_action_->isChecked()); });
    decision_values_action_->setCheckable(true);
    decision_values_action_->setToolTip(
        tr("Colour each routed cell by what its decision is worth: the summed loss with that decision flipped, "
           "minus without (one extra run per routed cell, on the engine's thread)"));
    keep_capacity_action_ = make(tr("&Keep Capacity When Forcing"), {},
                                 [this] { setKeepCapacity(keep_capacity_action_->isChecked()); });
    keep_capacity_action_->setCheckable(true);
    keep_capacity_action_->setToolTip(tr("A forced layer still takes k tokens: its other places go to the "
                                         "highest-ranked free tokens (off: exact flips)"));
    clear_overrides_action_ = make(tr("C&lear All Overrides"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_Delete)},
                                   &MainWindow::clearOverrides);
    clear_overrides_action_->setEnabled(false);
    open_reference_action_ = make(tr("Open Re&ference Model…"), {}, [this] {
        const QString dir = QFileDialog::getExistingDirectory(
            this, tr("Open a reference model (same tokenizer)"),
            model_ ? QFileInfo(QString::fromStdString(model_->directory)).absolutePath() : QString());
        if (!dir.isEmpty()) openReferenceModel(dir);
    });
    no_reference_action_ = make(tr("&No Reference Model"), {}, [this] { openReferenceModel({}); });
    corpus_action_ = make(tr("&Corpus…"), {QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_K)}, [this] {
        corpusWindow()->show();
        corpusWindow()->raise();
    });
    corpus_action_->setToolTip(tr("Routing statistics over a corpus: what each layer takes and skips"));
    open_stats_action_ = make(tr("Open &Statistics…"), {}, [this] {
        const QString path = QFileDialog::getOpenFileName(this, tr("Open Statistics"), QString(),
                                                          tr("Statistics (*.json);;All files (*)"));
        if (!path.isEmpty()) openStatistics(path);
    });

    theme_group_ = new QActionGroup(this);
    for (auto [choice, text] : {std::pair{ThemeChoice::System, tr("Follow the &System")},
                                std::pair{ThemeChoice::Light, tr("&Light")}, std::pair{ThemeChoice::Dark, tr("&Dark")}}) {
        auto* a = new QAction(text, theme_group_);
        a->setCheckable(true);
        a->setData(int(choice));
        a->setChecked(choice == ThemeChoice::System);
        connect(a, &QAction::triggered, this, [this, c = choice] { setTheme(c); });
    }

    scale_group_ = new QActionGroup(this);
    using Mode = HeatmapColorScale::Mode;
    for (auto [mode, text, tip] :
         {std::tuple{Mode::Shared, tr("&One Scale for All Layers"),
                     tr("Every layer's logits on one range: which layers have large logits")},
          std::tuple{Mode::PerLayer, tr("&Each Layer Its Own Range"),
                     tr("Each layer from its smallest to its largest logit: the order within every layer")},
          std::tuple{Mode::Fixed, tr("&Fixed Range"),
                     tr("One range that stays across runs, so that colours compare between runs")}}) {
        auto* a = new QAction(text, scale_group_);
        a->setCheckable(true);
        a->setData(int(mode));
        a->setToolTip(tip);
        a->setStatusTip(tip);
        a->setChecked(mode == Mode::Shared);
        connect(a, &QAction::triggered, this, [this, m = mode] {
            if (m == Mode::Fixed) {
                fixColorScaleAtCurrentRange();
                return;
            }
            auto s = colorScale();
            s.mode = m;
            setColorScale(s);
        });
    }
    fixed_range_action_ = new QAction(tr("Set Fixed &Range…"), this);
    connect(fixed_range_action_, &QAction::triggered, this, [this] {
        QDialog dialog(this);
        dialog.setWindowTitle(tr("Fixed Colour Range"));
        auto* form = new QFormLayout(&dialog);
        const auto current = colorScale().mode == HeatmapColorScale::Mode::Fixed
                                 ? QCPRange(colorScale().fixed_min, colorScale().fixed_max)
                                 : heatmap_->logitRange();
        auto* lo = new QDoubleSpinBox(&dialog);
        auto* hi = new QDoubleSpinBox(&dialog);
        for (auto* box : {lo, hi}) {
            box->setRange(-1e6, 1e6);
            box->setDecimals(2);
        }
        lo->setValue(current.lower);
        hi->setValue(current.upper);
        form->addRow(tr("Router logit at the &low end:"), lo);
        form->addRow(tr("Router logit at the &high end:"), hi);
        auto* buttons = new QDialogButtonBox(QDialogButtonBox::Ok | QDialogButtonBox::Cancel, &dialog);
        form->addRow(buttons);
        connect(buttons, &QDialogButtonBox::accepted, &dialog, &QDialog::accept);
        connect(buttons, &QDialogButtonBox::rejected, &dialog, &QDialog::reject);
        if (dialog.exec() != QDialog::Accepted) return;
        if (!(lo->value() < hi->value())) {
            banner_->showMessage(MessageBanner::Kind::Warning,
                                 tr("The fixed colour range needs its low end below its high end."));
            return;
        }
        setColorScale({HeatmapColorScale::Mode::Fixed, lo->value(), hi->value()});
    });
}

void MainWindow::setColorScale(const HeatmapColorScale& scale) {
    heatmap_->setColorScale(scale);
    pinned_heatmap_->setColorScale(scale);
    for (QAction* a : scale_group_->actions()) a->setChecked(HeatmapColorScale::Mode(a->data().toInt()) == scale.mode);
}

HeatmapColorScale MainWindow::colorScale() const { return heatmap_->colorScale(); }

void MainWindow::fixColorScaleAtCurrentRange() {
    if (colorScale().mode == HeatmapColorScale::Mode::Fixed) {  // already fixed: keep the range as it is
        setColorScale(colorScale());
        return;
    }
    // The range on screen, out to whole logits: the colours stay as they are, now for every later run.
    const QCPRange r = heatmap_->logitRange();
    setColorScale({HeatmapColorScale::Mode::Fixed, std::floor(r.lower), std::ceil(r.upper)});
}

void MainWindow::buildMenus() {
    auto* file = menuBar()->addMenu(tr("&File"));
    file->addAction(open_action_);
    recent_menu_ = file->addMenu(tr("Open &Recent"));
    file->addAction(reload_action_);
    file->addSeparator();
    file->addAction(open_trace_action_);
    file->addAction(open_stats_action_);
    file->addAction(return_live_action_);
    file->addSeparator();
    file->addAction(export_json_action_);
    file->addAction(export_csv_action_);
    file->addSeparator();
    file->addAction(export_heatmap_action_);
    file->addAction(export_capacity_action_);
    file->addAction(export_predictor_action_);
    file->addAction(export_loss_action_);
    file->addAction(export_depth_action_);
    file->addAction(export_window_action_);
    file->addSeparator();
    file->addAction(quit_action_);

    // The bundled model zoo (README "Model zoo"), one click each; File › Open Model opens any other.
    model_menu_ = menuBar()->addMenu(tr("&Model"));
    model_group_ = new QActionGroup(this);
    for (const auto& m : bundledModels()) {
        const QString dir = QString::fromStdString(m.directory);
        auto* a = model_menu_->addAction(QString::fromStdString(m.name));
        a->setCheckable(true);
        a->setData(dir);
        a->setToolTip(QDir::toNativeSeparators(dir));
        model_group_->addAction(a);
        connect(a, &QAction::triggered, this, [this, dir] { openModel(dir); });
    }
    if (model_menu_->isEmpty()) model_menu_->addAction(tr("(no bundled models found)"))->setEnabled(false);
    model_menu_->addSeparator();
    model_menu_->addAction(open_action_);
    model_menu_->addSeparator();
    model_menu_->addAction(open_reference_action_);
    model_menu_->addAction(no_reference_action_);
    model_menu_->setToolTipsVisible(true);

    auto* run = menuBar()->addMenu(tr("&Run"));
    run->addAction(rerun_action_);
    run->addSeparator();
    run->addAction(topk_action_);
    run->addAction(causal_action_);
    run->addAction(capacity_up_action_);
    run->addAction(capacity_down_action_);
    run->addSeparator();
    run->addAction(generate_action_);
    run->addAction(stop_action_);
    run->addSeparator();
    run->addAction(pin_action_);
    run->addAction(unpin_action_);
    run->addSeparator();
    // Forcing: P, S and Delete on a locked cell, or a cell's context menu.
    run->addAction(keep_capacity_action_);
    run->addAction(clear_overrides_action_);

    view_menu_ = menuBar()->addMenu(tr("&View"));
    view_menu_->addAction(reset_view_action_);
    view_menu_->addAction(focus_prompt_action_);
    view_menu_->addAction(decision_values_action_);
    view_menu_->addAction(corpus_action_);
    view_menu_->addSeparator();
    for (QDockWidget* d : {prompt_dock_, depth_dock_, details_dock_, capacity_dock_, predictor_dock_, compare_dock_})
        view_menu_->addAction(d->toggleViewAction());
    view_menu_->addAction(reset_layout_action_);
    view_menu_->addSeparator();
    auto* scale = view_menu_->addMenu(tr("&Colour Scale"));
    scale->setToolTipsVisible(true);
    scale->addActions(scale_group_->actions());
    scale->addSeparator();
    scale->addAction(fixed_range_action_);
    auto* theme = view_menu_->addMenu(tr("&Theme"));
    theme->addActions(theme_group_->actions());

    auto* help = menuBar()->addMenu(tr("&Help"));
    help->addAction(shortcuts_action_);
    help->addAction(about_action_);
    updateRecentMenu();
}

void MainWindow::buildToolBar() {
    auto* bar = addToolBar(tr("Main"));
    bar->setObjectName(QStringLiteral("main-toolbar"));
    bar->setMovable(false);
    bar->setToolButtonStyle(Qt::ToolButtonTextBesideIcon);
    bar->addAction(open_action_);
    bar->addSeparator();
    auto* device_label = new QLabel(tr(" Device "), bar);
    device_box_ = new QComboBox(bar);
    device_box_->addItem(tr("auto"), QStringLiteral("auto"));
    device_box_->addItem(tr("cpu"), QStringLiteral("cpu"));
    if (cudaAvailable()) device_box_->addItem(tr("cuda"), QStringLiteral("cuda"));
    device_box_->setToolTip(tr("Where the model runs; auto takes CUDA when it is available"));
    const int idx = device_box_->findData(options_.device);
    device_box_->setCurrentIndex(idx >= 0 ? idx : 0);
    connect(device_box_, qOverload<int>(&QComboBox::currentIndexChanged), this, &MainWindow::onDeviceChanged);
    bar->addWidget(device_label);
    bar->addWidget(device_box_);
    bar->addSeparator();
    routing_ = new RoutingControls(bar);
    bar->addWidget(routing_);
    bar->addSeparator();
    bar->addAction(reset_view_action_);
    bar->addAction(pin_action_);
}

// ---------------------------------------------------------------------------------------------- settings

void MainWindow::restoreSettings() {
    resize(1600, 1000);
    if (!options_.settings) return;
    QSettings& s = *options_.settings;
    if (options_.restore_layout) {
        if (restoreGeometry(s.value(QStringLiteral("window/geometry")).toByteArray())) layout_restored_ = true;
        restoreState(s.value(QStringLiteral("window/state")).toByteArray());
    }
    theme_ = themeChoiceFromString(s.value(QStringLiteral("view/theme"), QStringLiteral("system")).toString());
    if (theme_ != ThemeChoice::System) setTheme(theme_);
    if (s.value(QStringLiteral("routing/mode")).toString() == QLatin1String("causal")) {
        QSignalBlocker b(routing_);
        routing_->setMode(RoutingMode::Causal);
        causal_action_->setChecked(true);
    }
    GenerationSettings g;
    g.max_new_tokens = s.value(QStringLiteral("generation/tokens"), g.max_new_tokens).toInt();
    g.temperature = s.value(QStringLiteral("generation/temperature"), g.temperature).toDouble();
    g.top_p = s.value(QStringLiteral("generation/top_p"), g.top_p).toDouble();
    g.seed = s.value(QStringLiteral("generation/seed"), 0).toULongLong();
    generation_->setSettings(g);
    HeatmapColorScale scale;
    const QString mode = s.value(QStringLiteral("heatmap/color_scale"), QStringLiteral("shared")).toString();
    scale.mode = mode == QLatin1String("layer")   ? HeatmapColorScale::Mode::PerLayer
                 : mode == QLatin1String("fixed") ? HeatmapColorScale::Mode::Fixed
                                                  : HeatmapColorScale::Mode::Shared;
    scale.fixed_min = s.value(QStringLiteral("heatmap/fixed_min"), scale.fixed_min).toDouble();
    scale.fixed_max = s.value(QStringLiteral("heatmap/fixed_max"), scale.fixed_max).toDouble();
    if (!(std::isfinite(scale.fixed_min) && std::isfinite(scale.fixed_max) && scale.fixed_min < scale.fixed_max))
        scale = HeatmapColorScale{};
    setColorScale(scale);
}

QVariant MainWindow::preference(const QString& key) const {
    if (key == QLatin1String("view/theme")) return toString(theme_);
    if (key == QLatin1String("routing/mode"))
        return routing_->mode() == RoutingMode::Causal ? QStringLiteral("causal") : QStringLiteral("topk");
    if (key == QLatin1String("routing/capacity"))
        return model_ ? QVariant(routing_->capacity()) : startup_capacity_ ? QVariant(*startup_capacity_) : QVariant();
    if (key == QLatin1String("routing/layer_capacity")) return layerCapacitiesText(routing_->layerCapacities());
    if (key == QLatin1String("prompt/text")) return prompt_->text();
    return {};
}

void MainWindow::keepOutOfSettings(const QStringList& keys) {
    for (const QString& key : keys) start_only_.insert(key, preference(key));
}

void MainWindow::saveSettings() {
    if (!options_.settings) return;
    QSettings& s = *options_.settings;
    // What the command line set is for that start only: stored values stay unless the user changed it since.
    const auto put = [&](const QString& key, const QVariant& value) {
        if (start_only_.contains(key) && start_only_.value(key) == value) return false;
        s.setValue(key, value);
        return true;
    };
    s.setValue(QStringLiteral("window/geometry"), saveGeometry());
    s.setValue(QStringLiteral("window/state"), saveState());
    put(QStringLiteral("view/theme"), preference(QStringLiteral("view/theme")));
    put(QStringLiteral("routing/mode"), preference(QStringLiteral("routing/mode")));
    // A capacity belongs to the model it was chosen for: another model starts at its own (training) capacity.
    if (model_ && !model_->directory.empty() &&
        put(QStringLiteral("routing/capacity"), preference(QStringLiteral("routing/capacity"))))
        s.setValue(QStringLiteral("routing/capacity_model"), QString::fromStdString(model_->directory));
    if (model_ && !model_->directory.empty()) {  // no command-line option sets them: always the user's
        s.setValue(QStringLiteral("routing/layer_capacity"), preference(QStringLiteral("routing/layer_capacity")));
        s.setValue(QStringLiteral("routing/layer_capacity_model"), QString::fromStdString(model_->directory));
    }
    const auto g = generation_->settings();
    s.setValue(QStringLiteral("generation/tokens"), g.max_new_tokens);
    s.setValue(QStringLiteral("generation/temperature"), g.temperature);
    s.setValue(QStringLiteral("generation/top_p"), g.top_p);
    s.setValue(QStringLiteral("generation/seed"), qulonglong(g.seed));
    s.setValue(QStringLiteral("device"), device_box_->currentData().toString());
    const auto scale = colorScale();
    s.setValue(QStringLiteral("heatmap/color_scale"), scale.mode == HeatmapColorScale::Mode::PerLayer ? QStringLiteral("layer")
                                                      : scale.mode == HeatmapColorScale::Mode::Fixed  ? QStringLiteral("fixed")
                                                                                                       : QStringLiteral("shared"));
    s.setValue(QStringLiteral("heatmap/fixed_min"), scale.fixed_min);
    s.setValue(QStringLiteral("heatmap/fixed_max"), scale.fixed_max);
    const QString text = prompt_->text();
    if (text.size() <= kMaxSavedPromptChars) put(QStringLiteral("prompt/text"), text);
    s.sync();
}

void MainWindow::updateModelMenu() {
    if (!model_group_) return;
    const QString open = model_ ? QDir(QString::fromStdString(model_->directory)).canonicalPath() : QString();
    for (QAction* a : model_group_->actions())
        a->setChecked(!open.isEmpty() && QDir(a->data().toString()).canonicalPath() == open);
}

void MainWindow::updateRecentMenu() {
    recent_menu_->clear();
    const QStringList recent = options_.settings ? options_.settings->value(QStringLiteral("model/recent")).toStringList()
                                                 : QStringList();
    for (const QString& dir : recent) {
        auto* a = recent_menu_->addAction(QDir::toNativeSeparators(dir));
        connect(a, &QAction::triggered, this, [this, dir] { openModel(dir); });
    }
    recent_menu_->setEnabled(!recent.isEmpty());
}

// ---------------------------------------------------------------------------------------------- models

QString MainWindow::modelDirectoryFor(const QString& path) {
    const QFileInfo info(path);
    return info.isDir() ? info.absoluteFilePath() : info.absolutePath();
}

void MainWindow::openModel(const QString& directory) {
    if (directory.isEmpty()) return;
    if (generating_) stopGeneration();
    loading_dir_ = directory;
    statusBar()->showMessage(tr("Opening %1…").arg(QDir::toNativeSeparators(directory)));
    if (!model_) heatmap_->setPlaceholder(tr("Opening the model in %1…").arg(QDir::toNativeSeparators(directory)));
    session_->loadModel(directory, device_box_->currentData().toString());
}

void MainWindow::openDefaultModel() {
    try {
        openModel(QString::fromStdString(defaultModelDirectory()));
    } catch (const std::exception& e) {
        showError(QString::fromUtf8(e.what()));
        heatmap_->setPlaceholder(tr("No model loaded.\nOpen one with File › Open Model (Ctrl+O), or drop its folder "
                                    "on this window."));
    }
}

void MainWindow::onModelLoaded(const ModelInfo& info) {
    model_ = info;
    const QString dir = QString::fromStdString(info.directory);
    loading_dir_.clear();
    updateModelMenu();
    statusBar()->showMessage(tr("Opened %1").arg(QString::fromStdString(info.name)), 4000);
    if (banner_->kind() == MessageBanner::Kind::Error) banner_->dismiss();
    if (options_.settings && !dir.isEmpty()) {
        QStringList recent = options_.settings->value(QStringLiteral("model/recent")).toStringList();
        recent.removeAll(dir);
        recent.prepend(dir);
        while (recent.size() > kMaxRecentModels) recent.removeLast();
        options_.settings->setValue(QStringLiteral("model/recent"), recent);
        updateRecentMenu();
    }
    {
        // A model is trained for its own capacity: start there (or at --capacity, once).
        // While a trace is replayed the controls show the trace's settings; the live ones wait.
        QSignalBlocker block(routing_);
        double capacity = startup_capacity_.value_or(info.config.capacity);
        if (!startup_capacity_ && options_.settings &&
            options_.settings->value(QStringLiteral("routing/capacity_model")).toString() == dir) {
            bool ok = false;
            const double saved = options_.settings->value(QStringLiteral("routing/capacity")).toDouble(&ok);
            if (ok && saved >= 0.0 && saved <= 1.0) capacity = saved;
        }
        routing_->setTrainedCapacity(info.config.capacity);
        routing_->setLayers(info.config.n_layers, info.config.routed_layers);
        std::vector<double> layer_capacity;
        if (options_.settings &&
            options_.settings->value(QStringLiteral("routing/layer_capacity_model")).toString() == dir)
            layer_capacity = layerCapacitiesFromText(
                options_.settings->value(QStringLiteral("routing/layer_capacity")).toString(), info.config);
        if (replaying_) {
            live_capacity_ = capacity;
            live_layer_capacity_ = layer_capacity;
        } else {
            routing_->setCapacity(capacity);
            routing_->setLayerCapacities(layer_capacity);
        }
        startup_capacity_.reset();
    }
    generation_document_.reset();
    // Overrides name layers: those this model does not route are dropped.
    auto& overrides = interventions_.overrides;
    overrides.erase(std::remove_if(overrides.begin(), overrides.end(),
                                   [&](const RoutingOverride& o) {
                                       return o.layer >= info.config.n_layers || !info.config.isRouted(o.layer);
                                   }),
                    overrides.end());
    clear_overrides_action_->setEnabled(!overrides.empty());
    // The bundled dense baseline is the reference unless one was chosen here (or it is the model itself).
    if (!reference_chosen_) {
        QString dense;
        for (const auto& m : bundledModels())
            if (m.name == "dense") dense = QString::fromStdString(m.directory);
        const bool itself = !dense.isEmpty() && QDir(dense).canonicalPath() == QDir(dir).canonicalPath();
        session_->loadReference(itself ? QString() : dense);
    }
    heatmap_->setPlaceholder(tr("Type a prompt above: how each layer routes each token appears here."));
    updateWindowTitle();
    updateStatus();
    runNow();
    Q_EMIT modelChanged(info);
}

void MainWindow::onModelLoadFailed(const QString& message) {
    const QString dir = loading_dir_;
    loading_dir_.clear();
    statusBar()->clearMessage();
    QString text = tr("Could not open the model in %1:\n%2").arg(QDir::toNativeSeparators(dir), message);
    if (model_) text += tr("\nStill using %1.").arg(QString::fromStdString(model_->name));
    else
        heatmap_->setPlaceholder(tr("No model loaded: %1\nOpen one with File › Open Model (Ctrl+O), or drop its "
                                    "folder on this window.")
                                     .arg(message));
    refuseFile(tr("Model refused"), text);
    // The device box follows the model in use.
    if (model_) {
        QSignalBlocker block(device_box_);
        const int idx = device_box_->findData(pending_device_.isEmpty() ? device_box_->currentData() : pending_device_);
        if (idx >= 0) device_box_->setCurrentIndex(idx);
    }
    pending_device_.clear();
    Q_EMIT modelLoadFailed(message);
}

void MainWindow::onDeviceChanged() {
    if (!model_ || model_->directory.empty()) return;
    pending_device_ = QString::fromStdString(model_->device).startsWith(QLatin1String("cuda")) ? QStringLiteral("cuda")
                                                                                             : QStringLiteral("cpu");
    openModel(QString::fromStdString(model_->directory));
}

// ---------------------------------------------------------------------------------------------- runs

void MainWindow::setPrompt(const QString& text) { prompt_->setText(text); }

void MainWindow::setCapacity(double fraction) {
    if (!model_) startup_capacity_ = fraction;
    if (replaying_) {
        // The controls show the replayed trace: the live run changes behind it.
        live_capacity_ = std::clamp(fraction, 0.0, 1.0);
        requestRun();
        return;
    }
    routing_->setCapacity(fraction);
}

void MainWindow::setRoutingMode(RoutingMode mode) {
    if (replaying_) {
        live_mode_ = mode;
        requestRun();
        return;
    }
    chooseMode(mode);
}

void MainWindow::chooseMode(RoutingMode mode) {
    // After a generation the view shows causal routing whatever the chosen mode: choosing the mode that is
    // already chosen shows that mode's routing again.
    if (routing_->mode() == mode && generation_document_) {
        endGenerationView();
        requestRun();
        return;
    }
    routing_->setMode(mode);
}

void MainWindow::endGenerationView() {
    if (!generation_document_) return;
    generation_document_.reset();
    predictor_->clearGeneration();
}

void MainWindow::onPromptEdited() {
    // A typed edit ends the generated text's marking and the generation's trace.
    generated_from_byte_ = std::string::npos;
    endGenerationView();
    setStale(true);
    debounce_.start();
}

void MainWindow::runNow() {
    endGenerationView();  // a re-run shows the chosen mode's routing
    requestRun();
}

void MainWindow::requestRun() {
    debounce_.stop();
    if (generating_ || closing_) return;  // the generation streams its own views
    if (!model_ && !session_->isLoading()) {
        setStale(false);
        return;
    }
    run_clock_.start();
    // While replaying, the editor and controls show the trace; the live run keeps its own settings.
    session_->requestRun(replaying_ ? live_prompt_ : prompt_->text(), replaying_ ? live_mode_ : routing_->mode(),
                         replaying_ ? live_capacity_ : routing_->capacity(), generated_from_byte_,
                         replaying_ ? live_layer_capacity_ : routing_->layerCapacities(), interventions_);
    values_progress_->setVisible(interventions_.decision_values);
    values_cancel_->setVisible(interventions_.decision_values);
    if (interventions_.decision_values) values_progress_->setValue(0);
    stale_ = true;
    if (replaying_) return;  // the replayed trace on screen is not what is being run
    prompt_->setStale(true);
    heatmap_->setStale(true);
}

void MainWindow::forceDecision(int layer, int token, RoutingHeatmap::Force action) {
    auto& o = interventions_.overrides;
    // One entry per cell, and a whole-layer action replaces the layer's single ones.
    o.erase(std::remove_if(o.begin(), o.end(),
                           [&](const RoutingOverride& x) {
                               return x.layer == layer &&
                                      (token < 0 || x.position == token);
                           }),
            o.end());
    if (action != RoutingHeatmap::Force::Clear)
        o.push_back({layer, token < 0 ? RoutingOverride::kAllPositions : token, action == RoutingHeatmap::Force::Process});
    clear_overrides_action_->setEnabled(!o.empty());
    endGenerationView();
    requestRun();
}

void MainWindow::clearOverrides() {
    if (interventions_.overrides.empty()) return;
    interventions_.overrides.clear();
    clear_overrides_action_->setEnabled(false);
    endGenerationView();
    requestRun();
}

void MainWindow::setKeepCapacity(bool keep) {
    if (keep_capacity_action_->isChecked() != keep) keep_capacity_action_->setChecked(keep);
    if (interventions_.keep_capacity == keep) return;
    interventions_.keep_capacity = keep;
    if (!interventions_.overrides.empty()) requestRun();
}

void MainWindow::setDecisionValuesShown(bool shown) {
    if (decision_values_action_->isChecked() != shown) decision_values_action_->setChecked(shown);
    heatmap_->setShowDecisionValues(shown);
    if (interventions_.decision_values == shown) return;
    interventions_.decision_values = shown;
    if (!shown) {
        values_progress_->hide();
        values_cancel_->hide();
    }
    // Turning them off cancels a map still being computed: the run without them replaces it.
    requestRun();
}

void MainWindow::openReferenceModel(const QString& directory) {
    reference_chosen_ = true;
    session_->loadReference(directory);
}

bool MainWindow::resultsComplete() const {
    if (replaying_ || !model_) return true;
    if (!snapshot_ || snapshot_->job != session_->latestRunJob()) return false;
    return snapshot_->empty() ||
           (snapshot_->hasLosses() && (!interventions_.decision_values || snapshot_->trace.decision_values));
}

CorpusWindow* MainWindow::corpusWindow() {
    if (corpus_window_) return corpus_window_;
    corpus_window_ = new CorpusWindow(this);
    corpus_window_->setTheme(PlotTheme::fromPalette(QApplication::palette()));
    connect(corpus_window_, &CorpusWindow::openRequested, open_stats_action_, &QAction::trigger);
    connect(corpus_window_, &CorpusWindow::runRequested, this, [this] {
        const QStringList files = QFileDialog::getOpenFileNames(
            corpus_window_, tr("Count the routing over…"), QString(), tr("Text or JSON Lines (*.txt *.text *.md *.jsonl);;All files (*)"));
        if (!files.isEmpty()) runCorpusStatistics(files);
    });
    connect(corpus_window_, &CorpusWindow::cancelRequested, this, &MainWindow::cancelCorpusStatistics);
    connect(corpus_window_, &CorpusWindow::contextChosen, this, [this](const QString& text) {
        endGenerationView();
        setPrompt(text);
        raise();
        activateWindow();
    });
    return corpus_window_;
}

bool MainWindow::openStatistics(const QString& path) {
    try {
        auto stats = std::make_shared<const CorpusStats>(loadStats(path.toStdString()));
        corpusWindow()->setStats(stats, QFileInfo(path).fileName());
        corpus_window_->show();
        corpus_window_->raise();
        return true;
    } catch (const std::exception& e) {
        showError(tr("Cannot open the statistics: %1").arg(QString::fromUtf8(e.what())));
        return false;
    }
}

void MainWindow::runCorpusStatistics(const QStringList& corpus) {
    if (!model_ || corpus_cancel_) return;
    corpusWindow()->show();
    corpus_window_->setProgress(true, 0.0, 0);
    corpus_cancel_ = std::make_shared<std::atomic<bool>>(false);
    const auto cancel = corpus_cancel_;
    const std::string dir = model_->directory;
    const RoutingMode mode = routing_->mode();
    const double capacity = routing_->capacity();
    std::vector<std::string> inputs;
    for (const QString& f : corpus) inputs.push_back(f.toStdString());
    corpus_pool_.start([this, cancel, dir, mode, capacity, inputs] {
        QString error;
        std::shared_ptr<const CorpusStats> result;
        try {
            // A model of its own, on the CPU: the live view keeps the worker's.
            const auto model = Model::open(dir, "cpu");
            auto stats = statsForModel(*model, mode, capacity, std::min(256, model->config().max_seq_len));
            stats.sources = inputs;
            RunOptions options;
            options.mode = mode;
            options.capacity = capacity;
            auto last = std::chrono::steady_clock::now();
            countCorpus(*model, corpusFiles(inputs), options, stats, {}, cancel.get(),
                        [&](std::uint64_t done, std::uint64_t total) {
                            if (std::chrono::steady_clock::now() - last < std::chrono::milliseconds(100)) return;
                            last = std::chrono::steady_clock::now();
                            const double fraction = total ? double(done) / double(total) : 0.0;
                            const qint64 tokens = stats.tokens;
                            QMetaObject::invokeMethod(this, [this, fraction, tokens] {
                                if (corpus_window_) corpus_window_->setProgress(true, fraction, tokens);
                            }, Qt::QueuedConnection);
                        });
            result = std::make_shared<const CorpusStats>(std::move(stats));
        } catch (const std::exception& e) {
            error = QString::fromUtf8(e.what());
        }
        QMetaObject::invokeMethod(this, [this, result, error] {
            corpus_cancel_.reset();
            corpus_window_->setProgress(false);
            if (result) corpus_window_->setStats(result, tr("counted here"));
            else showError(tr("The corpus statistics failed: %1").arg(error));
            Q_EMIT corpusStatisticsDone(error);
        }, Qt::QueuedConnection);
    });
}

void MainWindow::cancelCorpusStatistics() {
    if (corpus_cancel_) corpus_cancel_->store(true);
}

void MainWindow::selectCell(int layer, int token) {
    if (snapshot_ && !snapshot_->empty()) heatmap_->selectCell(layer, token);
    else pending_selection_ = std::make_pair(layer, token);
}

void MainWindow::onRunFinished(const SnapshotPtr& snapshot) {
    if (generating_) return;
    if (replaying_) {
        // Kept for the return to live; the replayed trace stays on screen.
        live_snapshot_ = snapshot;
        stale_ = debounce_.isActive() || session_->isRunPending();
        Q_EMIT runApplied(snapshot);
        return;
    }
    applySnapshot(snapshot);
    if (snapshot->original_tokens_exact && !deferred_exports_.isEmpty())
        for (const QString& path : std::exchange(deferred_exports_, {})) exportTrace(path);
    if (pending_selection_ && !snapshot->empty()) {
        const auto [layer, token] = *pending_selection_;
        pending_selection_.reset();
        heatmap_->selectCell(layer, token);
    }
    setStale(debounce_.isActive() || session_->isRunPending());
    Q_EMIT runApplied(snapshot);
}

void MainWindow::onRunFailed(const QString& message) {
    setStale(debounce_.isActive() || session_->isRunPending());
    // A run queued behind a model that failed to open: the failed open already said why, with its reason.
    if (!model_ && !session_->isLoading()) return;
    showError(tr("The run failed: %1").arg(message));
}

void MainWindow::applySnapshot(const SnapshotPtr& snapshot) {
    if (!snapshot) return;
    snapshot_ = snapshot;
    if (!replaying_) live_snapshot_ = snapshot;
    // The heatmap first and painted at once: the run's latency ends when it shows (the run's first snapshot;
    // its losses follow in a second one).
    measuring_paint_ = run_clock_.isValid() && !generating_ && snapshot->job != measured_job_;
    if (measuring_paint_) measured_job_ = snapshot->job;
    heatmap_->setSnapshot(snapshot, /*repaint_now=*/true);
    loss_strip_->setSnapshot(snapshot);
    if (snapshot->trace.decision_values || !interventions_.decision_values) {
        values_progress_->hide();
        values_cancel_->hide();
    }
    depth_->setSnapshot(snapshot);
    capacity_->setSnapshot(snapshot);
    if (generating_ && generation_dense_kv_bytes_ > 0)
        capacity_->setGenerationKvCache(generation_kv_bytes_, generation_dense_kv_bytes_);
    predictor_->setSnapshot(snapshot);
    details_->setSnapshot(snapshot);
    if (heatmap_->selectedToken() >= 0) details_->setCell(heatmap_->selectedLayer(), heatmap_->selectedToken());

    const auto& s = *snapshot;
    if (!generating_) {
        if (s.tokens() == 0) {
            prompt_->setOverflowFrom(-1);
            prompt_->setNotice(prompt_->text().isEmpty()
                                   ? tr("Empty prompt: type something to see its routing.")
                                   : tr("This prompt gives no tokens: type some text to see its routing."));
            heatmap_->setPlaceholder(tr("Type a prompt above: how each layer routes each token appears here."));
        } else if (s.truncated) {
            // What the model saw ends where the snapshot's text ends; the rest is greyed in the editor.
            prompt_->setOverflowFrom(int(QString::fromStdString(s.prompt).size()));
            const QString length = s.original_tokens_exact
                                       ? tr("%1 tokens").arg(QLocale().toString(qulonglong(s.original_tokens)))
                                       : tr("over %1 tokens (counting…)").arg(QLocale().toString(qulonglong(s.original_tokens)));
            prompt_->setNotice(tr("Truncated: the prompt is %1, the model's context %2. Only the first %2 run; the "
                                  "rest is greyed out.")
                                   .arg(length)
                                   .arg(s.max_seq_len),
                               true);
        } else {
            prompt_->setOverflowFrom(-1);
            prompt_->setNotice(tr("%1 tokens of the model's %2-token context").arg(s.tokens()).arg(s.max_seq_len));
        }
    }
    if (replaying_)
        prompt_->setNotice(tr("The replayed trace's prompt (%1 tokens): read-only").arg(s.tokens()));
    last_model_ms_ = s.trace.elapsed_ms;
    updateCompare();
    updateStatus();
}

// ---------------------------------------------------------------------------------------------- generation

void MainWindow::startGeneration() {
    if (generating_ || !model_ || replaying_) return;
    debounce_.stop();
    generating_ = true;
    generated_tokens_ = 0;
    last_step_ms_ = -1.0;
    run_clock_.invalidate();  // the last run's clock would count the whole generation as its latency
    generation_kv_bytes_ = generation_dense_kv_bytes_ = 0;
    const auto settings = generation_->settings();
    generation_target_ = settings.max_new_tokens;
    generated_from_byte_ = std::string::npos;
    generation_document_.reset();
    // The generation streams its own views from here on; nothing shown is waiting for a run.
    setStale(false);
    prompt_->setGenerating(true);
    prompt_->setOverflowFrom(-1);
    prompt_->setNotice(tr("Generating in causal mode: each routed layer's predictor decides for each new token."));
    generation_->setRunning(true);
    generation_->setStatus(tr("starting…"));
    generate_action_->setEnabled(false);
    stop_action_->setEnabled(true);
    predictor_->startGeneration();
    session_->startGeneration(prompt_->text(), settings, routing_->capacity());
}

void MainWindow::generate(int count) {
    if (count > 0) {
        auto settings = generation_->settings();
        settings.max_new_tokens = count;
        generation_->setSettings(settings);
    }
    startGeneration();
}

void MainWindow::stopGeneration() {
    if (!generating_) return;
    generation_->setStatus(tr("stopping…"));
    session_->stopGeneration();
}

void MainWindow::onGenerationStep(const GenerationPoint& point, const SnapshotPtr& snapshot) {
    if (point.index >= 0) {
        prompt_->appendGenerated(QString::fromStdString(point.text));
        predictor_->addGenerationPoint(point);
        generated_tokens_ = point.index + 1;
        generation_kv_bytes_ = point.kv_cache_bytes;
        generation_dense_kv_bytes_ = point.dense_kv_cache_bytes;
        capacity_->setGenerationKvCache(point.kv_cache_bytes, point.dense_kv_cache_bytes);
        last_step_ms_ = point.step_ms;
        // The accuracy over the generated tokens only; the predictor table counts the prompt's too.
        generation_->setStatus(tr("%1 / %2 tokens · %3 ms/token · predictor %4% right on generated tokens")
                                   .arg(generated_tokens_)
                                   .arg(generation_target_)
                                   .arg(point.step_ms, 0, 'f', 1)
                                   .arg(point.accuracy * 100.0, 0, 'f', 0));
    }
    if (replaying_) return;  // stopping: the replayed trace stays on screen
    // Views repaint at a bounded rate however fast tokens come; the newest snapshot wins.
    pending_generation_snapshot_ = snapshot;
    if (!generation_paint_.isActive()) generation_paint_.start();
}

void MainWindow::onGenerationFinished(const GenerationSummary& summary) {
    generation_paint_.stop();
    if (pending_generation_snapshot_) applySnapshot(std::exchange(pending_generation_snapshot_, nullptr));
    generating_ = false;
    prompt_->setGenerating(false);
    generation_->setRunning(false);
    generate_action_->setEnabled(!replaying_);
    stop_action_->setEnabled(false);
    const QString text = QString::fromStdString(summary.text);
    if (replaying_) {
        live_prompt_ = text;
    } else if (prompt_->text() != text) {
        // Text still held back (a character split over byte tokens) or a stop before the first token.
        QSignalBlocker block(prompt_);
        prompt_->setText(text);
    }
    QString status;
    if (summary.cancelled) status = tr("stopped after %1 tokens").arg(summary.generated);
    else if (summary.hit_eos) status = tr("%1 tokens, ended at end-of-sequence").arg(summary.generated);
    else if (summary.hit_context) status = tr("%1 tokens, the model's context is full").arg(summary.generated);
    else status = tr("%1 tokens").arg(summary.generated);
    if (summary.tokens_per_second > 0) status += tr(" · %1 tokens/s").arg(summary.tokens_per_second, 0, 'f', 1);
    generation_->setStatus(status);
    if (summary.generated > 0) {
        // The view keeps the decisions the tokens were generated under (causal, at this capacity) until the
        // text, the mode or the capacity changes; an export meanwhile holds the generation step by step.
        generated_from_byte_ = summary.prompt_bytes;
        generation_document_ = summary.document;
        prompt_->setOverflowFrom(-1);
        prompt_->setNotice((summary.generated == 1
                                ? tr("Showing the causal routing the generated token was sampled under.")
                                : tr("Showing the causal routing the %1 generated tokens were sampled under.")
                                      .arg(summary.generated)) +
                           tr(" Edit the text or change the mode or capacity to run it again."));
        setStale(false);
        updateStatus();
    } else if (!closing_) {
        requestRun();  // nothing was generated: back to the chosen mode
    }
    Q_EMIT generationDone(summary);
}

void MainWindow::onGenerationFailed(const QString& message) {
    generation_paint_.stop();
    pending_generation_snapshot_.reset();
    generating_ = false;
    prompt_->setGenerating(false);
    generation_->setRunning(false);
    generation_->setStatus(QString());
    generate_action_->setEnabled(!replaying_);
    stop_action_->setEnabled(false);
    showError(tr("Generation failed: %1").arg(message));
    if (!closing_) requestRun();
}

// ---------------------------------------------------------------------------------------------- export

void MainWindow::exportTrace(const QString& path) {
    const SnapshotPtr snapshot = snapshot_;
    // A replayed trace exports as it was read (with its generation, if it had one).
    const auto generation = replaying_ ? replay_document_ : generation_document_;
    if (!generation && snapshot && !snapshot->original_tokens_exact) {
        // A long prompt's length is still being counted; the file gets the exact count a moment later.
        deferred_exports_.append(path);
        statusBar()->showMessage(tr("Exporting %1 once the prompt is counted…").arg(QDir::toNativeSeparators(path)));
        return;
    }
    if (!generation && (!snapshot || snapshot->empty())) {
        onExportDone(path, tr("Nothing to export yet: run a prompt first."));
        return;
    }
    statusBar()->showMessage(tr("Exporting %1…").arg(QDir::toNativeSeparators(path)));
    // Serialising 2,048 tokens x 32 layers takes a moment: off the GUI thread, from immutable values.
    export_pool_.start([this, path, snapshot, generation] {
        QString error;
        try {
            error = generation ? modscope::exportTrace(*generation, path)
                               : modscope::exportTrace(traceDocumentFor(*snapshot), path);
        } catch (const std::exception& e) {
            error = QString::fromUtf8(e.what());
        }
        QMetaObject::invokeMethod(this, [this, path, error] { onExportDone(path, error); }, Qt::QueuedConnection);
    });
}

void MainWindow::onExportDone(const QString& path, const QString& error) {
    if (error.isEmpty()) {
        statusBar()->showMessage(tr("Saved %1").arg(QDir::toNativeSeparators(path)), 6000);
    } else {
        statusBar()->clearMessage();
        showError(error);
    }
    Q_EMIT exportFinished(path, error);
}

QString MainWindow::exportFigure(const QString& which, const QString& path) {
    QString error;
    if (figureFormatFor(path) == FigureFormat::Unknown) {
        error = tr("Cannot export %1: use a file name ending in .png, .svg or .pdf").arg(QFileInfo(path).fileName());
    } else if (which == QLatin1String("heatmap")) {
        error = heatmap_->exportFigure(path);
    } else if (which == QLatin1String("capacity")) {
        // A mixture model's figure holds the expert loads beside the layers' bars (and the meters above them).
        error = capacity_->expertLoad()->isVisibleTo(capacity_) ? exportWidget(capacity_, path)
                                                                 : exportPlot(capacity_->plot(), path);
    } else if (which == QLatin1String("predictor")) {
        error = exportWidget(predictor_, path);
    } else if (which == QLatin1String("loss")) {
        error = exportPlot(loss_strip_, path);
    } else if (which == QLatin1String("depth")) {
        const QSize size = depth_->contentSize();
        error = exportPainting(path, size, [this, size](QPainter* p) { depth_->renderContent(p, size); });
    } else if (which == QLatin1String("window")) {
        error = figureFormatFor(path) == FigureFormat::Png ? saveImageAtomically(grab().toImage(), path)
                                                           : exportWidget(this, path);
    } else {
        error = tr("Unknown figure \"%1\"").arg(which);
    }
    onExportDone(path, error);
    return error;
}

void MainWindow::chooseTraceExport(const QString& suffix) {
    const QString dir = QStandardPaths::writableLocation(QStandardPaths::DocumentsLocation);
    const QString name = QStringLiteral("%1/modscope-trace.%2").arg(dir, suffix);
    const QString filter = suffix == QLatin1String("json") ? tr("Trace JSON (*.json)") : tr("Trace CSV (*.csv)");
    const QString path = QFileDialog::getSaveFileName(this, tr("Export Trace"), name, filter);
    if (!path.isEmpty()) exportTrace(path);
}

void MainWindow::chooseFigureExport(const QString& which) {
    const QString dir = QStandardPaths::writableLocation(QStandardPaths::PicturesLocation);
    QString selected;
    const QString path = QFileDialog::getSaveFileName(this, tr("Export Figure"),
                                                      QStringLiteral("%1/modscope-%2.png").arg(dir, which),
                                                      tr("PNG image (*.png);;SVG drawing (*.svg);;PDF document (*.pdf)"),
                                                      &selected);
    if (path.isEmpty()) return;
    QString file = path;
    if (QFileInfo(file).suffix().isEmpty()) {
        // The filter chosen decides when the name has no extension.
        file += selected.contains(QLatin1String("svg"))   ? QStringLiteral(".svg")
                : selected.contains(QLatin1String("pdf")) ? QStringLiteral(".pdf")
                                                          : QStringLiteral(".png");
    }
    exportFigure(which, file);
}

// ---------------------------------------------------------------------------------------------- replay and compare

bool MainWindow::openTrace(const QString& path) {
    std::shared_ptr<const TraceDocument> doc;
    SnapshotPtr snapshot;
    try {
        // Bounded to kMaxTraceFileBytes and quick to parse: read here rather than on a worker.
        doc = std::make_shared<const TraceDocument>(loadTrace(QFile::encodeName(path).toStdString()));
        snapshot = snapshotFromTrace(*doc);
    } catch (const std::exception& e) {
        refuseFile(tr("Trace refused"),
                   tr("Could not open the trace %1:\n%2").arg(QDir::toNativeSeparators(path), QString::fromUtf8(e.what())));
        return false;
    }
    if (snapshot->empty()) {
        refuseFile(tr("Trace refused"),
                   tr("Could not open the trace %1: it holds no tokens to show.").arg(QDir::toNativeSeparators(path)));
        return false;
    }
    if (generating_) stopGeneration();
    if (!replaying_) {
        live_prompt_ = prompt_->text();
        live_capacity_ = routing_->capacity();
        live_layer_capacity_ = routing_->layerCapacities();
        live_mode_ = routing_->mode();
        // An edit still waiting for its run is run now, so the live view is current when we return.
        if (debounce_.isActive()) requestRun();
    }
    replaying_ = true;
    replay_path_ = path;
    replay_document_ = doc;
    if (banner_->kind() == MessageBanner::Kind::Error) banner_->dismiss();
    {
        QSignalBlocker a(prompt_), b(routing_), c(topk_action_), d(causal_action_);
        prompt_->setText(QString::fromStdString(doc->prompt));
        prompt_->setOverflowFrom(-1);
        routing_->setCapacity(doc->run.capacity);
        routing_->setMode(doc->run.mode);
        topk_action_->setChecked(doc->run.mode == RoutingMode::TopK);
        causal_action_->setChecked(doc->run.mode == RoutingMode::Causal);
    }
    setLiveControlsEnabled(false);
    replay_label_->setText(tr("Replaying trace %1 (model %2, capacity %3%, %4) — read-only")
                               .arg(QFileInfo(path).fileName(), QString::fromStdString(doc->model.name))
                               .arg(doc->run.capacity * 100.0, 0, 'g', 4)
                               .arg(doc->run.mode == RoutingMode::TopK ? tr("top-k") : tr("causal")));
    replay_label_->setToolTip(QDir::toNativeSeparators(QFileInfo(path).absoluteFilePath()));
    replay_bar_->show();
    prompt_->setStale(false);
    heatmap_->setStale(false);
    run_clock_.invalidate();  // no run to time
    last_latency_ms_ = -1.0;
    applySnapshot(snapshot);
    updateWindowTitle();
    statusBar()->showMessage(tr("Opened trace %1").arg(QDir::toNativeSeparators(path)), 4000);
    return true;
}

void MainWindow::returnToLive() {
    if (!replaying_) return;
    replaying_ = false;
    replay_document_.reset();
    replay_path_.clear();
    replay_bar_->hide();
    {
        QSignalBlocker a(prompt_), b(routing_), c(topk_action_), d(causal_action_);
        prompt_->setText(live_prompt_);
        routing_->setCapacity(live_capacity_);
        routing_->setLayerCapacities(live_layer_capacity_);
        routing_->setMode(live_mode_);
        topk_action_->setChecked(live_mode_ == RoutingMode::TopK);
        causal_action_->setChecked(live_mode_ == RoutingMode::Causal);
    }
    setLiveControlsEnabled(true);
    run_clock_.invalidate();
    if (live_snapshot_) {
        applySnapshot(live_snapshot_);
    } else {
        // No live run yet (no model): nothing of the trace may stay on screen as if it were live.
        snapshot_.reset();
        heatmap_->setSnapshot(nullptr);
        updateCompare();
    }
    setStale(debounce_.isActive() || session_->isRunPending());
    updateWindowTitle();
    updateStatus();
}

void MainWindow::setLiveControlsEnabled(bool enabled) {
    prompt_->editor()->setReadOnly(!enabled);
    generation_->setEnabled(enabled);
    routing_->setEnabled(enabled);
    device_box_->setEnabled(enabled);
    for (QAction* a : {rerun_action_, topk_action_, causal_action_, capacity_up_action_, capacity_down_action_})
        a->setEnabled(enabled);
    generate_action_->setEnabled(enabled && !generating_);
    return_live_action_->setEnabled(!enabled);
}

void MainWindow::chooseTrace() {
    const QString dir = QStandardPaths::writableLocation(QStandardPaths::DocumentsLocation);
    const QString path = QFileDialog::getOpenFileName(this, tr("Open Trace"), dir, tr("Trace JSON (*.json)"));
    if (!path.isEmpty()) openTrace(path);
}

void MainWindow::pinRun() {
    if (!snapshot_ || snapshot_->empty()) {
        statusBar()->showMessage(tr("Nothing to pin yet: run a prompt first."), 4000);
        return;
    }
    const bool first = !pinned_;
    if (first) {
        // Unpinning puts the window back as it was: the compare dock's room comes from the heatmap.
        layout_before_pin_ = saveState();
        size_before_pin_ = size();
        range_lower_before_pin_ = heatmap_->xAxis->range().lower;
        range_upper_before_pin_ = heatmap_->xAxis->range().upper;
        tokens_before_pin_ = snapshot_->tokens();
    }
    pinned_ = snapshot_;
    updatePinActions();
    if (first) {
        // The pinned heatmap leaves its token axes and title to the live one above it (zoom linked; the dock's
        // label names the pinned run), so that its rows have the room. A short window cannot stack the depth
        // strip and the compare dock as well: the compare dock takes the depth strip's place as a tab.
        // Unpinning restores the layout.
        const bool short_window = height() < kShortWindowHeight;
        diff_view_->plot()->setMinimumHeight(short_window ? 56 : 70);
        if (short_window && depth_dock_->isVisible() && !depth_dock_->isFloating() &&
            dockWidgetArea(depth_dock_) == Qt::BottomDockWidgetArea)
            tabifyDockWidget(depth_dock_, compare_dock_);
        compare_dock_->show();
        compare_dock_->raise();
        // As much as the heatmap can spare: it keeps room for every layer's row and label. (As a tab, the
        // compare dock has the depth strip's room.)
        const int spare = centralWidget()->height() - kMinHeatmapHeight;
        if (!short_window)
            resizeDocks({compare_dock_}, {std::clamp(height() * 36 / 100, 160, std::max(160, spare))}, Qt::Vertical);
        else  // showing the dock grows the window for a moment, until the layout has taken in the tab
            QTimer::singleShot(0, this, [this, before = size_before_pin_] {
                if (pinned_ && !isMaximized() && !isFullScreen() && height() > before.height())
                    resize(before.expandedTo(minimumSizeHint()));
            });
    }
    // The pinned view starts where the live one is looking (showing the pinned run resets its own view,
    // which the linked zoom would pass on to the live one).
    const QCPRange looking = heatmap_->xAxis->range();
    updateCompare();
    linking_zoom_ = true;
    heatmap_->xAxis->setRange(looking);
    pinned_heatmap_->xAxis->setRange(looking);
    diff_view_->plot()->xAxis->setRange(looking);
    linking_zoom_ = false;
    heatmap_->replot(QCustomPlot::rpQueuedReplot);
    pinned_heatmap_->replot(QCustomPlot::rpQueuedReplot);
    diff_view_->plot()->replot(QCustomPlot::rpQueuedReplot);
}

void MainWindow::updatePinActions() {
    unpin_action_->setEnabled(pinned_ != nullptr);
    pin_action_->setText(pinned_ ? tr("Re&pin Run") : tr("&Pin Run"));
    pin_action_->setToolTip(pinned_ ? tr("Replace the pinned run with the run shown")
                                    : tr("Freeze the run shown and compare the view with it"));
}

void MainWindow::setStale(bool stale) {
    stale_ = stale;
    prompt_->setStale(stale);
    heatmap_->setStale(stale);
}

void MainWindow::unpin() {
    if (!pinned_) return;
    pinned_.reset();
    updatePinActions();
    compare_dock_->hide();
    // Before the zoom below: emptying the pinned view resets its range, which the linked zoom passes on.
    updateCompare();
    if (!layout_before_pin_.isEmpty()) restoreState(std::exchange(layout_before_pin_, {}));
    if (!isMaximized() && !isFullScreen() && size() != size_before_pin_ && size_before_pin_.isValid())
        resize(size_before_pin_);  // a small screen may have had to grow the window for the compare dock
    // The live view's zoom as it was, where the run shown has as many tokens; otherwise all of it.
    if (snapshot_ && snapshot_->tokens() == tokens_before_pin_) {
        heatmap_->xAxis->setRange(range_lower_before_pin_, range_upper_before_pin_);
        heatmap_->replot(QCustomPlot::rpQueuedReplot);
    } else {
        heatmap_->resetView();
    }
}

void MainWindow::updateCompare() {
    if (pinned_heatmap_->snapshot() != pinned_) pinned_heatmap_->setSnapshot(pinned_);
    // One range for both: a colour is the same logit in the live and the pinned run.
    heatmap_->setScaleCompanion(pinned_);
    pinned_heatmap_->setScaleCompanion(pinned_ ? snapshot_ : nullptr);
    diff_view_->setSnapshots(snapshot_, pinned_);
    if (!pinned_) {
        pinned_label_->setText(tr("Nothing pinned."));
        return;
    }
    const auto& p = *pinned_;
    const QString own = ownLayerCapacities(p.trace);
    pinned_label_->setText(tr("Pinned: %1 · capacity %2%%3 · %4 · %5 tokens")
                               .arg(QString::fromStdString(p.model_name))
                               .arg(p.trace.capacity * 100.0, 0, 'g', 4)
                               .arg(own.isEmpty() ? QString() : QStringLiteral(" (%1)").arg(own))
                               .arg(p.trace.mode == RoutingMode::TopK ? tr("top-k") : tr("causal"))
                               .arg(p.tokens()));
}

// ---------------------------------------------------------------------------------------------- UI

void MainWindow::chooseModelDirectory() {
    const QString start = model_ ? QString::fromStdString(model_->directory) : QDir::homePath();
    const QString dir = QFileDialog::getExistingDirectory(this, tr("Open Model Directory"), start);
    if (!dir.isEmpty()) openModel(dir);
}

void MainWindow::setTheme(ThemeChoice choice) {
    theme_ = choice;
    for (QAction* a : theme_group_->actions()) a->setChecked(ThemeChoice(a->data().toInt()) == choice);
    applyTheme(choice);
    applyPlotTheme();
}

void MainWindow::applyPlotTheme() {
    const PlotTheme theme = PlotTheme::fromPalette(QApplication::palette());
    heatmap_->setTheme(theme);
    loss_strip_->setTheme(theme);
    if (corpus_window_) corpus_window_->setTheme(theme);
    pinned_heatmap_->setTheme(theme);
    diff_view_->setTheme(theme);
    depth_->setTheme(theme);
    capacity_->setTheme(theme);
    predictor_->setTheme(theme);
    details_->setTheme(theme);
    prompt_->setTheme(theme);
    banner_->update();
}

void MainWindow::showShortcuts() {
    QList<QPair<QString, QString>> heatmap_keys = {
        {tr("Mouse wheel / drag"), tr("Heatmap: zoom / pan along the tokens")},
        {tr("Click"), tr("Heatmap: lock a cell (click again to release)")},
        {tr("← → ↑ ↓"), tr("Heatmap: move the locked cell")},
        {tr("Esc"), tr("Heatmap: release the locked cell")},
        {tr("+ / −"), tr("Heatmap: zoom in / out")},
        {tr("Home / double-click"), tr("Heatmap: show every token")},
        {tr("P / S"), tr("Heatmap: force the locked cell's layer to process / skip its token")},
        {tr("Delete"), tr("Heatmap: clear the locked cell's override")},
        {tr("Right-click"), tr("Heatmap: force a cell, or (on a layer's label) the whole layer")},
    };
    ShortcutSheet sheet(actions(), heatmap_keys, this);
    sheet.exec();
}

void MainWindow::showAbout() {
    QString model = tr("No model loaded.");
    if (model_) {
        model = tr("<b>Model</b>: %1 (%2 parameters, %3 layers, %4 routed, context %5)<br><b>Directory</b>: %6<br>"
                   "<b>Device</b>: %7")
                    .arg(QString::fromStdString(model_->name).toHtmlEscaped(), formatParameters(model_->parameters))
                    .arg(model_->config.n_layers)
                    .arg(model_->config.routed_layers.size())
                    .arg(model_->config.max_seq_len)
                    .arg(QDir::toNativeSeparators(QString::fromStdString(model_->directory)).toHtmlEscaped(),
                         QString::fromStdString(model_->device));
    }
    QMessageBox::about(this, tr("About ModScope"),
                       tr("<h3>ModScope %1</h3><p>See how a Mixture-of-Depths transformer spends its compute: which "
                          "tokens each layer processes and which skip ahead.</p><p>%2</p><p>Qt %3 · CUDA %4</p>")
                           .arg(QCoreApplication::applicationVersion(), model, QString::fromLatin1(qVersion()),
                                cudaAvailable() ? tr("available") : tr("not available")));
}

void MainWindow::applyDefaultDockSizes() {
    const int w = width(), h = height();
    resizeDocks({capacity_dock_}, {std::max(420, w * 29 / 100)}, Qt::Horizontal);
    // The details panel is empty until a cell is locked: the charts get most of the column.
    resizeDocks({capacity_dock_, predictor_dock_, details_dock_}, {h * 37 / 100, h * 40 / 100, h * 23 / 100},
                Qt::Vertical);
    resizeDocks({prompt_dock_, depth_dock_}, {std::max(150, h * 16 / 100), std::max(130, h * 17 / 100)}, Qt::Vertical);
}

void MainWindow::resetLayout() {
    restoreState(default_state_);
    for (QDockWidget* d : {prompt_dock_, depth_dock_, details_dock_, capacity_dock_, predictor_dock_}) {
        d->setFloating(false);
        d->show();
    }
    compare_dock_->setFloating(false);
    compare_dock_->setVisible(pinned_ != nullptr);
    applyDefaultDockSizes();
}

void MainWindow::showError(const QString& text) { banner_->showMessage(MessageBanner::Kind::Error, text); }

void MainWindow::refuseFile(const QString& title, const QString& text) {
    showError(text);
    // A file the user chose was refused: say so where it cannot be missed. One window-modal dialog, reused,
    // opened without a nested event loop, so runs and the rest of the app carry on behind it.
    if (!refusal_dialog_) {
        refusal_dialog_ = new QMessageBox(QMessageBox::Warning, title, text, QMessageBox::Ok, this);
        refusal_dialog_->setObjectName(QStringLiteral("refusalDialog"));
        refusal_dialog_->setWindowModality(Qt::WindowModal);
    }
    refusal_dialog_->setWindowTitle(title);
    refusal_dialog_->setText(text);
    refusal_dialog_->open();
}

void MainWindow::updateWindowTitle() {
    if (replaying_) {
        setWindowTitle(tr("Replaying %1 (read-only) — ModScope").arg(QFileInfo(replay_path_).fileName()));
        return;
    }
    setWindowTitle(model_ ? tr("%1 — ModScope").arg(QString::fromStdString(model_->name)) : tr("ModScope"));
}

void MainWindow::updateStatus() {
    status_device_->setText(model_ ? tr("device %1 · %2")
                                         .arg(QString::fromStdString(model_->device), QString::fromStdString(model_->backend))
                                   : tr("no device"));
    status_device_->setToolTip(model_ ? tr("The backend that runs the model: cpu-kernels (fused x86-64 float32 kernels) "
                                           "or ops (LibTorch's operators, as on a GPU); MODSCOPE_CPU_KERNELS=0 "
                                           "chooses ops")
                                      : QString());
    status_model_->setText(model_ ? tr("%1 · %2 parameters")
                                        .arg(QString::fromStdString(model_->name), formatParameters(model_->parameters))
                                  : tr("no model"));
    status_model_->setToolTip(model_ ? QDir::toNativeSeparators(QString::fromStdString(model_->directory)) : QString());
    const int tokens = snapshot_ ? snapshot_->tokens() : 0;
    status_tokens_->setText((tokens == 1 ? tr("1 token") : tr("%1 tokens").arg(tokens)) +
                            (snapshot_ && snapshot_->truncated ? tr(" (truncated)") : QString()));
    if (generating_ || (generation_document_ && last_step_ms_ >= 0))
        // A generation's views are not runs the user waits for: its speed is per token.
        status_latency_->setText(last_step_ms_ >= 0 ? tr("generation %1 ms/token").arg(last_step_ms_, 0, 'f', 1)
                                                    : tr("generation –"));
    else if (last_latency_ms_ >= 0)
        status_latency_->setText(tr("latency %1 ms (model %2 ms)").arg(last_latency_ms_, 0, 'f', 1).arg(last_model_ms_, 0, 'f', 1));
    else
        status_latency_->setText(tr("latency –"));
}

QString MainWindow::statusText() const {
    return QStringList{status_device_->text(), status_model_->text(), status_tokens_->text(), status_latency_->text()}
        .join(QStringLiteral(" | "));
}

// ---------------------------------------------------------------------------------------------- events

void MainWindow::showEvent(QShowEvent* event) {
    QMainWindow::showEvent(event);
    if (first_show_done_) return;
    first_show_done_ = true;
    if (!layout_restored_) applyDefaultDockSizes();
    else QTimer::singleShot(0, this, &MainWindow::regrowSideColumn);  // a layout saved squeezed
}

void MainWindow::resizeEvent(QResizeEvent* event) {
    QMainWindow::resizeEvent(event);
    if (first_show_done_ && event->size().width() > event->oldSize().width())
        QTimer::singleShot(0, this, &MainWindow::regrowSideColumn);
}

void MainWindow::regrowSideColumn() {
    // A narrow window squeezes the side column below what its tables need; Qt gives the width a wider
    // window adds to the heatmap, so the squeeze would stick (and be saved). Give the column back what it
    // needs where there is room; a column the user made wider than that is left alone.
    if (!capacity_dock_->isVisible() || capacity_dock_->isFloating()) return;
    int needed = 0;
    for (QDockWidget* d : {capacity_dock_, predictor_dock_, details_dock_})
        if (d->isVisible() && !d->isFloating()) needed = std::max(needed, d->sizeHint().width());
    const int room = width() - kMinHeatmapColumn;
    const int target = std::min(needed, room);
    if (target > capacity_dock_->width()) resizeDocks({capacity_dock_}, {target}, Qt::Horizontal);
}

void MainWindow::closeEvent(QCloseEvent* event) {
    closing_ = true;
    debounce_.stop();
    saveSettings();
    // Raises every cancel flag and joins the engine thread: no run or generation outlives the window.
    session_->shutdown();
    event->accept();
}

void MainWindow::changeEvent(QEvent* event) {
    QMainWindow::changeEvent(event);
    // The system switched light/dark (or setTheme did): QCustomPlot does not follow palettes by itself.
    if (event->type() == QEvent::PaletteChange && heatmap_) applyPlotTheme();
}

void MainWindow::dragEnterEvent(QDragEnterEvent* event) {
    const auto* mime = event->mimeData();
    if (mime->hasUrls() && !mime->urls().isEmpty() && mime->urls().first().isLocalFile()) event->acceptProposedAction();
}

void MainWindow::dropEvent(QDropEvent* event) {
    const auto urls = event->mimeData()->urls();
    if (urls.isEmpty() || !urls.first().isLocalFile()) return;
    const QFileInfo file(urls.first().toLocalFile());
    if (file.isFile() && file.suffix().compare(QLatin1String("json"), Qt::CaseInsensitive) == 0) openTrace(file.filePath());
    else openModel(modelDirectoryFor(file.filePath()));
    event->acceptProposedAction();
}

}  // namespace modscope
