// A corpus run (modscope/corpus_run.h): files, documents, windows, and a window counted.
#include "modscope/corpus_run.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "formats/file_io.h"
#include "modscope/trace_io.h"

namespace modscope {

namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kMaxCorpusFileBytes = 1ull << 30;

bool corpusExtension(const fs::path& p) {
    auto ext = p.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    return ext == ".txt" || ext == ".text" || ext == ".md" || ext == ".jsonl";
}

bool isJsonLines(const std::string& file) {
    auto ext = fs::path(file).extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    return ext == ".jsonl";
}

}  // namespace

std::vector<std::string> corpusFiles(const std::vector<std::string>& inputs) {
    if (inputs.empty()) throw Error("no corpus given: name text files, .jsonl files or folders of them");
    std::vector<std::string> files;
    for (const auto& input : inputs) {
        std::error_code ec;
        const auto status = fs::status(input, ec);
        if (ec || !fs::exists(status)) throw Error(input + ": no such file or folder");
        if (fs::is_regular_file(status)) {
            files.push_back(input);
        } else if (fs::is_directory(status)) {
            std::vector<std::string> found;
            for (auto it = fs::recursive_directory_iterator(input, fs::directory_options::skip_permission_denied, ec);
                 !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
                const auto name = it->path().filename().string();
                if (!name.empty() && name[0] == '.') {
                    if (it->is_directory()) it.disable_recursion_pending();
                    continue;
                }
                if (it->is_regular_file() && corpusExtension(it->path())) found.push_back(it->path().string());
            }
            if (ec) throw Error(input + ": cannot list the folder (" + ec.message() + ")");
            if (found.empty()) throw Error(input + ": no .txt, .text, .md or .jsonl files in the folder");
            std::sort(found.begin(), found.end());
            files.insert(files.end(), found.begin(), found.end());
        } else {
            throw Error(input + ": neither a file nor a folder");
        }
    }
    return files;
}

std::vector<std::string> corpusDocuments(const std::string& file) {
    const std::string data = readFileBounded(file, kMaxCorpusFileBytes);
    std::size_t bad = 0;
    if (!isValidUtf8(data, &bad))
        throw Error(file + ": not UTF-8 text (invalid byte at offset " + std::to_string(bad) + ")");
    if (!isJsonLines(file)) return {data};
    std::vector<std::string> docs;
    for (const auto& [line, text] : nonBlankLines(data)) {
        const std::string where = file + ", line " + std::to_string(line);
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(text);
        } catch (const std::exception&) {
            throw Error(where + ": not a JSON object");
        }
        if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
            throw Error(where + ": expected an object with a string field \"text\"");
        docs.push_back(j["text"].get<std::string>());
    }
    return docs;
}

std::vector<TokenWindow> documentWindows(const Tokenizer& tokenizer, const std::string& document, int window,
                                          std::int64_t& next_index) {
    std::vector<TokenWindow> out;
    const auto tokens = tokenizer.encode(document);
    for (std::size_t start = 0; start < tokens.size(); start += std::size_t(window)) {
        TokenWindow w;
        w.index = next_index++;
        const auto end = std::min(tokens.size(), start + std::size_t(window));
        for (std::size_t i = start; i < end; ++i) {
            w.ids.push_back(tokens[i].id);
            w.texts.push_back(sanitizeUtf8(document.substr(tokens[i].byte_begin, tokens[i].byte_end - tokens[i].byte_begin)));
        }
        out.push_back(std::move(w));
    }
    return out;
}

std::vector<std::string> tokenizerPieces(const Tokenizer& tokenizer) {
    std::vector<std::string> pieces;
    for (int id = 0; id < tokenizer.vocabSize(); ++id) pieces.push_back(tokenizer.piece(id));
    return pieces;
}

CorpusStats statsForModel(const Model& model, RoutingMode mode, double capacity, int window) {
    if (model.tokenizer() == nullptr) throw Error("statistics: the model has no tokenizer");
    auto stats = CorpusStats::forModel(model.config(), tokenizerPieces(*model.tokenizer()), mode, capacity, window);
    stats.model_directory = model.directory();
    stats.weights_sha256 = model.weightsSha256();
    return stats;
}

void countCorpus(const Model& model, const std::vector<std::string>& files, const RunOptions& options,
                 CorpusStats& stats, const std::vector<const Model*>& checkpoints, const std::atomic<bool>* stop,
                 const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
    std::uint64_t total = 0, done = 0;
    for (const auto& f : files) total += fs::file_size(f);
    const auto stopped = [stop] { return stop != nullptr && stop->load(); };
    std::int64_t next = 0;
    for (const auto& file : files) {
        for (const auto& doc : corpusDocuments(file)) {
            for (const auto& w : documentWindows(*model.tokenizer(), doc, stats.window, next)) {
                if (w.index % stats.shard_count != stats.shard_index - 1) continue;
                if (stopped()) break;
                countWindow(model, w, options, stats, checkpoints);
                if (progress) progress(done, total);
            }
            if (stopped()) break;
        }
        if (stopped()) break;
        done += fs::file_size(file);
        if (progress) progress(done, total);
    }
    stats.partial = stopped();
    if (next == 0) throw Error("the corpus is empty: its files give no tokens");
}

void countWindow(const Model& model, const TokenWindow& window, RunOptions options, CorpusStats& stats,
                 const std::vector<const Model*>& checkpoints) {
    options.per_token_routing = true;
    options.logits = RunOptions::Logits::None;
    stats.addWindow(model.run(window.ids, options), window.index, window.texts);
    if (checkpoints.empty()) return;
    std::vector<RunTrace> runs;
    for (const Model* m : checkpoints) runs.push_back(m->run(window.ids, options));
    const auto& last = runs.back();
    for (std::size_t c = 0; c < runs.size(); ++c) {
        auto& match = stats.checkpoints.at(c);
        for (std::size_t r = 0; r < stats.routed_layers.size(); ++r) {
            const auto layer = std::size_t(stats.routed_layers[r]);
            const auto& a = runs[c].layers.at(layer).selected;
            const auto& b = last.layers.at(layer).selected;
            for (std::size_t t = 0; t < a.size(); ++t) match.matching[r] += a[t] == b[t] ? 1 : 0;
            match.decisions[r] += std::int64_t(a.size());
        }
    }
}

}  // namespace modscope
