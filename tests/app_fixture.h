// Model checkpoints for the app's tests and for development: untrained (they route fine for UI work),
// small, written in seconds. Uses only modscope/engine.h: app tests build without LibTorch headers.
#pragma once

#include <QApplication>
#include <QTest>
#include <cstdint>
#include <string>
#include <vector>

#include "modscope/engine.h"

namespace modscope::apptest {

struct FixtureOptions {
    std::string name = "app-fixture";
    int n_layers = 4;
    int d_model = 32;
    int n_heads = 2;
    int d_ff = 64;
    int max_seq_len = 64;
    std::vector<int> routed_layers{1, 3};
    double capacity = 0.25;
    // Mixture layers (docs/MODEL.md "Mixture layers"): none by default.
    std::vector<int> moe_layers;
    int n_experts = 0;
    int noop_experts = 0;
    int vocab_size = 400;
    std::vector<std::string> corpus_files;  // empty: a generated English-like corpus
    std::uint64_t seed = 7;
};

// Writes config.json, weights.pt and tokenizer.model into dir (created if needed). The tokenizer is
// trained once per process and options (vocab, corpus).
void writeFixtureModel(const std::string& dir, const FixtureOptions& options = {});

// Deterministic generated text: words, punctuation, digits, newlines.
std::string fixtureCorpus(std::size_t bytes, std::uint64_t seed);

}  // namespace modscope::apptest

// main() of an app test: the runtime set up as the app sets it (modscope/engine.h, RuntimeOptions::forTools),
// so that the window's runs take the backend the app and the tools take; then Qt Test with a QApplication.
#define MODSCOPE_APP_TEST_MAIN(TestClass)                                  \
    int main(int argc, char** argv) {                                      \
        modscope::configureRuntime(modscope::RuntimeOptions::forTools());  \
        QApplication app(argc, argv);                                      \
        app.setAttribute(Qt::AA_Use96Dpi, true);                           \
        TestClass test;                                                    \
        QTEST_SET_MAIN_SOURCE_PATH                                         \
        return QTest::qExec(&test, argc, argv);                            \
    }
