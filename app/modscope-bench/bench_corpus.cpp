#include "bench_corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <vector>

namespace modscope::bench {

namespace fs = std::filesystem;

std::string corpusText(std::size_t bytes, std::string* source) {
    std::string text;
    const fs::path dir = "/usr/share/games/fortunes";
    std::error_code ec;
    if (fs::is_directory(dir, ec)) {
        // The plain files (no .dat index, no .u8 duplicate), in a fixed order.
        std::vector<fs::path> files;
        for (const auto& e : fs::directory_iterator(dir, ec))
            if (e.is_regular_file() && !e.path().has_extension()) files.push_back(e.path());
        std::sort(files.begin(), files.end());
        for (const auto& f : files) {
            std::ifstream in(f, std::ios::binary);
            char c;
            while (text.size() < bytes && in.get(c))
                if (static_cast<unsigned char>(c) < 0x80 && c != '\r' && c != '\0') text += c;
            if (text.size() >= bytes) break;
        }
        if (source) *source = dir.string();
    }
    if (text.size() < bytes / 2) {
        static const char* const words[] = {
            "the",    "model",    "routes",  "tokens", "through", "a",  "layer", "and", "skips",
            "others", "capacity", "of",      "every",  "block",   "is", "small", "so",  "compute",
            "falls",  "while",    "quality", "stays",  "close",   "to", "dense"};
        std::mt19937 rng(5);
        std::uniform_int_distribution<int> pick(0, int(std::size(words)) - 1);
        text.clear();
        while (text.size() < bytes) {
            text += words[pick(rng)];
            text += (rng() % 12 == 0) ? ".\n" : " ";
        }
        if (source) *source = "generated words";
    }
    return text;
}

}  // namespace modscope::bench
