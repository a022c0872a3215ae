// LayerCapacityEditor: a capacity for each routed layer of the model, or "the run's" (the capacity slider's).
// What a researcher uses to ask how one layer behaves at another budget while the others stay as trained.
#pragma once

#include <QWidget>
#include <vector>

class QDoubleSpinBox;
class QGridLayout;
class QLabel;
class QPushButton;

namespace modscope {

class LayerCapacityEditor : public QWidget {
    Q_OBJECT
public:
    explicit LayerCapacityEditor(QWidget* parent = nullptr);

    // The model's layers: one row per routed layer. Clears every layer's own capacity.
    void setLayers(int n_layers, const std::vector<int>& routed_layers);
    // By layer index, as RunOptions::layer_capacity: a fraction 0 ... 1, or < 0 for the run's capacity.
    std::vector<double> capacities() const;
    void setCapacities(const std::vector<double>& capacities);  // emits nothing
    int ownCount() const;  // routed layers with a capacity of their own
    QDoubleSpinBox* spinBox(int layer) const;  // nullptr for a layer that is not routed

Q_SIGNALS:
    void capacitiesChanged();

private:
    QGridLayout* grid_;
    QLabel* empty_;
    QPushButton* reset_;
    int n_layers_ = 0;
    std::vector<int> routed_;
    std::vector<QDoubleSpinBox*> spins_;  // one per routed layer, in routed_ order
    bool syncing_ = false;
};

}  // namespace modscope
