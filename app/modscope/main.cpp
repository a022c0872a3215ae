// modscope: the desktop app. See command_line.h for the options.
#include <QApplication>
#include <QIcon>
#include <QSettings>

#include <cstdio>
#include <memory>

#include "command_line.h"
#include "main_window.h"
#include "modscope/engine.h"
#include "screenshot_taker.h"

int main(int argc, char** argv) {
    // First, before any other thread starts: the engine changes process-wide state only when asked (modscope/engine.h).
    modscope::configureRuntime(modscope::RuntimeOptions::forTools());
    QApplication app(argc, argv);
    QApplication::setOrganizationName(QStringLiteral("ModScope"));
    QApplication::setApplicationName(QStringLiteral("modscope"));
    QApplication::setApplicationDisplayName(QStringLiteral("ModScope"));
    QApplication::setApplicationVersion(QStringLiteral(MODSCOPE_VERSION));
    QApplication::setWindowIcon(QIcon(QStringLiteral(":/modscope/icons/modscope.svg")));

    modscope::CommandLineOptions options;
    const QString error = modscope::parseCommandLine(QApplication::arguments(), &options);
    if (!error.isEmpty()) {
        std::fprintf(stderr, "modscope: %s\n\n%s", qPrintable(error), qPrintable(options.help_text));
        return 2;
    }
    if (options.help) {
        std::printf("%s", qPrintable(options.help_text));
        return 0;
    }
    if (options.version) {
        std::printf("modscope %s\n", MODSCOPE_VERSION);
        return 0;
    }

    const bool screenshot = !options.screenshot.isEmpty();
    // A screenshot shows the defaults and the command line only, and leaves the user's settings alone.
    std::unique_ptr<QSettings> settings;
    if (!screenshot) settings = std::make_unique<QSettings>();

    modscope::MainWindow::Options wo;
    wo.settings = settings.get();
    wo.device = options.device;
    if (settings && options.device == QLatin1String("auto"))
        wo.device = settings->value(QStringLiteral("device"), QStringLiteral("auto")).toString();
    modscope::MainWindow window(wo);
    if (options.theme) window.setTheme(modscope::themeChoiceFromString(*options.theme));
    if (options.pin_capacity) window.setCapacity(*options.pin_capacity);
    else if (options.capacity) window.setCapacity(*options.capacity);
    if (options.mode) window.setRoutingMode(*options.mode);
    if (options.select) window.selectCell(options.select->first, options.select->second);
    for (const auto& o : options.overrides)
        window.forceDecision(o.layer, o.position,
                             o.process ? modscope::RoutingHeatmap::Force::Process : modscope::RoutingHeatmap::Force::Skip);
    window.setKeepCapacity(options.keep_capacity);
    if (options.decision_values) window.setDecisionValuesShown(true);
    QString prompt = modscope::MainWindow::samplePrompt();
    if (options.prompt) prompt = *options.prompt;
    else if (settings && settings->contains(QStringLiteral("prompt/text")))
        prompt = settings->value(QStringLiteral("prompt/text")).toString();
    window.setPrompt(prompt);
    QStringList start_only;
    if (options.theme) start_only << QStringLiteral("view/theme");
    if (options.mode) start_only << QStringLiteral("routing/mode");
    if (options.capacity || options.pin_capacity) start_only << QStringLiteral("routing/capacity");
    if (options.prompt) start_only << QStringLiteral("prompt/text");
    window.keepOutOfSettings(start_only);
    if (screenshot) window.resize(options.size);
    window.show();

    if (!options.model_dir.isEmpty()) window.openModel(options.model_dir);
    else window.openDefaultModel();

    if (!options.trace.isEmpty()) window.openTrace(options.trace);
    if (options.pin_capacity) {
        // Connected before the screenshot taker: the run at --capacity is requested before it looks.
        auto once = std::make_shared<QMetaObject::Connection>();
        *once = QObject::connect(&window, &modscope::MainWindow::runApplied, &window, [&window, once, &options] {
            if (window.isStale() || !window.model()) return;
            QObject::disconnect(*once);
            window.pinRun();
            window.setCapacity(options.capacity.value_or(window.model()->config.capacity));
        });
    }
    if (screenshot) {
        auto* taker = new modscope::ScreenshotTaker(&window, options.screenshot, options.generate);
        taker->start();
    } else if (options.generate > 0) {
        auto once = std::make_shared<QMetaObject::Connection>();
        *once = QObject::connect(&window, &modscope::MainWindow::runApplied, &window, [&window, once, &options] {
            if (window.isStale()) return;
            QObject::disconnect(*once);
            window.generate(options.generate);
        });
    }
    return app.exec();
}
