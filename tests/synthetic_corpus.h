// The generated English-like text every test fixture trains its tokenizer on and types as prompts: words,
// numbers, punctuation and newlines, deterministic for a seed. One generator for the engine tests'
// fixtures (test_support.h) and the app tests' (app_fixture.h). Header-only: no engine, no Qt.
#pragma once

#include <cstdint>
#include <random>
#include <string>

namespace modscope::testdata {

// The two fixtures' words. The engine tests' tokenizer has 300 pieces, 256 of them bytes: its corpus keeps to 22
// letters so that every character gets a piece. The app tests' (400 pieces) adds the pangram their prompts type.
constexpr const char* kEngineWords[] = {"the", "routing", "token", "layer", "model", "depth", "capacity", "residual",
                                        "stream", "attention", "of", "and", "a", "to", "in", "is", "that", "mixture",
                                        "expert", "choice", "king", "said", "unto", "them", "fortune", "cookie",
                                        "light", "dark", "water", "fire", "time", "tree", "house", "river"};
constexpr const char* kAppWords[] = {"the", "routing", "token", "layer", "model", "depth", "capacity", "residual",
                                     "stream", "attention", "of", "and", "a", "to", "in", "is", "that", "mixture",
                                     "expert", "choice", "compute", "said", "every", "them", "fortune", "cookie",
                                     "light", "dark", "water", "fire", "time", "tree", "house", "river", "quick",
                                     "brown", "fox", "jumps", "over", "lazy", "dog", "which", "tokens", "skip"};

// bytes of text from words (kEngineWords or kAppWords) for a seed.
template <std::size_t N>
std::string syntheticCorpus(std::size_t bytes, std::uint64_t seed, const char* const (&words)[N]) {
    static const char* punct[] = {",", ".", ";", "!", "?", ":"};
    std::mt19937_64 rng(seed);
    std::string text;
    int in_line = 0;
    while (text.size() < bytes) {
        const auto r = rng() % 100;
        if (r < 5) text += std::to_string(rng() % 2000);
        else text += words[rng() % N];
        if (rng() % 7 == 0) text += punct[rng() % 6];
        if (++in_line > 8 + static_cast<int>(rng() % 8)) {
            text += "\n";
            in_line = 0;
        } else {
            text += " ";
        }
    }
    return text;
}

}  // namespace modscope::testdata
