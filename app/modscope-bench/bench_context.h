// What every benchmark section shares: the options, the models (opened or created once) and the report.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "bench_table.h"
#include "modscope/engine.h"

namespace modscope::bench {

struct BenchOptions {
    std::string model_dir;  // empty: the bundled default model (paths.h)
    std::string json_path;
    std::string markdown_path;
    bool quick = false;
    std::set<std::string> sections;  // empty: all

    static const std::vector<std::string>& allSections();
    bool wants(const std::string& section) const { return sections.empty() || sections.count(section) > 0; }
};

// The run's results: each table is printed as soon as it is measured, and kept for --markdown.
struct BenchReport {
    nlohmann::json json = nlohmann::json::object();
    std::vector<Table> tables;
    void add(const Table& table);
};

class BenchContext {
public:
    BenchContext(BenchOptions options, BenchReport& report);

    const BenchOptions& options() const { return options_; }
    bool quick() const { return options_.quick; }
    BenchReport& report() { return report_; }
    // Progress lines go to stderr so stdout holds only the tables.
    void progress(const std::string& line) const;

    // The model under test, opened at first use.
    const Model& model();
    const std::string& modelDirectory();
    // Model::create of the same configuration with routed_layers cleared (random weights, fixed seed).
    const Model& denseTwin();

private:
    BenchOptions options_;
    BenchReport& report_;
    std::string model_dir_;
    std::unique_ptr<Model> model_;
    std::unique_ptr<Model> dense_;
};

// Seeded random token ids in [0, vocab): timings depend on the length, not on which tokens.
std::vector<int> randomIds(int count, int vocab, unsigned seed = 1);

}  // namespace modscope::bench
