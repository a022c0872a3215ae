// UTF-8 validation and repair, and the lines of a text (modscope/trace_io.h: isValidUtf8, sanitizeUtf8,
// promptTextCoveredBy, nonBlankLines).
#include "formats/utf8.h"

#include <algorithm>

#include "modscope/trace_io.h"

namespace modscope {

std::size_t utf8SequenceLength(const std::string& s, std::size_t i) {
    const auto b = static_cast<unsigned char>(s[i]);
    auto cont = [&](std::size_t j) {
        return j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80;
    };
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return cont(i + 1) ? 2 : 0;
    if (b >= 0xE0 && b <= 0xEF) {
        if (!cont(i + 1) || !cont(i + 2)) return 0;
        const auto b1 = static_cast<unsigned char>(s[i + 1]);
        if (b == 0xE0 && b1 < 0xA0) return 0;   // overlong
        if (b == 0xED && b1 >= 0xA0) return 0;  // UTF-16 surrogates
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
        const auto b1 = static_cast<unsigned char>(s[i + 1]);
        if (b == 0xF0 && b1 < 0x90) return 0;   // overlong
        if (b == 0xF4 && b1 >= 0x90) return 0;  // past U+10FFFF
        return 4;
    }
    return 0;
}

std::string printable(const std::string& s, std::size_t max_chars) {
    std::string clean = sanitizeUtf8(s);
    for (auto& c : clean)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) c = '?';
    if (clean.size() > max_chars) {
        std::size_t cut = max_chars;
        while (cut > 0 && (static_cast<unsigned char>(clean[cut]) & 0xC0) == 0x80) --cut;
        clean = clean.substr(0, cut) + "...";
    }
    return clean;
}

std::string sanitizeUtf8(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size();) {
        const auto n = utf8SequenceLength(s, i);
        if (n == 0) {
            out += "\xEF\xBF\xBD";
            ++i;
        } else {
            out.append(s, i, n);
            i += n;
        }
    }
    return out;
}

bool isValidUtf8(const std::string& text, std::size_t* bad_offset) {
    for (std::size_t i = 0; i < text.size();) {
        const auto n = utf8SequenceLength(text, i);
        if (n == 0) {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        i += n;
    }
    return true;
}

std::string promptTextCoveredBy(const std::string& prompt, const std::vector<Token>& kept) {
    std::size_t cut = 0;
    for (const auto& t : kept) cut = std::max(cut, t.byte_end);
    cut = std::min(cut, prompt.size());
    while (cut < prompt.size() && (static_cast<unsigned char>(prompt[cut]) & 0xC0) == 0x80) ++cut;
    return prompt.substr(0, cut);
}

std::vector<std::pair<std::size_t, std::string>> nonBlankLines(const std::string& text) {
    std::vector<std::pair<std::size_t, std::string>> lines;
    std::size_t start = 0, number = 0;
    while (start < text.size()) {
        auto end = text.find('\n', start);
        if (end == std::string::npos) end = text.size();
        ++number;
        if (text.find_first_not_of(" \t\r", start) < end) lines.emplace_back(number, text.substr(start, end - start));
        start = end + 1;
    }
    return lines;
}

}  // namespace modscope
