// Light and dark themes. "system" keeps the platform's style and palette (and so follows it when the
// desktop switches); "light" and "dark" set Fusion with a palette of their own.
#pragma once

#include <QString>

namespace modscope {

enum class ThemeChoice { System, Light, Dark };

QString toString(ThemeChoice choice);
ThemeChoice themeChoiceFromString(const QString& text);  // unknown: System

// Applies the choice to the whole application. The first call remembers the platform's look so that
// System can restore it later.
void applyTheme(ThemeChoice choice);

}  // namespace modscope
