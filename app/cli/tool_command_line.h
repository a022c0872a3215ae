// The command line of modscope-train, modscope-trace and modscope-bench, parsed one way (CLI11) so the three
// tools behave alike:
//   --flag value and --flag=value both work; a flag given twice keeps its last value;
//   --help prints the tool's help and --version the project's version, both exit 0;
//   an unknown option or a malformed value exits 2 with one line on stderr that names the option;
//   a failure once the tool runs exits 1 with one line on stderr (fail()).
// No Qt and no LibTorch: the tools stay plain C++.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace modscope::cli {

// The CMake project's version ("0.1.0"), which --version prints.
const char* projectVersion();

// A problem with the command line itself, found by the tool after parsing (a missing --out, two sources
// given): exit 2 with a pointer to --help, like the problems the parser finds.
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Value parsers, shared so every tool words a bad value the same way. Each throws UsageError naming `flag`.
double parseNumber(const std::string& flag, const std::string& text, double lo, double hi);
std::int64_t parseInteger(const std::string& flag, const std::string& text, std::int64_t lo, std::int64_t hi);
std::uint64_t parseUnsigned(const std::string& flag, const std::string& text, std::uint64_t hi);
// Comma-separated; empty parts are skipped and at least one value is required.
std::vector<std::int64_t> parseIntegerList(const std::string& flag, const std::string& text, std::int64_t lo,
                                           std::int64_t hi);
std::vector<double> parseNumberList(const std::string& flag, const std::string& text, double lo, double hi);
// A capacity for the whole run and per layer: comma-separated parts, each F (every routed layer) or LAYER:F,
// as in "0.125", "1:0.25,3:0.125" or "0.25,3:0.5". F from 0 to 1; a layer at most once.
struct CapacitySpec {
    double all = -1.0;               // < 0: none given (the model's)
    std::vector<double> per_layer;   // by layer index, -1 where not given (RunOptions::layer_capacity)
};
CapacitySpec parseCapacitySpec(const std::string& flag, const std::string& text);

class ToolCommandLine {
public:
    // `about` opens --help; `notes` (exit statuses, formats) closes it. `version_note` follows the version,
    // for example the trace schema a tool writes.
    ToolCommandLine(std::string tool, std::string about, std::string notes = {}, std::string version_note = {});

    // Options whose value is checked with the parsers above. `value_name` is what --help shows (DIR, N, F).
    CLI::Option* text(const std::string& flag, std::string& into, const std::string& value_name,
                      const std::string& help);
    CLI::Option* texts(const std::string& flag, std::vector<std::string>& into, const std::string& value_name,
                       const std::string& help);  // repeatable: each use adds one value
    CLI::Option* choice(const std::string& flag, std::string& into, const std::vector<std::string>& choices,
                        const std::string& help);
    CLI::Option* flag(const std::string& flag, bool& into, const std::string& help);
    CLI::Option* capacity(const std::string& flag, CapacitySpec& into, const std::string& help);
    template <typename T>
    CLI::Option* number(const std::string& flag, T& into, double lo, double hi, const std::string& help) {
        return withValue(flag, "F", help, [&into, flag, lo, hi](const std::string& s) {
            into = static_cast<T>(parseNumber(flag, s, lo, hi));
        });
    }
    template <typename T>
    CLI::Option* integer(const std::string& flag, T& into, std::int64_t lo, std::int64_t hi,
                         const std::string& help) {
        return withValue(flag, "N", help, [&into, flag, lo, hi](const std::string& s) {
            into = static_cast<T>(parseInteger(flag, s, lo, hi));
        });
    }
    CLI::Option* unsignedInteger(const std::string& flag, std::uint64_t& into, const std::string& help);
    template <typename T>
    CLI::Option* integerList(const std::string& flag, std::vector<T>& into, std::int64_t lo, std::int64_t hi,
                             const std::string& value_name, const std::string& help) {
        return withValue(flag, value_name, help, [&into, flag, lo, hi](const std::string& s) {
            into.clear();
            for (const auto v : parseIntegerList(flag, s, lo, hi)) into.push_back(static_cast<T>(v));
        });
    }
    CLI::Option* numberList(const std::string& flag, std::vector<double>& into, double lo, double hi,
                            const std::string& value_name, const std::string& help);
    // Any other value: `apply` converts it and throws UsageError (naming the flag) when it cannot.
    CLI::Option* withValue(const std::string& flag, const std::string& value_name, const std::string& help,
                           std::function<void(const std::string&)> apply);

    // Options that follow this call are listed under `title` in --help.
    void group(std::string title) { group_ = std::move(title); }

    // Parses argv. Returns nothing when the tool should run; otherwise the exit status to return at once:
    // 0 after printing --help or --version, 2 after a usage error (one line on stderr).
    std::optional<int> parse(int argc, char** argv);

    // One line on stderr and the exit status: usage problems found after parsing (2, with a pointer to
    // --help) and failures while running (1). A multi-line message is folded onto one line.
    int usageError(const std::string& message) const;
    int fail(const std::string& message) const;

    const std::string& tool() const { return tool_; }
    CLI::App& app() { return app_; }

private:
    std::string tool_, version_note_;
    std::string group_ = "Options";
    CLI::App app_;
    bool version_ = false;
};

}  // namespace modscope::cli
