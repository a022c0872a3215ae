#include "bench_table.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace modscope::bench {

namespace {

// Display width of UTF-8 text: code points, not bytes (the tables use "–" and "×").
std::size_t width(const std::string& s) {
    std::size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

std::string pad(const std::string& s, std::size_t w, bool right) {
    const std::string fill(w > width(s) ? w - width(s) : 0, ' ');
    return right ? fill + s : s + fill;
}

// Numbers right-aligned, words left-aligned.
bool numeric(const std::string& s) {
    return !s.empty() && (std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-');
}

}  // namespace

Table::Table(std::string title, std::vector<std::string> columns)
    : title_(std::move(title)), columns_(std::move(columns)) {}

void Table::addRow(std::vector<std::string> cells) {
    cells.resize(columns_.size());
    rows_.push_back(std::move(cells));
}

void Table::addNote(std::string note) {
    notes_.push_back(std::move(note));
}

std::string Table::text() const {
    std::vector<std::size_t> w(columns_.size());
    for (std::size_t c = 0; c < columns_.size(); ++c) {
        w[c] = width(columns_[c]);
        for (const auto& r : rows_) w[c] = std::max(w[c], width(r[c]));
    }
    std::ostringstream out;
    out << title_ << "\n";
    for (std::size_t c = 0; c < columns_.size(); ++c)
        out << (c ? "  " : "  ") << pad(columns_[c], w[c], c > 0);
    out << "\n";
    for (const auto& r : rows_) {
        for (std::size_t c = 0; c < columns_.size(); ++c)
            out << "  " << pad(r[c], w[c], c > 0 && numeric(r[c]));
        out << "\n";
    }
    for (const auto& n : notes_) out << "  " << n << "\n";
    return out.str();
}

std::string Table::markdown() const {
    std::ostringstream out;
    out << "### " << title_ << "\n\n|";
    for (const auto& c : columns_) out << " " << c << " |";
    out << "\n|";
    for (std::size_t c = 0; c < columns_.size(); ++c) out << (c ? " ---: |" : " --- |");
    out << "\n";
    for (const auto& r : rows_) {
        out << "|";
        for (const auto& cell : r) out << " " << cell << " |";
        out << "\n";
    }
    if (!notes_.empty()) out << "\n";
    for (const auto& n : notes_) out << n << "\n";
    return out.str();
}

std::string fixed(double value, int decimals) {
    if (!std::isfinite(value)) return "n/a";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
    return buf;
}

std::string spread(double lo, double hi, int decimals) {
    return fixed(lo, decimals) + "–" + fixed(hi, decimals);
}

std::string percent(double fraction, int decimals) {
    return fixed(100.0 * fraction, decimals) + "%";
}

std::string thousands(double value) {
    if (!std::isfinite(value)) return "n/a";
    std::string digits = std::to_string(static_cast<long long>(std::llround(value)));
    const bool neg = !digits.empty() && digits[0] == '-';
    if (neg) digits.erase(0, 1);
    std::string out;
    for (std::size_t i = 0; i < digits.size(); ++i) {
        if (i && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return neg ? "-" + out : out;
}

}  // namespace modscope::bench
