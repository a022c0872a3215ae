// PromptEditor: where the prompt is typed. Shows what the model did not see (text past its context,
// greyed) and whether the views are up to date; generated text streams in at the end, highlighted.
#pragma once

#include <QPlainTextEdit>
#include <QWidget>

#include "plot_theme.h"

class QLabel;

namespace modscope {

class PromptEditor : public QWidget {
    Q_OBJECT
public:
    explicit PromptEditor(QWidget* parent = nullptr);

    QPlainTextEdit* editor() const { return edit_; }
    QString text() const { return edit_->toPlainText(); }
    // Replaces the text; emits edited() like typing does.
    void setText(const QString& text);

    // Characters from position on were cut by the model's context (-1: none).
    void setOverflowFrom(int position);
    int overflowFrom() const { return overflow_from_; }
    // A one-line notice under the editor (truncation, empty prompt); empty hides it.
    void setNotice(const QString& text, bool warning = false);
    QString notice() const;
    // The views show an older text than this one.
    void setStale(bool stale);
    bool isStale() const { return stale_; }

    // While generating, the text is read-only and sampled text is appended without emitting edited().
    void setGenerating(bool generating);
    void appendGenerated(const QString& text);
    void setTheme(const PlotTheme& theme);

Q_SIGNALS:
    void edited();

private:
    void updateSelections();
    void updateStatus();

    QPlainTextEdit* edit_;
    QLabel* status_;
    QLabel* notice_;
    PlotTheme theme_;
    int overflow_from_ = -1;
    int generated_from_ = -1;
    bool generating_ = false;
    bool stale_ = false;
    bool programmatic_ = false;
};

}  // namespace modscope
