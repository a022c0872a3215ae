// app_fixture_model DIR [--layers N] [--d-model D] [--context T] [--vocab V] [--capacity F] [--corpus FILE]...
//
// Writes an untrained checkpoint for trying the app before the bundled model exists, and for measuring the
// heatmap at sizes the default model does not have (say 32 layers x 2,048 tokens). Every other layer from
// layer 1 is routed.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "app_fixture.h"
#include "modscope/engine.h"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr,
                     "usage: %s DIR [--layers N] [--d-model D] [--heads H] [--context T] [--vocab V] "
                     "[--capacity F] [--name NAME] [--seed S] [--corpus FILE]...\n",
                     argv[0]);
        return 2;
    }
    modscope::apptest::FixtureOptions o;
    o.d_model = 64;
    o.n_heads = 2;
    o.d_ff = 128;
    o.n_layers = 6;
    o.max_seq_len = 256;
    o.capacity = 0.125;
    o.vocab_size = 1024;
    o.name = "dev-untrained";
    for (int i = 2; i + 1 < argc; i += 2) {
        const std::string flag = argv[i];
        const char* v = argv[i + 1];
        if (flag == "--layers") o.n_layers = std::atoi(v);
        else if (flag == "--d-model") o.d_model = std::atoi(v);
        else if (flag == "--heads") o.n_heads = std::atoi(v);
        else if (flag == "--context") o.max_seq_len = std::atoi(v);
        else if (flag == "--vocab") o.vocab_size = std::atoi(v);
        else if (flag == "--capacity") o.capacity = std::atof(v);
        else if (flag == "--name") o.name = v;
        else if (flag == "--seed") o.seed = std::strtoull(v, nullptr, 10);
        else if (flag == "--corpus") o.corpus_files.push_back(v);
        else {
            std::fprintf(stderr, "unknown option %s\n", flag.c_str());
            return 2;
        }
    }
    o.routed_layers = modscope::ModelConfig::everyOtherLayer(o.n_layers);
    try {
        modscope::apptest::writeFixtureModel(argv[1], o);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    std::printf("wrote %s\n", argv[1]);
    return 0;
}
