// CorpusWindow: routing statistics over a corpus (docs/STATS_FORMAT.md), per routed layer: the pieces most
// often processed and skipped, the rate by token class and by position, the routed layers' co-selection and
// depth paths, and the predictor's agreement by class. Clicking a piece lists its example contexts; choosing a
// context asks for it as the prompt. A statistics file opens here, or one is computed in the background
// (progress and Cancel here, the work elsewhere: the window only shows CorpusStats values).
#pragma once

#include <QWidget>

#include <memory>

#include "modscope/corpus_stats.h"
#include "plot_theme.h"

class QComboBox;
class QCustomPlot;
class QLabel;
class QListWidget;
class QProgressBar;
class QPushButton;
class QTabWidget;

namespace modscope {

class CorpusWindow : public QWidget {
    Q_OBJECT
public:
    explicit CorpusWindow(QWidget* parent = nullptr);

    void setStats(std::shared_ptr<const CorpusStats> stats, const QString& origin);
    const std::shared_ptr<const CorpusStats>& stats() const { return stats_; }
    void setTheme(const PlotTheme& theme);
    // A computation in progress: fraction done (0 ... 1) and tokens so far; running false hides the bar.
    void setProgress(bool running, double fraction = 0.0, qint64 tokens = 0);

    // The routed layer shown (its index in stats().layers) and the piece whose contexts are listed.
    void selectLayer(int routed_index);
    void selectPiece(int id);
    int selectedPiece() const { return piece_; }
    QListWidget* contexts() const { return contexts_; }
    QTabWidget* tabs() const { return tabs_; }
    QString headline() const;
    // The tab shown as a figure (PNG, SVG, PDF); returns an empty string or what went wrong.
    QString exportFigure(const QString& path);
    // The bars of the piece charts: the ids they show, top to bottom.
    const std::vector<int>& processedIds() const { return processed_ids_; }
    const std::vector<int>& skippedIds() const { return skipped_ids_; }

Q_SIGNALS:
    void openRequested();
    void runRequested();
    void cancelRequested();
    void contextChosen(const QString& text);  // the context's text, markers removed

private:
    void rebuild();
    void fillPieces();
    void fillClasses();
    void fillPositions();
    void fillLayers();
    void showContexts();

    std::shared_ptr<const CorpusStats> stats_;
    PlotTheme theme_;
    int layer_ = 0, piece_ = -1;
    std::vector<int> processed_ids_, skipped_ids_;
    QLabel* header_;
    QComboBox* layer_box_;
    QProgressBar* progress_;
    QPushButton* cancel_;
    QTabWidget* tabs_;
    QCustomPlot *processed_plot_, *skipped_plot_, *classes_plot_, *positions_plot_, *co_plot_, *paths_plot_;
    QLabel* contexts_label_;
    QListWidget* contexts_;
};

}  // namespace modscope
