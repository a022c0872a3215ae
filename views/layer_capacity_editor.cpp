#include "layer_capacity_editor.h"

#include <QDoubleSpinBox>
#include <QGridLayout>
#include <QLabel>
#include <QPushButton>
#include <QVBoxLayout>

#include <cmath>

namespace modscope {

namespace {
// The spin box's lowest value stands for "the run's capacity" (shown as text, not as a number).
constexpr double kFollowRun = -0.5;
}  // namespace

LayerCapacityEditor::LayerCapacityEditor(QWidget* parent) : QWidget(parent) {
    auto* column = new QVBoxLayout(this);
    column->setContentsMargins(8, 8, 8, 8);
    auto* intro = new QLabel(tr("<b>Capacity per routed layer</b><br>A layer set here takes its own share of "
                                "tokens; the others follow the capacity slider."),
                             this);
    intro->setWordWrap(true);
    intro->setMinimumWidth(240);
    column->addWidget(intro);
    grid_ = new QGridLayout;
    grid_->setHorizontalSpacing(8);
    column->addLayout(grid_);
    empty_ = new QLabel(tr("This model has no routed layers."), this);
    column->addWidget(empty_);
    reset_ = new QPushButton(tr("All Follow the Slider"), this);
    reset_->setToolTip(tr("Clear every layer's own capacity"));
    column->addWidget(reset_, 0, Qt::AlignRight);
    connect(reset_, &QPushButton::clicked, this, [this] {
        if (ownCount() == 0) return;
        setCapacities({});
        Q_EMIT capacitiesChanged();
    });
    setLayers(0, {});
}

void LayerCapacityEditor::setLayers(int n_layers, const std::vector<int>& routed_layers) {
    while (auto* item = grid_->takeAt(0)) {
        if (item->widget()) item->widget()->deleteLater();
        delete item;
    }
    spins_.clear();
    n_layers_ = n_layers;
    routed_ = routed_layers;
    int row = 0;
    for (const int l : routed_) {
        auto* label = new QLabel(tr("L%1").arg(l), this);
        auto* spin = new QDoubleSpinBox(this);
        spin->setRange(kFollowRun, 100.0);
        spin->setDecimals(2);  // 6.25% and the like, as modscope-trace --capacity L:0.0625 gives
        spin->setSingleStep(0.5);
        spin->setSuffix(QStringLiteral(" %"));
        spin->setSpecialValueText(tr("slider"));
        spin->setValue(kFollowRun);
        spin->setKeyboardTracking(false);
        spin->setToolTip(tr("Layer %1's share of tokens; \"slider\" follows the capacity slider").arg(l));
        label->setBuddy(spin);
        connect(spin, qOverload<double>(&QDoubleSpinBox::valueChanged), this, [this] {
            if (!syncing_) Q_EMIT capacitiesChanged();
        });
        grid_->addWidget(label, row, 0);
        grid_->addWidget(spin, row, 1);
        spins_.push_back(spin);
        ++row;
    }
    empty_->setVisible(routed_.empty());
    reset_->setVisible(!routed_.empty());
}

std::vector<double> LayerCapacityEditor::capacities() const {
    std::vector<double> out;
    for (std::size_t i = 0; i < routed_.size(); ++i) {
        const double v = spins_[i]->value();
        if (v < 0) continue;
        const auto l = static_cast<std::size_t>(routed_[i]);
        if (out.size() <= l) out.resize(l + 1, -1.0);
        out[l] = v / 100.0;
    }
    return out;
}

void LayerCapacityEditor::setCapacities(const std::vector<double>& capacities) {
    syncing_ = true;
    for (std::size_t i = 0; i < routed_.size(); ++i) {
        const auto l = static_cast<std::size_t>(routed_[i]);
        const double v = l < capacities.size() ? capacities[l] : -1.0;
        spins_[i]->setValue(v >= 0 ? std::min(v, 1.0) * 100.0 : kFollowRun);
    }
    syncing_ = false;
}

int LayerCapacityEditor::ownCount() const {
    int n = 0;
    for (auto* s : spins_) n += s->value() >= 0 ? 1 : 0;
    return n;
}

QDoubleSpinBox* LayerCapacityEditor::spinBox(int layer) const {
    for (std::size_t i = 0; i < routed_.size(); ++i)
        if (routed_[i] == layer) return spins_[i];
    return nullptr;
}

}  // namespace modscope
