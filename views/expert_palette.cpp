#include "expert_palette.h"

#include <QString>
#include <array>

namespace modscope {

QColor expertColor(int expert) {
    static const std::array<QColor, 7> okabe_ito{QColor(0xE6, 0x9F, 0x00), QColor(0x56, 0xB4, 0xE9),
                                                 QColor(0xD5, 0x5E, 0x00), QColor(0xCC, 0x79, 0xA7),
                                                 QColor(0x00, 0x9E, 0x73), QColor(0x00, 0x72, 0xB2),
                                                 QColor(0xF0, 0xE4, 0x42)};
    if (expert < 0) return QColor();
    const QColor base = okabe_ito[static_cast<std::size_t>(expert) % okabe_ito.size()];
    switch ((expert / int(okabe_ito.size())) % 3) {
    case 1: return base.lighter(135);
    case 2: return base.darker(140);
    default: return base;
    }
}

void paintExpertMark(QPainter* painter, const QRectF& rect, LayerTrace::ExpertFate fate, int expert,
                     const PlotTheme& theme) {
    using Fate = LayerTrace::ExpertFate;
    switch (fate) {
    case Fate::Ran:
        painter->fillRect(rect, expertColor(expert));
        break;
    case Fate::NoOp:
        painter->fillRect(rect, theme.background);
        painter->fillRect(rect, QBrush(theme.muted, Qt::BDiagPattern));
        break;
    case Fate::Overflow:
        painter->fillRect(rect, theme.background);
        painter->fillRect(rect, QBrush(theme.warning, Qt::DiagCrossPattern));
        break;
    case Fate::KeptOut:
        break;
    }
}

QString expertFateText(const LayerTrace& layer, int token) {
    using Fate = LayerTrace::ExpertFate;
    switch (layer.expertFate(token)) {
    case Fate::Ran: return QStringLiteral("expert %1").arg(layer.expert[static_cast<std::size_t>(token)]);
    case Fate::NoOp: return QStringLiteral("no-op");
    case Fate::Overflow: return QStringLiteral("overflow");
    case Fate::KeptOut: return QStringLiteral("kept out");
    }
    return {};
}

}  // namespace modscope
