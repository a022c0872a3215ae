#include "figure_export.h"

#include <QBuffer>
#include <QFileInfo>
#include <QImage>
#include <QPageLayout>
#include <QPainter>
#include <QPdfWriter>
#include <QSaveFile>
#include <QSvgGenerator>
#include <QWidget>

#include <qcustomplot.h>

namespace modscope {
namespace {

QString cannotWrite(const QString& path, const QString& why) {
    return QObject::tr("Could not write %1: %2").arg(QDir::toNativeSeparators(path), why);
}

// Writes bytes to path through a QSaveFile, checking the count written. Figures are painted into memory
// first: QSvgGenerator and QPdfWriter ignore a short write, and QSaveFile cannot see one, so on a full disk
// an SVG was committed cut at the limit, over the earlier file.
QString writeAtomically(const QString& path, const QByteArray& bytes) {
    QSaveFile file(path);
    if (!file.open(QIODevice::WriteOnly)) return cannotWrite(path, file.errorString());
    if (file.write(bytes) != bytes.size() || !file.flush()) {
        const QString why = file.error() != QFileDevice::NoError ? file.errorString() : QObject::tr("the disk is full");
        file.cancelWriting();  // the temporary file goes with the QSaveFile; any earlier file stays
        return cannotWrite(path, why);
    }
    if (!file.commit()) return cannotWrite(path, file.errorString());
    return {};
}

// A figure's bytes in memory; finish() writes them.
struct AtomicFile {
    explicit AtomicFile(const QString& path) : path(path) { file.setBuffer(&bytes); }
    QString open() {
        if (!file.open(QIODevice::WriteOnly)) return cannotWrite(path, file.errorString());
        return {};
    }
    QString finish() {
        file.close();
        return writeAtomically(path, bytes);
    }
    QString path;
    QByteArray bytes;
    QBuffer file;
};

// Runs draw on an SVG generator or a PDF writer whose logical canvas is size; draw begins and ends its own
// painter (QCustomPlot needs a QCPPainter, everything else a QPainter).
QString paintVector(FigureFormat format, const QString& path, const QSize& size,
                    const std::function<bool(QPaintDevice*)>& draw) {
    AtomicFile out(path);
    if (auto error = out.open(); !error.isEmpty()) return error;
    bool ok = false;
    if (format == FigureFormat::Svg) {
        QSvgGenerator svg;
        svg.setOutputDevice(&out.file);
        svg.setSize(size);
        svg.setViewBox(QRect(QPoint(0, 0), size));
        svg.setTitle(QStringLiteral("ModScope"));
        ok = draw(&svg);
    } else {
        QPdfWriter pdf(&out.file);
        pdf.setCreator(QStringLiteral("ModScope"));
        pdf.setPageLayout(QPageLayout(QPageSize(QSizeF(size), QPageSize::Point, QString(), QPageSize::ExactMatch),
                                      QPageLayout::Portrait, QMarginsF(0, 0, 0, 0)));
        ok = draw(&pdf);
    }
    if (!ok) return cannotWrite(path, QObject::tr("cannot paint on the %1 canvas")
                                          .arg(format == FigureFormat::Svg ? QStringLiteral("SVG") : QStringLiteral("PDF")));
    return out.finish();
}

}  // namespace

FigureFormat figureFormatFor(const QString& path) {
    const QString ext = QFileInfo(path).suffix().toLower();
    if (ext == QLatin1String("png")) return FigureFormat::Png;
    if (ext == QLatin1String("svg")) return FigureFormat::Svg;
    if (ext == QLatin1String("pdf")) return FigureFormat::Pdf;
    return FigureFormat::Unknown;
}

QString saveImageAtomically(const QImage& image, const QString& path) {
    if (image.isNull()) return cannotWrite(path, QObject::tr("nothing to save"));
    AtomicFile out(path);
    if (auto error = out.open(); !error.isEmpty()) return error;
    if (!image.save(&out.file, "PNG")) return cannotWrite(path, QObject::tr("PNG encoding failed"));
    return out.finish();
}

QString exportPlot(QCustomPlot* plot, const QString& path) {
    const auto format = figureFormatFor(path);
    const QSize size = plot->size().expandedTo(QSize(200, 150));
    switch (format) {
    case FigureFormat::Png:
        return saveImageAtomically(plot->toPixmap(size.width(), size.height(), 2.0).toImage(), path);
    case FigureFormat::Svg:
    case FigureFormat::Pdf:
        return paintVector(format, path, size, [&](QPaintDevice* device) {
            QCPPainter painter;
            if (!painter.begin(device)) return false;
            // Vectorized: every element drawn as shapes and text, none from cached pixmaps.
            painter.setMode(QCPPainter::pmVectorized);
            painter.setMode(QCPPainter::pmNoCaching);
            painter.setWindow(QRect(QPoint(0, 0), size));
            plot->toPainter(&painter, size.width(), size.height());
            return painter.end();
        });
    case FigureFormat::Unknown: break;
    }
    return QObject::tr("Unknown figure format for %1: use .png, .svg or .pdf").arg(QFileInfo(path).fileName());
}

QString exportPainting(const QString& path, const QSize& size, const std::function<void(QPainter*)>& paint) {
    const auto format = figureFormatFor(path);
    if (format == FigureFormat::Unknown)
        return QObject::tr("Unknown figure format for %1: use .png, .svg or .pdf").arg(QFileInfo(path).fileName());
    if (format == FigureFormat::Png) {
        QImage image(size * 2, QImage::Format_ARGB32_Premultiplied);
        image.setDevicePixelRatio(2.0);
        image.fill(Qt::transparent);
        QPainter painter(&image);
        painter.setRenderHint(QPainter::Antialiasing, true);
        paint(&painter);
        painter.end();
        return saveImageAtomically(image, path);
    }
    return paintVector(format, path, size, [&](QPaintDevice* device) {
        QPainter painter;
        if (!painter.begin(device)) return false;
        painter.setWindow(QRect(QPoint(0, 0), size));
        painter.setRenderHint(QPainter::Antialiasing, true);
        paint(&painter);
        return painter.end();
    });
}

QString exportWidget(QWidget* widget, const QString& path) {
    if (auto* plot = qobject_cast<QCustomPlot*>(widget)) return exportPlot(plot, path);
    return exportPainting(path, widget->size(), [widget](QPainter* painter) {
        widget->render(painter, QPoint(), QRegion(), QWidget::DrawWindowBackground | QWidget::DrawChildren);
    });
}

}  // namespace modscope
