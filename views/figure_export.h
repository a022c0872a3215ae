// Figures to files: PNG, SVG or PDF by the file's extension, always written atomically (QSaveFile), so a
// failed export leaves any earlier file untouched. Each function returns an empty string on success and
// otherwise a message a user can act on.
#pragma once

#include <QSize>
#include <QString>
#include <functional>

class QCustomPlot;
class QImage;
class QPainter;
class QWidget;

namespace modscope {

enum class FigureFormat { Png, Svg, Pdf, Unknown };
FigureFormat figureFormatFor(const QString& path);

// A QCustomPlot at its on-screen size: vector output for SVG and PDF, 2x pixels for PNG.
QString exportPlot(QCustomPlot* plot, const QString& path);
// Anything drawn with a QPainter onto a canvas of this size.
QString exportPainting(const QString& path, const QSize& size, const std::function<void(QPainter*)>& paint);
// A widget as on screen (children included).
QString exportWidget(QWidget* widget, const QString& path);
// A finished image as PNG.
QString saveImageAtomically(const QImage& image, const QString& path);

}  // namespace modscope
