#include "token_axis_ticker.h"

#include <cmath>

namespace modscope {

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

QVector<double> TokenAxisTicker::createTickVector(double, const QCPRange& range) {
    QVector<double> ticks;
    if (labels_.isEmpty()) return ticks;
    const int o = offset();
    const int first = std::max(o, int(std::ceil((range.lower - o) / step_)) * step_ + o);
    const int last = std::min(int(labels_.size()) - 1, int(std::floor(range.upper)));
    if (last < first) return ticks;
    ticks.reserve((last - first) / step_ + 1);
    for (int i = first; i <= last; i += step_) ticks.append(i);
    return ticks;
}

}  // namespace modscope
