#include "prompt_editor.h"

#include <QHBoxLayout>
#include <QLabel>
#include <QScrollBar>
#include <QTextBlock>
#include <QVBoxLayout>

namespace modscope {

PromptEditor::PromptEditor(QWidget* parent) : QWidget(parent) {
    auto* layout = new QVBoxLayout(this);
    layout->setContentsMargins(6, 6, 6, 4);
    layout->setSpacing(3);
    edit_ = new QPlainTextEdit(this);
    edit_->setPlaceholderText(tr("Type a prompt: every edit re-runs the model and shows how each layer routes "
                                 "each token."));
    edit_->setTabChangesFocus(true);
    edit_->setLineWrapMode(QPlainTextEdit::WidgetWidth);
    QFont f = edit_->font();
    f.setPointSizeF(f.pointSizeF() * 1.1);
    edit_->setFont(f);
    layout->addWidget(edit_, 1);

    auto* row = new QHBoxLayout;
    row->setSpacing(12);
    status_ = new QLabel(this);
    notice_ = new QLabel(this);
    notice_->setWordWrap(false);
    notice_->setTextFormat(Qt::PlainText);
    row->addWidget(status_);
    row->addWidget(notice_, 1);
    layout->addLayout(row);

    connect(edit_, &QPlainTextEdit::textChanged, this, [this] {
        if (programmatic_ || generating_) return;
        Q_EMIT edited();
    });
    theme_ = PlotTheme::fromPalette(palette());
    updateStatus();
}

void PromptEditor::setText(const QString& text) {
    generated_from_ = -1;
    edit_->setPlainText(text);  // emits edited() through textChanged
    edit_->moveCursor(QTextCursor::End);
}

void PromptEditor::setOverflowFrom(int position) {
    if (position == overflow_from_) return;
    overflow_from_ = position;
    updateSelections();
}

void PromptEditor::setNotice(const QString& text, bool warning) {
    notice_->setText(text);
    notice_->setToolTip(text);
    QPalette p = notice_->palette();
    p.setColor(QPalette::WindowText, warning ? theme_.warning : theme_.muted);
    notice_->setPalette(p);
    QFont f = notice_->font();
    f.setBold(warning);
    notice_->setFont(f);
}

QString PromptEditor::notice() const { return notice_->text(); }

void PromptEditor::setStale(bool stale) {
    if (stale == stale_) return;
    stale_ = stale;
    updateStatus();
}

void PromptEditor::setGenerating(bool generating) {
    generating_ = generating;
    edit_->setReadOnly(generating);
    if (generating) {
        generated_from_ = edit_->document()->characterCount() - 1;
    } else {
        generated_from_ = -1;
    }
    updateSelections();
    updateStatus();
}

void PromptEditor::appendGenerated(const QString& text) {
    if (text.isEmpty()) return;
    programmatic_ = true;
    QTextCursor c(edit_->document());
    c.movePosition(QTextCursor::End);
    c.insertText(text);
    programmatic_ = false;
    edit_->verticalScrollBar()->setValue(edit_->verticalScrollBar()->maximum());
    updateSelections();
}

void PromptEditor::setTheme(const PlotTheme& theme) {
    theme_ = theme;
    updateSelections();
    updateStatus();
}

void PromptEditor::updateSelections() {
    QList<QTextEdit::ExtraSelection> selections;
    const int end = edit_->document()->characterCount() - 1;
    if (generated_from_ >= 0 && generated_from_ < end) {
        QTextEdit::ExtraSelection s;
        s.cursor = QTextCursor(edit_->document());
        s.cursor.setPosition(generated_from_);
        s.cursor.setPosition(end, QTextCursor::KeepAnchor);
        QColor bg = theme_.processed;
        bg.setAlpha(55);
        s.format.setBackground(bg);
        selections.append(s);
    }
    if (overflow_from_ >= 0 && overflow_from_ < end) {
        // Text the model never saw: struck through and faded, so it is plain why it changes nothing.
        QTextEdit::ExtraSelection s;
        s.cursor = QTextCursor(edit_->document());
        s.cursor.setPosition(overflow_from_);
        s.cursor.setPosition(end, QTextCursor::KeepAnchor);
        s.format.setForeground(theme_.muted);
        QColor bg = theme_.warning;
        bg.setAlpha(40);
        s.format.setBackground(bg);
        selections.append(s);
    }
    edit_->setExtraSelections(selections);
}

void PromptEditor::updateStatus() {
    QString text;
    QColor color = theme_.muted;
    if (generating_) {
        text = tr("● generating");
        color = theme_.processed;
    } else if (stale_) {
        text = tr("● updating…");
        color = theme_.warning;
    } else {
        text = tr("● up to date");
    }
    status_->setText(text);
    QPalette p = status_->palette();
    p.setColor(QPalette::WindowText, color);
    status_->setPalette(p);
}

}  // namespace modscope
