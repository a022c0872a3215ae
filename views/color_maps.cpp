#include "color_maps.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace modscope {
namespace {

struct Stop {
    double t;
    QRgb rgb;
};

// matplotlib's viridis sampled at 0, 0.1, ..., 1.
constexpr std::array<Stop, 11> kViridis{{{0.0, 0x440154},
                                         {0.1, 0x482475},
                                         {0.2, 0x414487},
                                         {0.3, 0x355f8d},
                                         {0.4, 0x2a788e},
                                         {0.5, 0x21918c},
                                         {0.6, 0x22a884},
                                         {0.7, 0x44bf70},
                                         {0.8, 0x7ad151},
                                         {0.9, 0xbddf26},
                                         {1.0, 0xfde725}}};

// ColorBrewer "Oranges", 7 classes, as a continuous ramp.
constexpr std::array<Stop, 7> kDepth{{{0.0 / 6, 0xfff5eb},
                                      {1.0 / 6, 0xfdd0a2},
                                      {2.0 / 6, 0xfdae6b},
                                      {3.0 / 6, 0xfd8d3c},
                                      {4.0 / 6, 0xf16913},
                                      {5.0 / 6, 0xd94801},
                                      {6.0 / 6, 0x8c2d04}}};

constexpr std::array<Stop, 6> kDepthDark{{{0.0, 0x3a332d},
                                          {0.2, 0x5e4129},
                                          {0.4, 0x8a4f1f},
                                          {0.6, 0xc2631a},
                                          {0.8, 0xf08a2c},
                                          {1.0, 0xffc27a}}};

template <std::size_t N>
QColor sample(const std::array<Stop, N>& stops, double t) {
    if (!std::isfinite(t)) t = 0.0;
    t = std::clamp(t, 0.0, 1.0);
    for (std::size_t i = 1; i < N; ++i) {
        if (t <= stops[i].t) {
            const double f = (t - stops[i - 1].t) / (stops[i].t - stops[i - 1].t);
            const QColor a(stops[i - 1].rgb), b(stops[i].rgb);
            return QColor::fromRgbF(float(a.redF() + f * (b.redF() - a.redF())),
                                    float(a.greenF() + f * (b.greenF() - a.greenF())),
                                    float(a.blueF() + f * (b.blueF() - a.blueF())));
        }
    }
    return QColor(stops[N - 1].rgb);
}

}  // namespace

QCPColorGradient viridisGradient(const QColor& nan_color) {
    QCPColorGradient g;
    g.clearColorStops();
    for (const auto& s : kViridis) g.setColorStopAt(s.t, QColor(s.rgb));
    g.setColorInterpolation(QCPColorGradient::ciRGB);
    // 512 levels: no visible banding on a tall colour bar, still a small lookup table.
    g.setLevelCount(512);
    g.setNanHandling(QCPColorGradient::nhNanColor);
    g.setNanColor(nan_color);
    return g;
}

QCPColorGradient decisionValueGradient(const QColor& nan_color, bool dark) {
    // ColorBrewer's RdBu, red for negative values.
    QCPColorGradient g;
    g.clearColorStops();
    g.setColorStopAt(0.0, QColor(0xb2, 0x18, 0x2b));
    g.setColorStopAt(0.25, QColor(0xef, 0x8a, 0x62));
    g.setColorStopAt(0.5, dark ? QColor(0x50, 0x50, 0x50) : QColor(0xf2, 0xf2, 0xf2));
    g.setColorStopAt(0.75, QColor(0x67, 0xa9, 0xcf));
    g.setColorStopAt(1.0, QColor(0x21, 0x66, 0xac));
    g.setColorInterpolation(QCPColorGradient::ciRGB);
    g.setLevelCount(512);
    g.setNanHandling(QCPColorGradient::nhNanColor);
    g.setNanColor(nan_color);
    return g;
}

QColor viridis(double t) { return sample(kViridis, t); }

QColor depthColor(double t, bool dark) { return dark ? sample(kDepthDark, t) : sample(kDepth, t); }

QColor textColorOn(const QColor& background) {
    const double luminance = 0.2126 * background.redF() + 0.7152 * background.greenF() + 0.0722 * background.blueF();
    return luminance > 0.5 ? QColor(20, 20, 20) : QColor(250, 250, 250);
}

}  // namespace modscope
