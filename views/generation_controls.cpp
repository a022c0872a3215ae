#include "generation_controls.h"

#include <QBoxLayout>
#include <QDoubleSpinBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QPushButton>
#include <QSpinBox>
#include <QStyle>

#include <algorithm>

namespace modscope {

GenerationControls::GenerationControls(QWidget* parent) : QWidget(parent) {
    // The settings and the buttons share a line where there is room and take two lines where there is not;
    // minimumSizeHint is the two-line width, so the controls never hold the window wider than a laptop's
    // screen (resizeEvent picks the arrangement).
    outer_ = new QBoxLayout(QBoxLayout::LeftToRight, this);
    outer_->setContentsMargins(6, 0, 6, 4);
    outer_->setSpacing(6);
    outer_->setSizeConstraint(QLayout::SetNoConstraint);
    settings_box_ = new QWidget(this);
    actions_box_ = new QWidget(this);
    auto* row = new QHBoxLayout(settings_box_);
    row->setContentsMargins(0, 0, 0, 0);
    row->setSpacing(6);
    auto* actions = new QHBoxLayout(actions_box_);
    actions->setContentsMargins(0, 0, 0, 0);
    actions->setSpacing(6);
    outer_->addWidget(settings_box_);
    outer_->addWidget(actions_box_, 1);
    auto label = [&](const QString& text, QWidget* buddy) {
        auto* l = new QLabel(text, this);
        l->setBuddy(buddy);
        row->addWidget(l);
        row->addWidget(buddy);
    };
    tokens_ = new QSpinBox(this);
    tokens_->setRange(1, 4096);
    tokens_->setValue(32);
    tokens_->setToolTip(tr("Tokens to generate (at most up to the model's context)"));
    temperature_ = new QDoubleSpinBox(this);
    temperature_->setRange(0.0, 5.0);
    temperature_->setSingleStep(0.1);
    temperature_->setDecimals(2);
    temperature_->setValue(0.8);
    temperature_->setToolTip(tr("0 = greedy"));
    top_p_ = new QDoubleSpinBox(this);
    top_p_->setRange(0.01, 1.0);
    top_p_->setSingleStep(0.05);
    top_p_->setDecimals(2);
    top_p_->setValue(0.95);
    top_p_->setToolTip(tr("Nucleus sampling: keep the most likely tokens up to this probability mass"));
    seed_ = new QSpinBox(this);
    seed_->setRange(0, 2147483647);
    seed_->setToolTip(tr("Same seed, same prompt, same settings: same text"));
    label(tr("&Generate"), tokens_);
    row->addWidget(new QLabel(tr("tokens"), this));
    label(tr("temp."), temperature_);
    label(tr("top-p"), top_p_);
    label(tr("seed"), seed_);
    generate_ = new QPushButton(tr("Generate"), this);
    generate_->setIcon(style()->standardIcon(QStyle::SP_MediaPlay));
    generate_->setToolTip(tr("Sample tokens after the prompt in causal mode (Ctrl+G)"));
    stop_ = new QPushButton(tr("Stop"), this);
    stop_->setIcon(style()->standardIcon(QStyle::SP_MediaStop));
    stop_->setToolTip(tr("Stop generating (Esc)"));
    stop_->setEnabled(false);
    actions->addWidget(generate_);
    actions->addWidget(stop_);
    status_ = new QLabel(this);
    // The status is clipped rather than widening the window (its whole text is the tooltip).
    status_->setSizePolicy(QSizePolicy::Ignored, QSizePolicy::Preferred);
    status_->setMinimumWidth(0);
    actions->addWidget(status_, 1);

    connect(generate_, &QPushButton::clicked, this, [this] { Q_EMIT generateRequested(settings()); });
    connect(stop_, &QPushButton::clicked, this, &GenerationControls::stopRequested);
}

GenerationSettings GenerationControls::settings() const {
    GenerationSettings s;
    s.max_new_tokens = tokens_->value();
    s.temperature = temperature_->value();
    s.top_p = top_p_->value();
    s.seed = std::uint64_t(seed_->value());
    return s;
}

void GenerationControls::setSettings(const GenerationSettings& s) {
    tokens_->setValue(s.max_new_tokens);
    temperature_->setValue(s.temperature);
    top_p_->setValue(s.top_p);
    seed_->setValue(int(std::min<std::uint64_t>(s.seed, 2147483647)));
}

void GenerationControls::setRunning(bool running) {
    running_ = running;
    generate_->setEnabled(!running);
    stop_->setEnabled(running);
    for (QWidget* w : {static_cast<QWidget*>(tokens_), static_cast<QWidget*>(temperature_),
                       static_cast<QWidget*>(top_p_), static_cast<QWidget*>(seed_)})
        w->setEnabled(!running);
}

void GenerationControls::setStatus(const QString& text) {
    status_->setText(text);
    status_->setToolTip(text);
}

bool GenerationControls::isOneLine() const { return outer_->direction() == QBoxLayout::LeftToRight; }

QSize GenerationControls::oneLineMinimum() const {
    const auto m = outer_->contentsMargins();
    // Room for the settings, the buttons and a few words of status.
    const int width = settings_box_->minimumSizeHint().width() + outer_->spacing() +
                      actions_box_->minimumSizeHint().width() + 12 * fontMetrics().averageCharWidth();
    const int height = std::max(settings_box_->minimumSizeHint().height(), actions_box_->minimumSizeHint().height());
    return {width + m.left() + m.right(), height + m.top() + m.bottom()};
}

QSize GenerationControls::minimumSizeHint() const {
    const auto m = outer_->contentsMargins();
    const int width = std::max(settings_box_->minimumSizeHint().width(), actions_box_->minimumSizeHint().width());
    const int height = isOneLine() ? oneLineMinimum().height()
                                   : settings_box_->minimumSizeHint().height() + outer_->spacing() +
                                         actions_box_->minimumSizeHint().height() + m.top() + m.bottom();
    return {width + m.left() + m.right(), height};
}

QSize GenerationControls::sizeHint() const {
    return isOneLine() ? oneLineMinimum() : minimumSizeHint();
}

void GenerationControls::resizeEvent(QResizeEvent* event) {
    QWidget::resizeEvent(event);
    const bool one_line = width() >= oneLineMinimum().width();
    if (one_line == isOneLine()) return;
    outer_->setDirection(one_line ? QBoxLayout::LeftToRight : QBoxLayout::TopToBottom);
    updateGeometry();  // one line or two: the dock's height follows
}

QString GenerationControls::status() const { return status_->text(); }

}  // namespace modscope
