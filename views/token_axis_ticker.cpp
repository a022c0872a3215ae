#include "token_axis_ticker.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

namespace modscope {

void useLayerCountAxes(QCustomPlot* plot, const QSharedPointer<TokenAxisTicker>& layers) {
    plot->xAxis->setTicker(layers);
    plot->xAxis->setSubTicks(false);
    plot->xAxis->grid()->setVisible(false);
    plot->yAxis->setLabel(QObject::tr("tokens"));
    // Token counts are whole numbers: no 2.5-token ticks on short prompts.
    QSharedPointer<QCPAxisTickerFixed> counts(new QCPAxisTickerFixed);
    counts->setTickStep(1.0);
    counts->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
    counts->setTickCount(3);
    plot->yAxis->setTicker(counts);
}

int TokenAxisTicker::stepFor(double pixels_per_index, double min_pixels) {
    if (!(pixels_per_index > 0)) return 1;
    const double needed = min_pixels / pixels_per_index;
    for (int magnitude = 1; magnitude < 1000000000; magnitude *= 10)
        for (int m : {1, 2, 5})
            if (m * magnitude >= needed) return m * magnitude;
    return 1000000000;
}

QString TokenAxisTicker::getTickLabel(double tick, const QLocale&, QChar, int) {
    const int i = int(std::lround(tick));
    return i >= 0 && i < labels_.size() ? labels_[i] : QString();
}

void TokenAxisTicker::setPriorities(QVector<int> priorities) {
    priorities_ = std::move(priorities);
    labelled_step_ = 0;
}

const QVector<int>& TokenAxisTicker::labelled() {
    if (labelled_step_ == step_) return labelled_;
    labelled_.clear();
    const int n = int(std::min(labels_.size(), priorities_.size()));
    // Greedy by priority (ties: the earlier index): an index is labelled when no labelled one is closer
    // than step. Over the whole axis, so that panning does not move labels.
    QVector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [this](int a, int b) { return priorities_[a] > priorities_[b]; });
    std::set<int> taken;
    for (const int i : order) {
        const auto next = taken.lower_bound(i);
        if (next != taken.end() && *next - i < step_) continue;
        if (next != taken.begin() && i - *std::prev(next) < step_) continue;
        taken.insert(i);
    }
    labelled_ = QVector<int>(taken.begin(), taken.end());
    labelled_step_ = step_;
    return labelled_;
}

QVector<double> TokenAxisTicker::createTickVector(double, const QCPRange& range) {
    QVector<double> ticks;
    if (labels_.isEmpty()) return ticks;
    if (step_ > 1 && priorities_.size() == labels_.size()) {
        const auto& all = labelled();
        for (auto it = std::lower_bound(all.begin(), all.end(), int(std::ceil(range.lower)));
             it != all.end() && *it <= range.upper; ++it)
            ticks.append(*it);
        return ticks;
    }
    const int o = offset();
    const int first = std::max(o, int(std::ceil((range.lower - o) / step_)) * step_ + o);
    const int last = std::min(int(labels_.size()) - 1, int(std::floor(range.upper)));
    if (last < first) return ticks;
    ticks.reserve((last - first) / step_ + 1);
    for (int i = first; i <= last; i += step_) ticks.append(i);
    return ticks;
}

}  // namespace modscope
