// The command line: modscope [--model DIR] [--device D] [--prompt TEXT] [--capacity F] [--mode topk|causal]
// [--screenshot FILE] [--size WxH] [--theme system|light|dark] [--trace FILE] [--pin-capacity F]
// [--force LAYER:POS=process|skip ...] [--keep-capacity] [--decision-values].
#pragma once

#include <QSize>
#include <QString>
#include <QStringList>
#include <optional>
#include <vector>

#include "modscope/engine.h"

namespace modscope {

struct CommandLineOptions {
    QString model_dir;                 // empty: the bundled default model
    QString device = QStringLiteral("auto");
    std::optional<QString> prompt;     // given: replaces the prompt kept from last time
    std::optional<double> capacity;    // fraction 0 ... 1
    std::optional<RoutingMode> mode;
    QString screenshot;                // run the prompt, write the window as PNG, exit
    QSize size{1600, 1000};            // window size for --screenshot
    std::optional<QString> theme;      // "system", "light" or "dark"
    std::optional<std::pair<int, int>> select;  // lock this (layer, token) once the run is shown
    int generate = 0;
    QString trace;                     // replay this trace file
    std::optional<double> pin_capacity;  // pin a run at this capacity before the one at --capacity
    std::vector<RoutingOverride> overrides;  // --force: decisions forced by hand (docs/MODEL.md "Interventions")
    bool keep_capacity = false;
    bool decision_values = false;
    bool help = false;
    bool version = false;
    QString help_text;
};

// Parses arguments (argv[0] first). Returns an empty string or the error to print (exit status 2).
QString parseCommandLine(const QStringList& arguments, CommandLineOptions* options);

// "0.125" or "12.5%" as a fraction in [0, 1]; nullopt for anything else.
std::optional<double> parseCapacity(const QString& text);

}  // namespace modscope
