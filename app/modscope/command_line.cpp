#include "command_line.h"

#include <QCommandLineParser>
#include <QRegularExpression>

#include <cmath>

namespace modscope {

std::optional<double> parseCapacity(const QString& raw) {
    QString text = raw.trimmed();
    const bool percent = text.endsWith(QLatin1Char('%'));
    if (percent) text.chop(1);
    bool ok = false;
    double v = text.toDouble(&ok);
    if (!ok || !std::isfinite(v)) return std::nullopt;
    if (percent) v /= 100.0;
    if (v < 0.0 || v > 1.0) return std::nullopt;
    return v;
}

QString parseCommandLine(const QStringList& arguments, CommandLineOptions* o) {
    QCommandLineParser parser;
    parser.setApplicationDescription(QStringLiteral(
        "ModScope: watch a Mixture-of-Depths transformer route each token through each layer, live."));
    const QCommandLineOption help_option(QStringList{QStringLiteral("h"), QStringLiteral("help")},
                                         QStringLiteral("Show this help and exit."));
    const QCommandLineOption version_option(QStringList{QStringLiteral("v"), QStringLiteral("version")},
                                            QStringLiteral("Show the version and exit."));
    const QCommandLineOption model(QStringLiteral("model"),
                                   QStringLiteral("Model directory (config.json, weights.pt, tokenizer.model). "
                                                  "Default: the bundled model."),
                                   QStringLiteral("DIR"));
    const QCommandLineOption device(QStringLiteral("device"), QStringLiteral("auto, cpu or cuda (default auto)."),
                                    QStringLiteral("D"), QStringLiteral("auto"));
    const QCommandLineOption prompt(QStringLiteral("prompt"), QStringLiteral("The prompt to run."),
                                    QStringLiteral("TEXT"));
    const QCommandLineOption capacity(QStringLiteral("capacity"),
                                      QStringLiteral("Capacity of routed layers: a fraction (0.125) or a "
                                                     "percentage (12.5%). Default: the model's."),
                                      QStringLiteral("F"));
    const QCommandLineOption mode(QStringLiteral("mode"), QStringLiteral("Routing mode: topk or causal."),
                                  QStringLiteral("topk|causal"));
    const QCommandLineOption screenshot(QStringLiteral("screenshot"),
                                        QStringLiteral("Run the prompt, write the whole main window to FILE "
                                                       "(PNG) and exit."),
                                        QStringLiteral("FILE"));
    const QCommandLineOption size(QStringLiteral("size"),
                                  QStringLiteral("Window size for --screenshot (default 1600x1000)."),
                                  QStringLiteral("WxH"));
    const QCommandLineOption theme(QStringLiteral("theme"), QStringLiteral("system, light or dark."),
                                   QStringLiteral("T"));
    const QCommandLineOption select(QStringLiteral("select"),
                                    QStringLiteral("Lock the heatmap cell of this layer and token (e.g. 3:12)."),
                                    QStringLiteral("LAYER:TOKEN"));
    const QCommandLineOption generate(QStringLiteral("generate"),
                                      QStringLiteral("Generate N tokens after the prompt once it has run (with "
                                                     "--screenshot: capture after them)."),
                                      QStringLiteral("N"));
    const QCommandLineOption trace(QStringLiteral("trace"),
                                   QStringLiteral("Replay this saved trace (.json) read-only, without its model."),
                                   QStringLiteral("FILE"));
    const QCommandLineOption pin_capacity(QStringLiteral("pin-capacity"),
                                          QStringLiteral("Run first at this capacity and pin that run, then run at "
                                                         "--capacity and compare (for --screenshot)."),
                                          QStringLiteral("F"));
    const QCommandLineOption force(QStringLiteral("force"),
                                   QStringLiteral("Force a routed layer's decision on the token at POS (0-based), or on "
                                                  "every token with LAYER:all=...; repeatable."),
                                   QStringLiteral("LAYER:POS=process|skip"));
    const QCommandLineOption keep_capacity(QStringLiteral("keep-capacity"),
                                           QStringLiteral("Forced layers keep their k (default: exact flips)."));
    const QCommandLineOption decision_values(QStringLiteral("decision-values"),
                                             QStringLiteral("Colour the heatmap by each routing decision's value."));
    parser.addOptions({help_option, version_option, model, device, prompt, capacity, mode, screenshot, size, theme, select,
                       generate, trace, pin_capacity, force, keep_capacity, decision_values});
    o->help_text = parser.helpText();
    if (!parser.parse(arguments)) return parser.errorText();
    if (!parser.positionalArguments().isEmpty())
        return QStringLiteral("unexpected argument '%1' (options start with --)").arg(parser.positionalArguments().first());
    o->help = parser.isSet(help_option);
    o->version = parser.isSet(version_option);
    if (parser.isSet(model)) o->model_dir = parser.value(model);
    o->device = parser.value(device).trimmed().toLower();
    if (o->device != QLatin1String("auto") && o->device != QLatin1String("cpu") &&
        !o->device.startsWith(QLatin1String("cuda")))
        return QStringLiteral("--device must be auto, cpu or cuda, not '%1'").arg(parser.value(device));
    if (parser.isSet(prompt)) o->prompt = parser.value(prompt);
    if (parser.isSet(capacity)) {
        o->capacity = parseCapacity(parser.value(capacity));
        if (!o->capacity)
            return QStringLiteral("--capacity must be a fraction from 0 to 1 (0.125) or a percentage (12.5%), not '%1'")
                .arg(parser.value(capacity));
    }
    if (parser.isSet(pin_capacity)) {
        o->pin_capacity = parseCapacity(parser.value(pin_capacity));
        if (!o->pin_capacity)
            return QStringLiteral("--pin-capacity must be a fraction from 0 to 1 (0.125) or a percentage (12.5%), not '%1'")
                .arg(parser.value(pin_capacity));
    }
    if (parser.isSet(trace)) {
        o->trace = parser.value(trace);
        if (o->trace.isEmpty()) return QStringLiteral("--trace needs a file name");
    }
    if (parser.isSet(mode)) {
        const QString m = parser.value(mode).trimmed().toLower();
        if (m == QLatin1String("topk") || m == QLatin1String("top-k")) o->mode = RoutingMode::TopK;
        else if (m == QLatin1String("causal")) o->mode = RoutingMode::Causal;
        else return QStringLiteral("--mode must be topk or causal, not '%1'").arg(parser.value(mode));
    }
    if (parser.isSet(screenshot)) {
        o->screenshot = parser.value(screenshot);
        if (o->screenshot.isEmpty()) return QStringLiteral("--screenshot needs a file name");
    }
    if (parser.isSet(size)) {
        static const QRegularExpression re(QStringLiteral("^(\\d{3,5})[xX](\\d{3,5})$"));
        const auto m = re.match(parser.value(size).trimmed());
        if (!m.hasMatch()) return QStringLiteral("--size must look like 1600x1000, not '%1'").arg(parser.value(size));
        o->size = QSize(m.captured(1).toInt(), m.captured(2).toInt());
        if (o->size.width() < 640 || o->size.height() < 400 || o->size.width() > 8192 || o->size.height() > 8192)
            return QStringLiteral("--size must be between 640x400 and 8192x8192");
    }
    if (parser.isSet(theme)) {
        const QString t = parser.value(theme).trimmed().toLower();
        if (t != QLatin1String("system") && t != QLatin1String("light") && t != QLatin1String("dark"))
            return QStringLiteral("--theme must be system, light or dark, not '%1'").arg(parser.value(theme));
        o->theme = t;
    }
    if (parser.isSet(generate)) {
        bool ok = false;
        o->generate = parser.value(generate).toInt(&ok);
        if (!ok || o->generate < 1 || o->generate > 65536)
            return QStringLiteral("--generate must be a number of tokens from 1 to 65536, not '%1'").arg(parser.value(generate));
    }
    for (const QString& f : parser.values(force)) {
        static const QRegularExpression re(QStringLiteral("^(\\d{1,3}):(\\d{1,6}|all)=(process|skip)$"));
        const auto m = re.match(f.trimmed());
        if (!m.hasMatch())
            return QStringLiteral("--force must look like LAYER:POS=process|skip or LAYER:all=skip (3:12=skip), not '%1'").arg(f);
        o->overrides.push_back({m.captured(1).toInt(),
                                m.captured(2) == QLatin1String("all") ? RoutingOverride::kAllPositions : m.captured(2).toInt(),
                                m.captured(3) == QLatin1String("process")});
    }
    o->keep_capacity = parser.isSet(keep_capacity);
    o->decision_values = parser.isSet(decision_values);
    if (parser.isSet(select)) {
        static const QRegularExpression re(QStringLiteral("^(\\d{1,4}):(\\d{1,6})$"));
        const auto m = re.match(parser.value(select).trimmed());
        if (!m.hasMatch()) return QStringLiteral("--select must look like LAYER:TOKEN (3:12), not '%1'").arg(parser.value(select));
        o->select = std::make_pair(m.captured(1).toInt(), m.captured(2).toInt());
    }
    return {};
}

}  // namespace modscope
