#include "routing_controls.h"

#include <QComboBox>
#include <QDoubleSpinBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QMenu>
#include <QSlider>
#include <QToolButton>
#include <QWidgetAction>

#include "layer_capacity_editor.h"

#include <cmath>

namespace modscope {

RoutingControls::RoutingControls(QWidget* parent) : QWidget(parent) {
    auto* row = new QHBoxLayout(this);
    row->setContentsMargins(4, 0, 4, 0);
    row->setSpacing(6);
    auto* cap_label = new QLabel(tr("&Capacity"), this);
    // The slider moves in 0.1% steps so it can show any value the spin box holds (12.5% included).
    slider_ = new QSlider(Qt::Horizontal, this);
    slider_->setRange(0, 1000);
    slider_->setSingleStep(5);
    slider_->setPageStep(100);
    slider_->setMinimumWidth(160);
    slider_->setMaximumWidth(280);
    slider_->setToolTip(tr("Fraction of tokens each routed layer processes in top-k mode (k = ⌈capacity·T⌉, "
                           "at least 1)"));
    cap_label->setBuddy(slider_);
    spin_ = new QDoubleSpinBox(this);
    spin_->setRange(0.0, 100.0);
    spin_->setDecimals(1);
    spin_->setSingleStep(0.5);
    spin_->setSuffix(QStringLiteral(" %"));
    spin_->setKeyboardTracking(false);
    spin_->setFixedWidth(spin_->fontMetrics().horizontalAdvance(QStringLiteral("100.0 %")) + 44);
    auto* mode_label = new QLabel(tr("&Routing"), this);
    mode_ = new QComboBox(this);
    mode_->addItem(tr("top-k (expert choice)"), int(RoutingMode::TopK));
    mode_->addItem(tr("causal (predictor)"), int(RoutingMode::Causal));
    mode_->setToolTip(tr("top-k: each routed layer takes the k tokens with the largest router logits (sees "
                         "the whole prompt).\ncausal: each token's predictor decides alone, as in generation."));
    mode_label->setBuddy(mode_);
    row->addWidget(cap_label);
    row->addWidget(slider_);
    row->addWidget(spin_);
    layer_button_ = new QToolButton(this);
    layer_button_->setObjectName(QStringLiteral("layer-capacity-button"));
    layer_button_->setPopupMode(QToolButton::InstantPopup);
    layer_button_->setToolTip(tr("Give single routed layers a capacity of their own"));
    auto* menu = new QMenu(layer_button_);
    auto* action = new QWidgetAction(menu);
    layer_editor_ = new LayerCapacityEditor(menu);
    action->setDefaultWidget(layer_editor_);
    menu->addAction(action);
    layer_button_->setMenu(menu);
    row->addWidget(layer_button_);
    connect(layer_editor_, &LayerCapacityEditor::capacitiesChanged, this, [this] {
        updateLayerButton();
        updateOffTrainingNote();
        Q_EMIT layerCapacitiesChanged();
    });
    updateLayerButton();
    off_training_ = new QLabel(this);
    off_training_->setObjectName(QStringLiteral("off-training-note"));
    off_training_->setVisible(false);
    row->addWidget(off_training_);
    row->addSpacing(12);
    row->addWidget(mode_label);
    row->addWidget(mode_);
    setSizePolicy(QSizePolicy::Maximum, QSizePolicy::Fixed);

    connect(slider_, &QSlider::valueChanged, this, [this](int v) {
        if (syncing_) return;
        // A drag lands on the spin box's 0.5% steps (12.5% among them), not on whatever pixel it ends.
        const int snapped = int(std::lround(v / 5.0)) * 5;
        syncing_ = true;
        if (snapped != v) slider_->setValue(snapped);
        spin_->setValue(snapped / 10.0);
        syncing_ = false;
        updateOffTrainingNote();
        Q_EMIT capacityChanged(snapped / 1000.0);
    });
    connect(spin_, qOverload<double>(&QDoubleSpinBox::valueChanged), this, [this](double v) {
        if (syncing_) return;
        syncing_ = true;
        slider_->setValue(int(std::lround(v * 10.0)));
        syncing_ = false;
        updateOffTrainingNote();
        Q_EMIT capacityChanged(v / 100.0);
    });
    connect(mode_, qOverload<int>(&QComboBox::currentIndexChanged), this, [this](int) {
        updateOffTrainingNote();
        Q_EMIT modeChanged(mode());
    });
    setCapacity(0.125);
}

double RoutingControls::capacity() const { return spin_->value() / 100.0; }

void RoutingControls::setLayers(int n_layers, const std::vector<int>& routed_layers) {
    layer_editor_->setLayers(n_layers, routed_layers);
    layer_button_->setEnabled(!routed_layers.empty());
    updateLayerButton();
    updateOffTrainingNote();
}

std::vector<double> RoutingControls::layerCapacities() const { return layer_editor_->capacities(); }

void RoutingControls::setLayerCapacities(const std::vector<double>& capacities) {
    const auto before = layer_editor_->capacities();
    layer_editor_->setCapacities(capacities);
    if (layer_editor_->capacities() == before) return;  // as the editor holds them: "slider" is absent
    updateLayerButton();
    updateOffTrainingNote();
    Q_EMIT layerCapacitiesChanged();
}

void RoutingControls::updateLayerButton() {
    const int own = layer_editor_->ownCount();
    layer_button_->setText(own ? tr("Per layer (%1)").arg(own) : tr("Per layer"));
}

void RoutingControls::setCapacity(double fraction) {
    const double pct = std::clamp(fraction, 0.0, 1.0) * 100.0;
    if (std::abs(spin_->value() - pct) < 1e-9) return;
    syncing_ = true;
    spin_->setValue(pct);
    slider_->setValue(int(std::lround(pct * 10.0)));
    syncing_ = false;
    updateOffTrainingNote();
    Q_EMIT capacityChanged(capacity());
}

void RoutingControls::setTrainedCapacity(double fraction) {
    trained_ = fraction;
    updateOffTrainingNote();
}

bool RoutingControls::offTrainingNoteShown() const { return !off_training_->isHidden(); }

QString RoutingControls::offTrainingNote() const { return off_training_->text(); }

void RoutingControls::updateOffTrainingNote() {
    bool layers_off = false;
    QStringList layer_caps;
    const auto layers = layerCapacities();
    for (std::size_t l = 0; l < layers.size(); ++l) {
        const double c = layers[l];
        if (c < 0) continue;
        layer_caps << tr("L%1 at %2%").arg(l).arg(c * 100.0, 0, 'g', 4);
        layers_off = layers_off || (trained_ >= 0.0 && std::abs(c - trained_) > 1e-6);
    }
    const bool off_capacity = (trained_ >= 0.0 && std::abs(capacity() - trained_) > 1e-6) || layers_off;
    const bool causal = mode() == RoutingMode::Causal;
    off_training_->setVisible(trained_ >= 0.0 && (off_capacity || causal));
    if (off_training_->isHidden()) return;
    const QString trained = QString::number(trained_ * 100.0, 'g', 4);
    off_training_->setText(tr("⚠ trained at %1% top-k").arg(trained));
    QStringList why;
    if (off_capacity)
        why << tr("The router was trained to pick %1% of tokens by top-k; at %2 it ranks tokens it never learned "
                  "to choose among.")
                   .arg(trained, QString::number(capacity() * 100.0, 'g', 4) + QLatin1Char('%') +
                                     (layer_caps.isEmpty() ? QString()
                                                           : QStringLiteral(" (%1)").arg(layer_caps.join(QStringLiteral(", ")))));
    if (causal)
        why << tr("Causal mode decides by the predictor, trained to imitate top-k at %1%: its decisions are what "
                  "generation uses, not what the router was trained on.")
                   .arg(trained);
    off_training_->setToolTip(why.join(QLatin1Char('\n')));
}

RoutingMode RoutingControls::mode() const { return RoutingMode(mode_->currentData().toInt()); }

void RoutingControls::setMode(RoutingMode mode) { mode_->setCurrentIndex(mode == RoutingMode::Causal ? 1 : 0); }

}  // namespace modscope
