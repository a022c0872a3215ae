#include "bench_context.h"

#include <iostream>
#include <random>

#include "modscope/paths.h"

namespace modscope::bench {

const std::vector<std::string>& BenchOptions::allSections() {
    static const std::vector<std::string> all{"forward", "mod",        "mixtures", "interventions", "stats",
                                              "layers",  "generation", "peak",     "routing",       "app",
                                              "training", "reference"};
    return all;
}

void BenchReport::add(const Table& table) {
    std::cout << table.text() << std::endl;
    tables.push_back(table);
}

BenchContext::BenchContext(BenchOptions options, BenchReport& report)
    : options_(std::move(options)), report_(report) {}

void BenchContext::progress(const std::string& line) const {
    std::cerr << "[bench] " << line << std::endl;
}

const std::string& BenchContext::modelDirectory() {
    if (model_dir_.empty())
        model_dir_ = options_.model_dir.empty() ? defaultModelDirectory() : options_.model_dir;
    return model_dir_;
}

const Model& BenchContext::model() {
    if (!model_) {
        progress("opening " + modelDirectory());
        model_ = Model::open(modelDirectory(), "cpu");
    }
    return *model_;
}

const Model& BenchContext::denseTwin() {
    if (!dense_) {
        ModelConfig config = model().config();
        config.name += "-dense";
        config.routed_layers.clear();
        dense_ = Model::create(config, /*seed=*/1234, "cpu");
    }
    return *dense_;
}

std::vector<int> randomIds(int count, int vocab, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> pick(0, vocab - 1);
    std::vector<int> ids(static_cast<std::size_t>(count));
    for (auto& id : ids) id = pick(rng);
    return ids;
}

}  // namespace modscope::bench
