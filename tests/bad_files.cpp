#include "bad_files.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>

namespace modscope::badfiles {
namespace fs = std::filesystem;

std::string readFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot read");
    return std::string(std::istreambuf_iterator<char>(in), {});
}

void writeFile(const std::string& path, const std::string& data) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << data;
    if (!out) throw std::runtime_error(path + ": cannot write");
}

namespace {

std::string randomBytes(std::size_t n, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
}

// Runs a Python script (Debian's, which has torch) from its standard input; throws when it fails.
void runPython(const std::string& script) {
    FILE* p = ::popen("/usr/bin/python3 -", "w");
    if (!p) throw std::runtime_error("cannot start /usr/bin/python3");
    std::fwrite(script.data(), 1, script.size(), p);
    if (::pclose(p) != 0) throw std::runtime_error("python3 failed on:\n" + script);
}

}  // namespace

std::vector<BadFile> makeBadCheckpoints(const std::string& good_dir, const std::string& parent) {
    const auto good_config = nlohmann::json::parse(readFile(good_dir + "/config.json"));
    const std::string good_weights = readFile(good_dir + "/weights.pt");
    const int vocab = good_config.at("vocab_size").get<int>();
    const int d = good_config.at("d_model").get<int>();
    std::vector<BadFile> out;
    const auto copy = [&](const std::string& name) {
        const std::string dir = parent + "/" + name;
        fs::remove_all(dir);
        fs::create_directories(dir);
        for (const char* f : {"config.json", "weights.pt", "tokenizer.model"})
            fs::copy_file(good_dir + "/" + f, dir + "/" + f);
        return dir;
    };
    const auto withConfig = [&](const std::string& name, const nlohmann::json& edit, const std::string& expected) {
        auto config = good_config;
        config.update(edit);
        const auto dir = copy(name);
        writeFile(dir + "/config.json", config.dump(2));
        out.push_back({name, dir, expected});
    };
    const auto withWeights = [&](const std::string& name, const std::string& bytes, const std::string& expected) {
        const auto dir = copy(name);
        writeFile(dir + "/weights.pt", bytes);
        out.push_back({name, dir, expected});
    };

    // A third of the file: below even float16's 2 bytes a parameter (a half would pass that bound and meet the zip check).
    withWeights("weights-truncated", good_weights.substr(0, good_weights.size() / 3), "too small");
    withWeights("weights-empty", "", "empty");
    withWeights("weights-random", randomBytes(good_weights.size(), 1), "not a readable weights file");
    // Tensor defects through torch.save, the way a checkpoint from Python would carry them.
    const std::vector<std::pair<std::string, std::string>> edits = {
        {"weights-nan", "d['layers.1.router.weight'][0, 3] = float('nan')"},
        {"weights-inf", "d['norm_f.weight'][1] = float('-inf')"},
        {"weights-missing-tensor", "del d['layers.1.router.weight']"},
        {"weights-wrong-shape", "d['norm_f.weight'] = torch.ones(" + std::to_string(d + 1) + ")"},
    };
    // The edits go into the script itself (no shell quoting of Python code); the paths are temporary
    // directories without quotes.
    std::string script = "import torch\n";
    std::vector<std::string> args;
    for (const auto& [name, edit] : edits) {
        args.push_back(copy(name));
        script += "p = '" + args.back() + "/weights.pt'\nd = torch.load(p)\n" + edit + "\ntorch.save(d, p)\n";
    }
    runPython(script);
    out.push_back({"weights-nan", args[0], "'layers.1.router.weight' holds NaN or infinite values"});
    out.push_back({"weights-inf", args[1], "'norm_f.weight' holds NaN or infinite values"});
    out.push_back({"weights-missing-tensor", args[2], "missing tensor 'layers.1.router.weight'"});
    out.push_back({"weights-wrong-shape", args[3],
                   "'norm_f.weight' has shape [" + std::to_string(d + 1) + "], the config needs [" +
                       std::to_string(d) + "]"});

    withConfig("config-billion-layers", {{"n_layers", 1000000000}}, "'n_layers' is 1e+09, expected 1 to 512");
    withConfig("config-negative-heads", {{"n_heads", -3}}, "'n_heads' is -3");
    withConfig("config-heads-do-not-divide", {{"n_heads", 3}}, "is not divisible by n_heads (3)");
    withConfig("config-huge-vocab", {{"vocab_size", 100000000}}, "'vocab_size' is 1e+08");
    withConfig("config-vocab-mismatch", {{"vocab_size", vocab + 1}},
               "vocabulary of " + std::to_string(vocab) + " pieces, but config.json says vocab_size " +
                   std::to_string(vocab + 1));
    // Within every bound (2.15e9 parameters, 8.6 GB of float32) but not what the small weights.pt holds:
    // refused before the model's tensors are allocated.
    withConfig("config-huge-model",
               {{"d_model", 4096}, {"n_heads", 32}, {"n_layers", 8}, {"d_ff", 16384}, {"routed_layers", {1, 3, 5, 7}}},
               "too small for the");
    withConfig("config-not-json", nlohmann::json::object(), "");
    writeFile(out.back().path + "/config.json", "{\"vocab_size\": 300, ");
    out.back().expected = "config.json: config: not valid JSON";

    const auto tok = copy("tokenizer-random");
    writeFile(tok + "/tokenizer.model", randomBytes(4096, 2));
    out.push_back({"tokenizer-random", tok, "tokenizer.model"});
    return out;
}

std::vector<BadFile> makeBadTraces(const std::string& good_json, const std::string& parent) {
    using J = nlohmann::ordered_json;
    const J good = J::parse(good_json);
    std::vector<BadFile> out;
    const auto write = [&](const std::string& name, const std::string& text, const std::string& expected) {
        const std::string path = parent + "/" + name + ".json";
        writeFile(path, text);
        out.push_back({name, path, expected});
    };
    const auto edited = [&](const std::string& name, void (*edit)(J&), const std::string& expected) {
        J j = good;
        edit(j);
        write(name, j.dump(2), expected);
    };
    // Layer 1 is routed in every fixture model.
    edited("trace-schema", [](J& j) { j["schema"] = "modscope.trace/9"; }, "unsupported trace schema \"modscope.trace/9\"");
    edited("trace-short-array", [](J& j) { j["layers"][1]["router_logits"].erase(0); }, "layers[1].router_logits has");
    edited("trace-long-array", [](J& j) { j["layers"][1]["selected"].push_back(true); }, "layers[1].selected has more than");
    edited("trace-missing-layer", [](J& j) { j["layers"].erase(j["layers"].size() - 1); }, "but the config has n_layers");
    edited("trace-huge-logit", [](J& j) { j["layers"][1]["router_logits"][0] = 1e39; }, "outside the float32 range");
    edited("trace-huge-k", [](J& j) { j["layers"][1]["k"] = 99999999999LL; }, "layers[1].k: 99999999999 is out of range");
    edited("trace-huge-layers", [](J& j) { j["model"]["config"]["n_layers"] = 1000000000; }, "'n_layers'");
    edited("trace-huge-token-id", [](J& j) { j["tokens"][0]["id"] = 1 << 30; }, "tokens[0].id: 1073741824 is out of range");
    std::string overflow = good.dump(2);
    overflow.replace(overflow.find("\"capacity\": "), 12, "\"capacity\": 1e999, \"x\": ");
    write("trace-number-overflow", overflow, "number overflow");
    // Cut just after a comma near the middle: halfway through a number would be another error ("-0.").
    write("trace-truncated", good_json.substr(0, good_json.rfind(',', good_json.size() / 2) + 1),
          "unexpected end of input");
    write("trace-random", randomBytes(3000, 3), "invalid trace");
    write("trace-empty", "", "not valid JSON");
    return out;
}

}  // namespace modscope::badfiles
