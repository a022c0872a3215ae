// MainWindow: the prompt, the routing heatmap and the panels around it, wired to one EngineSession.
//
// Every edit, capacity or mode change becomes a run request (edits debounced); the session cancels runs a
// newer request has made out of date, and only the newest result reaches the views, all of which take
// the same immutable snapshot. The window never waits on the engine.
#pragma once

#include <QElapsedTimer>
#include <QMainWindow>
#include <QMap>
#include <QVariant>
#include <QMessageBox>
#include <QPointer>
#include <QThreadPool>
#include <QTimer>

#include <atomic>
#include <memory>
#include <optional>

#include "engine_jobs.h"
#include "heatmap_color_scale.h"
#include "routing_heatmap.h"
#include "theme_manager.h"

class QActionGroup;
class QCPAxis;
class QComboBox;
class QDockWidget;
class QLabel;
class QMenu;
class QProgressBar;
class QSettings;
class QToolButton;

namespace modscope {

class CapacityChart;
class CellDetailsPanel;
class EngineSession;
class GenerationControls;
class MessageBanner;
class PredictorPanel;
class PromptEditor;
class RoutingControls;
class RoutingDiffView;
class CorpusWindow;
class TokenDepthView;
class TokenLossStrip;
struct TraceDocument;

class MainWindow : public QMainWindow {
    Q_OBJECT
public:
    struct Options {
        QSettings* settings = nullptr;  // null: nothing restored or saved (screenshots)
        QString device = QStringLiteral("auto");
        bool restore_layout = true;
    };
    explicit MainWindow(const Options& options, QWidget* parent = nullptr);
    ~MainWindow() override;

    // The prompt shown on a first start.
    static QString samplePrompt();

    // Opens a model directory on the worker thread; on failure the current model stays in use.
    void openModel(const QString& directory);
    // The bundled default model (paths.h); a clear message when there is none.
    void openDefaultModel();
    void setPrompt(const QString& text);
    void setCapacity(double fraction);
    void setRoutingMode(RoutingMode mode);
    void setTheme(ThemeChoice choice);
    // The heatmaps' colour scale (live and pinned alike). Fixed without a range of its own takes the range on
    // screen, so the colours stay as they are and keep still from then on.
    void setColorScale(const HeatmapColorScale& scale);
    HeatmapColorScale colorScale() const;
    void fixColorScaleAtCurrentRange();
    // Runs the prompt now (no debounce).
    void runNow();
    // Generates tokens after the prompt with the generation panel's settings (tokens = count when > 0).
    void generate(int count = 0);
    // Locks a heatmap cell; before the first run it is locked when that run arrives.
    void selectCell(int layer, int token);

    // Shows a saved trace (.json, one document) in the panels, read-only, without its model; the live
    // model keeps running behind it. On failure the banner says why and nothing else changes.
    bool openTrace(const QString& path);
    // Back to the live model's view and controls.
    void returnToLive();
    bool isReplaying() const { return replaying_; }

    // Freezes the run shown (live or replayed) and compares the view with it until unpinned.
    void pinRun();
    // The command line's options hold for this start only: their keys keep their stored values unless the
    // user changes them in the window. Called once the options are applied.
    void keepOutOfSettings(const QStringList& keys);
    void unpin();

    // Exports write atomically. Trace exports finish on a pool thread (exportFinished); figures at once.
    void exportTrace(const QString& path);
    QString exportFigure(const QString& which, const QString& path);  // "heatmap", "capacity", "predictor", "loss", "depth", "window"

    // Interventions (docs/MODEL.md): force a routed layer's decision on a token (token -1: every token of the
    // layer), clear them, choose exact flips or keep capacity, and show each decision's value on the heatmap.
    // Each re-runs the prompt. Overrides stay with the window while the prompt changes; those beyond its tokens
    // wait until it has them.
    void forceDecision(int layer, int token, RoutingHeatmap::Force action);
    void clearOverrides();
    void setKeepCapacity(bool keep);
    void setDecisionValuesShown(bool shown);
    const RunInterventions& interventions() const { return interventions_; }
    // The model whose loss the loss strip shows beside the open one's (same tokenizer): the bundled dense model
    // unless another is opened here; an empty directory shows none.
    void openReferenceModel(const QString& directory);
    const QString& referenceName() const { return reference_name_; }

    // Corpus statistics (docs/STATS_FORMAT.md) in the Corpus window: a file modscope-stats wrote, or the open
    // model's routing counted over a corpus (files, .jsonl files or a folder) on a thread of its own, with
    // progress and cancel. Choosing an example context there makes it the prompt.
    CorpusWindow* corpusWindow();
    bool openStatistics(const QString& path);
    void runCorpusStatistics(const QStringList& corpus);
    void cancelCorpusStatistics();
    bool isCountingCorpus() const { return corpus_cancel_ != nullptr; }

    // For tests and the screenshot mode.
    RoutingHeatmap* heatmap() const { return heatmap_; }
    TokenLossStrip* lossStrip() const { return loss_strip_; }
    PromptEditor* promptEditor() const { return prompt_; }
    RoutingControls* routingControls() const { return routing_; }
    PredictorPanel* predictorPanel() const { return predictor_; }
    CapacityChart* capacityChart() const { return capacity_; }
    TokenDepthView* depthView() const { return depth_; }
    CellDetailsPanel* detailsPanel() const { return details_; }
    GenerationControls* generationControls() const { return generation_; }
    MessageBanner* banner() const { return banner_; }
    // The dialog that names why a model or trace was refused (null until one was); it does not block.
    QMessageBox* refusalDialog() const { return refusal_dialog_; }
    QLabel* replayLabel() const { return replay_label_; }
    RoutingHeatmap* pinnedHeatmap() const { return pinned_heatmap_; }
    RoutingDiffView* diffView() const { return diff_view_; }
    QDockWidget* compareDock() const { return compare_dock_; }
    const SnapshotPtr& pinnedSnapshot() const { return pinned_; }
    // The newest live run, also while a trace is replayed.
    const SnapshotPtr& liveSnapshot() const { return live_snapshot_; }
    EngineSession* session() const { return session_.get(); }
    const SnapshotPtr& snapshot() const { return snapshot_; }
    const std::optional<ModelInfo>& model() const { return model_; }
    bool isStale() const { return stale_; }
    // The newest run's second snapshot has arrived: its losses and, when asked, its decision values.
    bool resultsComplete() const;
    QString statusText() const;  // the status bar's fields, joined

Q_SIGNALS:
    void modelChanged(const modscope::ModelInfo& info);
    void modelLoadFailed(const QString& message);
    void runApplied(const modscope::SnapshotPtr& snapshot);
    void generationDone(const modscope::GenerationSummary& summary);
    void exportFinished(const QString& path, const QString& error);
    void corpusStatisticsDone(const QString& error);  // empty: the window shows them

protected:
    void closeEvent(QCloseEvent* event) override;
    void changeEvent(QEvent* event) override;
    void dragEnterEvent(QDragEnterEvent* event) override;
    void dropEvent(QDropEvent* event) override;
    void showEvent(QShowEvent* event) override;
    void resizeEvent(QResizeEvent* event) override;

private:
    void regrowSideColumn();
    // Pin Run's wording and Unpin's state follow whether a run is pinned.
    void updatePinActions();
    // Whether what is shown is older than what the editor and controls ask for: the flag and its marks.
    void setStale(bool stale);
    // The value saveSettings would store under key ("view/theme", "routing/mode", "routing/capacity",
    // "prompt/text").
    QVariant preference(const QString& key) const;
    void buildActions();
    void buildMenus();
    void buildToolBar();
    void buildDocks();
    void restoreSettings();
    void saveSettings();
    void applyPlotTheme();
    void updateRecentMenu();
    void updateModelMenu();  // checks the bundled model that is open, if any
    void updateStatus();
    void updateWindowTitle();

    void onPromptEdited();
    // The user changed what runs: the generation's view, trace and accuracy curve no longer apply.
    void endGenerationView();
    // The top-k or causal view, from the menu, its shortcuts or setRoutingMode.
    void chooseMode(RoutingMode mode);
    void requestRun();
    void onModelLoaded(const ModelInfo& info);
    void onModelLoadFailed(const QString& message);
    void onRunFinished(const SnapshotPtr& snapshot);
    void onRunFailed(const QString& message);
    void applySnapshot(const SnapshotPtr& snapshot);
    void startGeneration();
    void stopGeneration();
    void onGenerationStep(const GenerationPoint& point, const SnapshotPtr& snapshot);
    void onGenerationFinished(const GenerationSummary& summary);
    void onGenerationFailed(const QString& message);
    void onDeviceChanged();

    void chooseModelDirectory();
    void chooseTrace();
    void setLiveControlsEnabled(bool enabled);
    void updateCompare();
    void linkZoom(RoutingHeatmap* from, QCPAxis* to_x, QCPAxis* to_y);
    void chooseTraceExport(const QString& suffix);
    void chooseFigureExport(const QString& which);
    void showShortcuts();
    void showAbout();
    void resetLayout();
    void showError(const QString& text);
    void refuseFile(const QString& title, const QString& text);
    void onExportDone(const QString& path, const QString& error);
    void applyDefaultDockSizes();
    static QString modelDirectoryFor(const QString& path);

    Options options_;
    std::unique_ptr<EngineSession> session_;
    std::optional<ModelInfo> model_;
    QString loading_dir_;
    QString pending_device_;
    SnapshotPtr snapshot_;
    SnapshotPtr pending_generation_snapshot_;
    std::shared_ptr<const TraceDocument> generation_document_;
    std::size_t generated_from_byte_ = std::string::npos;
    bool stale_ = false;
    bool generating_ = false;
    bool closing_ = false;
    int generated_tokens_ = 0;
    int generation_target_ = 0;
    QTimer debounce_;
    QTimer generation_paint_;
    QElapsedTimer run_clock_;
    bool measuring_paint_ = false;
    double last_latency_ms_ = -1.0;
    double last_step_ms_ = -1.0;  // the newest generated token's step, while or after generating
    double last_model_ms_ = -1.0;
    ThemeChoice theme_ = ThemeChoice::System;
    QByteArray default_state_;
    QMap<QString, QVariant> start_only_;  // keepOutOfSettings: key -> the value the command line gave
    // The window before the first pin, restored by unpin.
    QByteArray layout_before_pin_;
    double range_lower_before_pin_ = 0.0, range_upper_before_pin_ = 0.0;  // the heatmap's token range
    int tokens_before_pin_ = 0;
    QSize size_before_pin_;
    // The heatmap's column and height a layout change leaves it at least (regrowSideColumn, pinRun).
    static constexpr int kMinHeatmapColumn = 640;
    static constexpr int kMinHeatmapHeight = 260;
    bool layout_restored_ = false;
    bool first_show_done_ = false;
    std::optional<double> startup_capacity_;
    std::optional<std::pair<int, int>> pending_selection_;
    QStringList deferred_exports_;  // trace exports waiting for a long prompt's token count
    std::int64_t generation_kv_bytes_ = 0, generation_dense_kv_bytes_ = 0;

    // Replay of a saved trace, and the pinned run.
    bool replaying_ = false;
    QString replay_path_;
    std::shared_ptr<const TraceDocument> replay_document_;
    SnapshotPtr live_snapshot_;
    QString live_prompt_;  // the editor's text while it shows the trace's prompt
    double live_capacity_ = 0.0;
    std::vector<double> live_layer_capacity_;
    RoutingMode live_mode_ = RoutingMode::TopK;
    SnapshotPtr pinned_;
    bool linking_zoom_ = false;

    // Views.
    MessageBanner* banner_ = nullptr;
    QPointer<QMessageBox> refusal_dialog_;
    RoutingHeatmap* heatmap_ = nullptr;
    PromptEditor* prompt_ = nullptr;
    GenerationControls* generation_ = nullptr;
    RoutingControls* routing_ = nullptr;
    TokenDepthView* depth_ = nullptr;
    CapacityChart* capacity_ = nullptr;
    PredictorPanel* predictor_ = nullptr;
    CellDetailsPanel* details_ = nullptr;
    QComboBox* device_box_ = nullptr;
    QDockWidget* prompt_dock_ = nullptr;
    QDockWidget* depth_dock_ = nullptr;
    QDockWidget* details_dock_ = nullptr;
    QDockWidget* capacity_dock_ = nullptr;
    QDockWidget* predictor_dock_ = nullptr;
    QDockWidget* compare_dock_ = nullptr;
    QWidget* replay_bar_ = nullptr;
    QLabel* replay_label_ = nullptr;
    RoutingHeatmap* pinned_heatmap_ = nullptr;
    QLabel* pinned_label_ = nullptr;
    RoutingDiffView* diff_view_ = nullptr;

    // Status bar fields.
    QLabel* status_device_ = nullptr;
    QLabel* status_model_ = nullptr;
    QLabel* status_tokens_ = nullptr;
    QLabel* status_latency_ = nullptr;

    // Actions.
    QMenu* recent_menu_ = nullptr;
    QMenu* model_menu_ = nullptr;      // the bundled models (modscope::bundledModels), the open one checked
    QActionGroup* model_group_ = nullptr;
    QMenu* view_menu_ = nullptr;
    QAction* open_action_ = nullptr;
    QAction* reload_action_ = nullptr;
    QAction* open_trace_action_ = nullptr;
    QAction* return_live_action_ = nullptr;
    QAction* pin_action_ = nullptr;
    QAction* unpin_action_ = nullptr;
    QAction* export_json_action_ = nullptr;
    QAction* export_csv_action_ = nullptr;
    QAction* export_heatmap_action_ = nullptr;
    QAction* export_capacity_action_ = nullptr;
    QAction* export_predictor_action_ = nullptr;
    QAction* export_depth_action_ = nullptr;
    QAction* export_loss_action_ = nullptr;
    QAction* export_window_action_ = nullptr;
    QAction* quit_action_ = nullptr;
    QAction* generate_action_ = nullptr;
    QAction* stop_action_ = nullptr;
    QAction* rerun_action_ = nullptr;
    QAction* topk_action_ = nullptr;
    QAction* causal_action_ = nullptr;
    QAction* capacity_up_action_ = nullptr;
    QAction* capacity_down_action_ = nullptr;
    QAction* reset_view_action_ = nullptr;
    QAction* focus_prompt_action_ = nullptr;
    QAction* reset_layout_action_ = nullptr;
    QAction* shortcuts_action_ = nullptr;
    QAction* about_action_ = nullptr;
    QAction* decision_values_action_ = nullptr;
    QAction* keep_capacity_action_ = nullptr;
    QAction* clear_overrides_action_ = nullptr;
    QAction* open_reference_action_ = nullptr;
    QAction* no_reference_action_ = nullptr;
    TokenLossStrip* loss_strip_ = nullptr;
    QProgressBar* values_progress_ = nullptr;
    QToolButton* values_cancel_ = nullptr;
    RunInterventions interventions_;
    QString reference_name_;       // empty: no reference model
    bool reference_chosen_ = false;  // opened (or dropped) here: the bundled dense one is no longer the default
    std::uint64_t measured_job_ = 0;  // the run whose first paint the status bar's latency measured
    QActionGroup* theme_group_ = nullptr;
    QActionGroup* scale_group_ = nullptr;
    QAction* fixed_range_action_ = nullptr;

    // Last: destroyed first, waiting for exports still writing (they post back to this window).
    QThreadPool export_pool_;
    QThreadPool corpus_pool_;  // the Corpus window's count: its own model, its own thread
    std::shared_ptr<std::atomic<bool>> corpus_cancel_;  // set while one runs
    CorpusWindow* corpus_window_ = nullptr;
    QAction* corpus_action_ = nullptr;
    QAction* open_stats_action_ = nullptr;
};

}  // namespace modscope
