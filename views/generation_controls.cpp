#include "generation_controls.h"

#include <QDoubleSpinBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QPushButton>
#include <QSpinBox>
#include <QStyle>

namespace modscope {

GenerationControls::GenerationControls(QWidget* parent) : QWidget(parent) {
    auto* row = new QHBoxLayout(this);
    row->setContentsMargins(6, 0, 6, 4);
    row->setSpacing(6);
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
    row->addWidget(generate_);
    row->addWidget(stop_);
    status_ = new QLabel(this);
    row->addWidget(status_, 1);

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

void GenerationControls::setStatus(const QString& text) { status_->setText(text); }

QString GenerationControls::status() const { return status_->text(); }

}  // namespace modscope
