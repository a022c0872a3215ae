// One result table, printed as aligned text on stdout and as Markdown for docs/PERFORMANCE.md.
#pragma once

#include <string>
#include <vector>

namespace modscope::bench {

class Table {
public:
    Table(std::string title, std::vector<std::string> columns);
    void addRow(std::vector<std::string> cells);
    // A line under the table (how it was measured, what was skipped).
    void addNote(std::string note);

    std::string text() const;
    std::string markdown() const;
    bool empty() const { return rows_.empty(); }

private:
    std::string title_;
    std::vector<std::string> columns_;
    std::vector<std::vector<std::string>> rows_;
    std::vector<std::string> notes_;
};

// Number formatting shared by every table.
std::string fixed(double value, int decimals);
std::string spread(double lo, double hi, int decimals);  // "lo–hi"
std::string percent(double fraction, int decimals = 1);
std::string thousands(double value);  // 12,345

}  // namespace modscope::bench
