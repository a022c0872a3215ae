#include "tool_command_line.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <sstream>

#ifndef MODSCOPE_VERSION
#error "MODSCOPE_VERSION comes from CMake's project() version (app/cli/CMakeLists.txt)"
#endif

namespace modscope::cli {

namespace {

std::string oneLine(std::string s) {
    for (auto& c : s)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
}

std::string show(double v) {
    std::ostringstream out;
    out << v;
    return out.str();
}

// Parts of a comma-separated list, empty parts skipped.
std::vector<std::string> listParts(const std::string& flag, const std::string& text) {
    std::vector<std::string> parts;
    std::stringstream in(text);
    std::string part;
    while (std::getline(in, part, ','))
        if (!part.empty()) parts.push_back(part);
    if (parts.empty()) throw UsageError(flag + ": '" + text + "' is an empty list");
    return parts;
}

// CLI11 words a missing value "--out: 1 required TEXT missing"; the tools say "--out needs a value".
std::string reworded(const CLI::ParseError& e) {
    std::string message = oneLine(e.what());
    const auto colon = message.find(": ");
    if (colon != std::string::npos && message.find(" required ", colon) != std::string::npos &&
        message.size() >= 8 && message.compare(message.size() - 8, 8, " missing") == 0)
        return message.substr(0, colon) + " needs a value";
    return message;
}

// --help as the tools have always printed it: the tool's own usage lines (in `about`), then the options by
// group, each description wrapped beside its option.
class ToolHelpFormatter : public CLI::Formatter {
public:
    static constexpr std::size_t kNameColumn = 28, kLineWidth = 110;

    ToolHelpFormatter() { column_width(kNameColumn); }

    std::string make_help(const CLI::App* app, std::string, CLI::AppFormatMode) const override {
        std::string out = app->get_description();
        for (const auto& group : app->get_groups()) {
            const auto opts = app->get_options(
                [&group](const CLI::Option* o) { return o->get_group() == group && o->nonpositional(); });
            if (!group.empty() && !opts.empty()) out += make_group(group, false, opts);
        }
        return out + make_footer(app);
    }

    std::string make_option_desc(const CLI::Option* o) const override {
        std::string out, line;
        std::stringstream words(o->get_description());
        std::string word;
        while (words >> word) {
            if (!line.empty() && kNameColumn + line.size() + 1 + word.size() > kLineWidth) {
                out += line + '\n';
                line.clear();
            }
            line += (line.empty() ? "" : " ") + word;
        }
        return out + line;
    }
};

}  // namespace

const char* projectVersion() { return MODSCOPE_VERSION; }

double parseNumber(const std::string& flag, const std::string& text, double lo, double hi) {
    const char* begin = text.c_str();
    char* end = nullptr;
    const double v = text.empty() ? 0.0 : std::strtod(begin, &end);
    if (text.empty() || end != begin + text.size() || !std::isfinite(v) || v < lo || v > hi)
        throw UsageError(flag + ": '" + text + "' is not a number from " + show(lo) + " to " + show(hi));
    return v;
}

std::int64_t parseInteger(const std::string& flag, const std::string& text, std::int64_t lo, std::int64_t hi) {
    const char* begin = text.c_str();
    char* end = nullptr;
    errno = 0;
    const long long v = text.empty() ? 0 : std::strtoll(begin, &end, 10);
    if (text.empty() || end != begin + text.size() || errno == ERANGE || v < lo || v > hi)
        throw UsageError(flag + ": '" + text + "' is not a whole number from " + std::to_string(lo) + " to " +
                         std::to_string(hi));
    return v;
}

std::uint64_t parseUnsigned(const std::string& flag, const std::string& text, std::uint64_t hi) {
    std::uint64_t v = 0;
    bool ok = !text.empty();
    for (const char c : text) {
        const std::uint64_t digit = static_cast<std::uint64_t>(c - '0');
        if (c < '0' || c > '9' || v > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) {
            ok = false;
            break;
        }
        v = v * 10 + digit;
    }
    if (!ok || v > hi)
        throw UsageError(flag + ": '" + text + "' is not a whole number from 0 to " + std::to_string(hi));
    return v;
}

std::vector<std::int64_t> parseIntegerList(const std::string& flag, const std::string& text, std::int64_t lo,
                                           std::int64_t hi) {
    std::vector<std::int64_t> out;
    for (const auto& part : listParts(flag, text)) out.push_back(parseInteger(flag, part, lo, hi));
    return out;
}

std::vector<double> parseNumberList(const std::string& flag, const std::string& text, double lo, double hi) {
    std::vector<double> out;
    for (const auto& part : listParts(flag, text)) out.push_back(parseNumber(flag, part, lo, hi));
    return out;
}

CapacitySpec parseCapacitySpec(const std::string& flag, const std::string& text) {
    CapacitySpec spec;
    for (const auto& part : listParts(flag, text)) {
        const auto colon = part.find(':');
        if (colon == std::string::npos) {
            if (spec.all >= 0) throw UsageError(flag + ": '" + text + "' gives the whole run's capacity twice");
            spec.all = parseNumber(flag, part, 0.0, 1.0);
            continue;
        }
        const auto layer = static_cast<std::size_t>(parseInteger(flag, part.substr(0, colon), 0, 4095));
        const double value = parseNumber(flag, part.substr(colon + 1), 0.0, 1.0);
        if (spec.per_layer.size() <= layer) spec.per_layer.resize(layer + 1, -1.0);
        if (spec.per_layer[layer] >= 0)
            throw UsageError(flag + ": '" + text + "' gives layer " + std::to_string(layer) + " twice");
        spec.per_layer[layer] = value;
    }
    return spec;
}

ToolCommandLine::ToolCommandLine(std::string tool, std::string about, std::string notes, std::string version_note)
    : tool_(std::move(tool)), version_note_(std::move(version_note)), app_(std::move(about), tool_) {
    // Unknown arguments are collected rather than thrown, so the message can name them the project's way.
    app_.allow_extras();
    app_.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app_.formatter(std::make_shared<ToolHelpFormatter>());
    app_.set_help_flag();  // added back by parse(), so that --help and --version close the list
    if (!notes.empty()) app_.footer(std::move(notes));
}

CLI::Option* ToolCommandLine::withValue(const std::string& flag, const std::string& value_name,
                                        const std::string& help, std::function<void(const std::string&)> apply) {
    auto* o = app_.add_option_function<std::string>(flag, std::move(apply), help);
    o->type_name(value_name)->group(group_);
    return o;
}

CLI::Option* ToolCommandLine::text(const std::string& flag, std::string& into, const std::string& value_name,
                                   const std::string& help) {
    return withValue(flag, value_name, help, [&into](const std::string& s) { into = s; });
}

CLI::Option* ToolCommandLine::texts(const std::string& flag, std::vector<std::string>& into,
                                    const std::string& value_name, const std::string& help) {
    auto* o = app_.add_option(flag, into, help);
    // One value per use of the flag: "--corpus a --corpus b", never "--corpus a b".
    o->allow_extra_args(false)->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    o->type_name(value_name)->group(group_);
    return o;
}

CLI::Option* ToolCommandLine::choice(const std::string& flag, std::string& into,
                                     const std::vector<std::string>& choices, const std::string& help) {
    std::string names;
    for (const auto& c : choices) names += (names.empty() ? "" : "|") + c;
    return withValue(flag, names, help, [&into, flag, choices, names](const std::string& s) {
        for (const auto& c : choices)
            if (s == c) {
                into = s;
                return;
            }
        throw UsageError(flag + ": '" + s + "' is not one of " + names);
    });
}

CLI::Option* ToolCommandLine::flag(const std::string& flag, bool& into, const std::string& help) {
    return app_.add_flag(flag, into, help)->group(group_);
}

CLI::Option* ToolCommandLine::unsignedInteger(const std::string& flag, std::uint64_t& into,
                                              const std::string& help) {
    return withValue(flag, "N", help, [&into, flag](const std::string& s) {
        into = parseUnsigned(flag, s, std::numeric_limits<std::uint64_t>::max());
    });
}

CLI::Option* ToolCommandLine::capacity(const std::string& flag, CapacitySpec& into, const std::string& help) {
    return withValue(flag, "F|L:F,...", help,
                     [&into, flag](const std::string& s) { into = parseCapacitySpec(flag, s); });
}

CLI::Option* ToolCommandLine::numberList(const std::string& flag, std::vector<double>& into, double lo,
                                         double hi, const std::string& value_name, const std::string& help) {
    return withValue(flag, value_name, help,
                     [&into, flag, lo, hi](const std::string& s) { into = parseNumberList(flag, s, lo, hi); });
}

std::optional<int> ToolCommandLine::parse(int argc, char** argv) {
    app_.set_help_flag("-h,--help", "print this help and exit")->group("Help");
    app_.add_flag("--version", version_, "print the version and exit")->group("Help");
    try {
        app_.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::cout << app_.help();
        return 0;
    } catch (const CLI::ParseError& e) {
        return usageError(reworded(e));
    } catch (const UsageError& e) {
        return usageError(e.what());
    }
    if (version_) {
        std::cout << tool_ << ' ' << projectVersion() << (version_note_.empty() ? "" : " (" + version_note_ + ")")
                  << '\n';
        return 0;
    }
    const auto extra = app_.remaining();
    if (!extra.empty()) {
        const bool option = extra.front().size() > 1 && extra.front()[0] == '-';
        return usageError(std::string(option ? "unknown argument '" : "unexpected argument '") + extra.front() +
                          "'");
    }
    return std::nullopt;
}

int ToolCommandLine::usageError(const std::string& message) const {
    std::fprintf(stderr, "%s: error: %s (see %s --help)\n", tool_.c_str(), oneLine(message).c_str(), tool_.c_str());
    return 2;
}

int ToolCommandLine::fail(const std::string& message) const {
    std::fprintf(stderr, "%s: error: %s\n", tool_.c_str(), oneLine(message).c_str());
    return 1;
}

}  // namespace modscope::cli
