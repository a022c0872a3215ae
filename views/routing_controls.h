// RoutingControls: capacity (slider and spin box kept in step) and routing mode. Both re-run at once.
#pragma once

#include <QWidget>
#include <vector>

#include "modscope/engine.h"

class QComboBox;
class QLabel;
class QDoubleSpinBox;
class QSlider;
class QToolButton;

namespace modscope {

class LayerCapacityEditor;

class RoutingControls : public QWidget {
    Q_OBJECT
public:
    explicit RoutingControls(QWidget* parent = nullptr);

    double capacity() const;  // fraction 0 ... 1
    void setCapacity(double fraction);
    RoutingMode mode() const;
    void setMode(RoutingMode mode);

    QSlider* slider() const { return slider_; }
    QDoubleSpinBox* spinBox() const { return spin_; }
    QComboBox* modeBox() const { return mode_; }
    // Routed layers' own capacities (RunOptions::layer_capacity), set in the "Per layer" popup.
    void setLayers(int n_layers, const std::vector<int>& routed_layers);
    std::vector<double> layerCapacities() const;
    void setLayerCapacities(const std::vector<double>& capacities);  // emits layerCapacitiesChanged
    LayerCapacityEditor* layerEditor() const { return layer_editor_; }
    QToolButton* layerButton() const { return layer_button_; }
    // The capacity the model's router was trained at (top-k): away from it, or in causal mode, a note says
    // the routing is outside what was trained.
    void setTrainedCapacity(double fraction);
    bool offTrainingNoteShown() const;
    QString offTrainingNote() const;

Q_SIGNALS:
    void capacityChanged(double fraction);
    void modeChanged(modscope::RoutingMode mode);
    void layerCapacitiesChanged();

private:
    QSlider* slider_;
    QDoubleSpinBox* spin_;
    QComboBox* mode_;
    QLabel* off_training_;
    QToolButton* layer_button_;
    LayerCapacityEditor* layer_editor_;
    double trained_ = -1.0;  // < 0: unknown (no model)
    bool syncing_ = false;

    void updateOffTrainingNote();
    void updateLayerButton();
};

}  // namespace modscope
