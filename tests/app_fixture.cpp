#include "app_fixture.h"
#include "synthetic_corpus.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>

#include "modscope/engine.h"

namespace modscope::apptest {
namespace fs = std::filesystem;

std::string fixtureCorpus(std::size_t bytes, std::uint64_t seed) { return testdata::syntheticCorpus(bytes, seed, testdata::kAppWords); }

namespace {

// Temporary directories of this process, removed at exit.
struct TemporaryDirectories {
    std::vector<std::string> paths;
    ~TemporaryDirectories() {
        std::error_code ec;
        for (const auto& p : paths) fs::remove_all(p, ec);
    }
};

// Trained tokenizers by (vocab, corpus): tests that build several models train once.
std::string tokenizerFor(const FixtureOptions& o) {
    static std::mutex mutex;
    static std::map<std::string, std::string> cache;
    static TemporaryDirectories temporary;
    std::string key = std::to_string(o.vocab_size);
    for (const auto& f : o.corpus_files) key += "|" + f;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) return it->second;

    char pattern[] = "/tmp/modscope-app-fixture-XXXXXX";
    const char* dir = mkdtemp(pattern);
    if (!dir) throw Error("cannot create a temporary directory for the fixture tokenizer");
    temporary.paths.push_back(dir);
    auto files = o.corpus_files;
    if (files.empty()) {
        const auto corpus = (fs::path(dir) / "corpus.txt").string();
        std::ofstream(corpus) << fixtureCorpus(200000, 11);
        files.push_back(corpus);
    }
    Tokenizer::TrainOptions t;
    t.input_files = files;
    t.model_prefix = (fs::path(dir) / "tok").string();
    t.vocab_size = o.vocab_size;
    Tokenizer::train(t);
    return cache[key] = t.model_prefix + ".model";
}

}  // namespace

void writeFixtureModel(const std::string& dir, const FixtureOptions& o) {
    auto tokenizer = Tokenizer::load(tokenizerFor(o));
    ModelConfig c;
    c.name = o.name;
    c.vocab_size = tokenizer->vocabSize();
    c.d_model = o.d_model;
    c.n_layers = o.n_layers;
    c.n_heads = o.n_heads;
    c.d_ff = o.d_ff;
    c.max_seq_len = o.max_seq_len;
    c.capacity = o.capacity;
    c.routed_layers = o.routed_layers;
    c.moe_layers = o.moe_layers;
    c.n_experts = o.n_experts;
    c.noop_experts = o.noop_experts;
    c.predictor_hidden = 16;
    auto model = Model::create(c, o.seed, "cpu");
    model->attachTokenizer(std::move(tokenizer));
    model->save(dir);
}

}  // namespace modscope::apptest
