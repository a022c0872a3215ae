#include "trace_export.h"

#include <QFile>
#include <QFileInfo>
#include <QObject>

namespace modscope {

TraceDocument traceDocumentFor(const RoutingSnapshot& s) {
    TraceDocument doc;
    doc.model.name = s.model_name;
    doc.model.config = s.config;
    doc.model.weights_sha256 = s.weights_sha256;
    doc.model.directory = s.model_directory;
    doc.prompt = s.prompt;
    doc.tokens = s.prompt_tokens;
    doc.original_tokens = s.original_tokens;
    doc.original_bytes = s.prompt_bytes;
    doc.run = s.trace;
    return doc;
}

QString exportTrace(const TraceDocument& doc, const QString& path) {
    const QString ext = QFileInfo(path).suffix().toLower();
    if (ext != QLatin1String("json") && ext != QLatin1String("csv"))
        return QObject::tr("Cannot export a trace as \"%1\": use a .json or .csv file name").arg(QFileInfo(path).fileName());
    if (doc.tokens.empty()) return QObject::tr("Nothing to export: the prompt has no tokens yet");
    try {
        saveTrace(QFile::encodeName(path).toStdString(), doc);
    } catch (const std::exception& e) {
        return QObject::tr("Trace export failed: %1").arg(QString::fromStdString(e.what()));
    }
    return {};
}

}  // namespace modscope
