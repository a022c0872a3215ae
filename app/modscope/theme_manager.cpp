#include "theme_manager.h"

#include <QApplication>
#include <QPalette>
#include <QStyle>
#include <QStyleFactory>

#include <memory>

namespace modscope {
namespace {

struct PlatformLook {
    bool captured = false;
    QString style;
    QPalette palette;
};

PlatformLook& platformLook() {
    static PlatformLook look;
    if (!look.captured) {
        look.captured = true;
        look.style = QApplication::style() ? QApplication::style()->name() : QString();
        look.palette = QApplication::palette();
    }
    return look;
}

QPalette darkPalette() {
    QPalette p;
    const QColor window(37, 39, 43), base(28, 30, 33), text(226, 228, 232), disabled(120, 124, 130);
    p.setColor(QPalette::Window, window);
    p.setColor(QPalette::WindowText, text);
    p.setColor(QPalette::Base, base);
    p.setColor(QPalette::AlternateBase, QColor(44, 46, 51));
    p.setColor(QPalette::ToolTipBase, QColor(52, 55, 60));
    p.setColor(QPalette::ToolTipText, text);
    p.setColor(QPalette::PlaceholderText, disabled);
    p.setColor(QPalette::Text, text);
    p.setColor(QPalette::Button, QColor(48, 51, 56));
    p.setColor(QPalette::ButtonText, text);
    p.setColor(QPalette::BrightText, QColor(255, 110, 110));
    p.setColor(QPalette::Highlight, QColor(64, 128, 210));
    p.setColor(QPalette::HighlightedText, Qt::white);
    p.setColor(QPalette::Link, QColor(110, 170, 250));
    p.setColor(QPalette::Light, QColor(70, 74, 80));
    p.setColor(QPalette::Midlight, QColor(58, 61, 66));
    p.setColor(QPalette::Mid, QColor(46, 48, 52));
    p.setColor(QPalette::Dark, QColor(24, 25, 28));
    p.setColor(QPalette::Shadow, QColor(10, 10, 12));
    for (auto role : {QPalette::WindowText, QPalette::Text, QPalette::ButtonText})
        p.setColor(QPalette::Disabled, role, disabled);
    return p;
}

QPalette lightPalette() {
    const std::unique_ptr<QStyle> fusion(QStyleFactory::create(QStringLiteral("Fusion")));
    QPalette p = fusion ? fusion->standardPalette() : QPalette();
    p.setColor(QPalette::Window, QColor(246, 247, 249));
    p.setColor(QPalette::Base, Qt::white);
    p.setColor(QPalette::AlternateBase, QColor(243, 245, 248));
    p.setColor(QPalette::Highlight, QColor(38, 110, 200));
    return p;
}

}  // namespace

QString toString(ThemeChoice choice) {
    switch (choice) {
    case ThemeChoice::Light: return QStringLiteral("light");
    case ThemeChoice::Dark: return QStringLiteral("dark");
    case ThemeChoice::System: break;
    }
    return QStringLiteral("system");
}

ThemeChoice themeChoiceFromString(const QString& text) {
    if (text == QLatin1String("light")) return ThemeChoice::Light;
    if (text == QLatin1String("dark")) return ThemeChoice::Dark;
    return ThemeChoice::System;
}

void applyTheme(ThemeChoice choice) {
    const PlatformLook& look = platformLook();
    switch (choice) {
    case ThemeChoice::System:
        if (!look.style.isEmpty()) QApplication::setStyle(look.style);
        QApplication::setPalette(look.palette);
        break;
    case ThemeChoice::Light:
        QApplication::setStyle(QStringLiteral("Fusion"));
        QApplication::setPalette(lightPalette());
        break;
    case ThemeChoice::Dark:
        QApplication::setStyle(QStringLiteral("Fusion"));
        QApplication::setPalette(darkPalette());
        break;
    }
}

}  // namespace modscope
