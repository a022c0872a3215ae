// Corpus statistics (modscope/corpus_stats.h, docs/STATS_FORMAT.md): counting, merging, JSON and CSV.
#include "modscope/corpus_stats.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "formats/file_io.h"

namespace modscope {

namespace {

using nlohmann::ordered_json;

constexpr double kLogitLo = -16.0, kLogitHi = 16.0;
constexpr int kLogitBins = 64;

StatsHistogram logitHistogram() {
    StatsHistogram h;
    h.lo = kLogitLo;
    h.hi = kLogitHi;
    h.counts.assign(kLogitBins, 0);
    return h;
}

void addAgreement(Agreement& a, bool predicted, bool truth) {
    if (predicted)
        ++(truth ? a.tp : a.fp);
    else
        ++(truth ? a.fn : a.tn);
}

[[noreturn]] void bad(const std::string& what) { throw Error("statistics: " + what); }

template <typename T>
void addInto(std::vector<T>& a, const std::vector<T>& b, const char* what) {
    if (a.size() != b.size()) bad(std::string("cannot merge: ") + what + " differ in size");
    for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
}

void addHistogram(StatsHistogram& a, const StatsHistogram& b) {
    if (a.lo != b.lo || a.hi != b.hi) bad("cannot merge histograms of other ranges");
    addInto(a.counts, b.counts, "histograms");
    a.below += b.below;
    a.above += b.above;
}

// The earliest kStatsExamplesPerPiece of two lists, by window and position.
void mergeExamples(std::vector<StatsExample>& a, const std::vector<StatsExample>& b) {
    a.insert(a.end(), b.begin(), b.end());
    std::sort(a.begin(), a.end(), [](const StatsExample& x, const StatsExample& y) {
        return x.window != y.window ? x.window < y.window : x.position < y.position;
    });
    if (a.size() > std::size_t(kStatsExamplesPerPiece)) a.resize(kStatsExamplesPerPiece);
}

bool startsWithSpaceMark(const std::string& p) { return p.rfind("\xe2\x96\x81", 0) == 0; }  // "▁"

}  // namespace

const char* toString(TokenClass c) {
    switch (c) {
    case TokenClass::WordStart: return "word_start";
    case TokenClass::Capitalised: return "capitalised_word";
    case TokenClass::WordContinuation: return "word_continuation";
    case TokenClass::Digits: return "digits";
    case TokenClass::Punctuation: return "punctuation";
    case TokenClass::Whitespace: return "whitespace";
    case TokenClass::Other: return "other";
    }
    return "other";
}

TokenClass classifyPiece(const std::string& piece) {
    // Byte pieces: whitespace bytes, else other (a part of a character).
    if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece.back() == '>') {
        const std::string hex = piece.substr(3, 2);
        return hex == "09" || hex == "0A" || hex == "0D" || hex == "20" ? TokenClass::Whitespace : TokenClass::Other;
    }
    const bool start = startsWithSpaceMark(piece);
    const std::string rest = start ? piece.substr(3) : piece;
    if (rest.empty()) return start ? TokenClass::Whitespace : TokenClass::Other;
    bool all_space = true, all_digits = true, all_punct = true, any_letter = false;
    for (unsigned char c : rest) {
        const bool space = c == ' ' || c == '\t' || c == '\n' || c == '\r';
        all_space = all_space && space;
        all_digits = all_digits && c >= '0' && c <= '9';
        const bool letter = std::isalpha(c) || c >= 0x80;  // non-ASCII: letters of other scripts, mostly
        any_letter = any_letter || letter;
        all_punct = all_punct && !letter && !(c >= '0' && c <= '9') && !space;
    }
    if (all_space) return TokenClass::Whitespace;
    if (all_digits) return TokenClass::Digits;
    if (all_punct) return TokenClass::Punctuation;
    if (!any_letter) return TokenClass::Other;
    if (!start) return TokenClass::WordContinuation;
    return std::isupper(static_cast<unsigned char>(rest[0])) ? TokenClass::Capitalised : TokenClass::WordStart;
}

void StatsHistogram::add(double v) {
    if (!(v >= lo)) {
        ++below;
        return;
    }
    if (v >= hi) {
        ++above;
        return;
    }
    const auto bin = static_cast<std::size_t>((v - lo) / (hi - lo) * double(counts.size()));
    ++counts[std::min(bin, counts.size() - 1)];
}

std::int64_t StatsHistogram::total() const {
    std::int64_t n = below + above;
    for (auto c : counts) n += c;
    return n;
}

CorpusStats CorpusStats::forModel(const ModelConfig& config, const std::vector<std::string>& pieces, RoutingMode mode,
                                  double capacity, int window) {
    if (config.routed_layers.size() > std::size_t(kStatsMaxRoutedLayers))
        throw Error("statistics: " + std::to_string(config.routed_layers.size()) + " routed layers, at most " +
                    std::to_string(kStatsMaxRoutedLayers) + " are counted");
    if (window < 1 || window > config.max_seq_len)
        throw Error("statistics: a window of " + std::to_string(window) + " tokens (1 to the model's context of " +
                    std::to_string(config.max_seq_len) + ")");
    CorpusStats s;
    s.config = config;
    s.model_name = config.name;
    s.mode = mode;
    s.capacity = capacity;
    s.window = window;
    s.pieces = pieces;
    s.routed_layers = config.routed_layers;
    const auto V = static_cast<std::size_t>(config.vocab_size);
    for (int l : config.routed_layers) {
        LayerStats layer;
        layer.index = l;
        layer.id_tokens.assign(V, 0);
        layer.id_processed.assign(V, 0);
        layer.position_tokens.assign(std::size_t(window), 0);
        layer.position_processed.assign(std::size_t(window), 0);
        layer.position_predictor.assign(std::size_t(window), {});
        layer.router_logits = logitHistogram();
        layer.threshold = logitHistogram();
        s.layers.push_back(std::move(layer));
    }
    for (int l : config.moe_layers) {
        MixtureStats m;
        m.index = l;
        m.n_experts = config.n_experts;
        m.load.assign(std::size_t(config.n_experts), 0);
        m.id_expert.assign(V * std::size_t(config.n_experts), 0);
        s.mixtures.push_back(std::move(m));
    }
    const auto R = s.routed_layers.size();
    s.co_selected.assign(R, std::vector<std::int64_t>(R, 0));
    s.depth_paths.assign(std::size_t(1) << R, 0);
    s.examples.assign(V, {});
    return s;
}

void CorpusStats::addWindow(const RunTrace& run, std::int64_t window_index, const std::vector<std::string>& token_texts) {
    const int T = static_cast<int>(run.token_ids.size());
    if (T < 1 || T > window) throw Error("statistics: a window of " + std::to_string(T) + " tokens, at most " +
                                         std::to_string(window) + " counted");
    if (token_texts.size() != std::size_t(T)) throw Error("statistics: token texts do not match the window");
    const auto V = static_cast<int>(pieces.size());
    for (int id : run.token_ids)
        if (id < 0 || id >= V) throw Error("statistics: token id " + std::to_string(id) + " outside the vocabulary");
    ++windows;
    tokens += T;
    const auto R = routed_layers.size();
    std::vector<unsigned> mask(std::size_t(T), 0);
    for (std::size_t r = 0; r < R; ++r) {
        const auto& lt = run.layers.at(std::size_t(routed_layers[r]));
        if (!lt.routed || lt.selected.size() != std::size_t(T) || lt.router_logits.size() != std::size_t(T) ||
            lt.predictor_selected.size() != std::size_t(T) || lt.topk_selected.size() != std::size_t(T))
            throw Error("statistics: layer " + std::to_string(lt.index) + " has no per-token routing");
        auto& ls = layers[r];
        ls.threshold.add(lt.topk_threshold);
        for (int t = 0; t < T; ++t) {
            const int id = run.token_ids[std::size_t(t)];
            const bool sel = lt.selected[std::size_t(t)] != 0;
            const auto cls = static_cast<std::size_t>(classifyPiece(pieces[std::size_t(id)]));
            ++ls.tokens;
            ++ls.id_tokens[std::size_t(id)];
            ++ls.class_tokens[cls];
            ++ls.position_tokens[std::size_t(t)];
            if (sel) {
                ++ls.processed;
                ++ls.id_processed[std::size_t(id)];
                ++ls.class_processed[cls];
                ++ls.position_processed[std::size_t(t)];
                mask[std::size_t(t)] |= 1u << r;
            }
            const bool predicted = lt.predictor_selected[std::size_t(t)] != 0, truth = lt.topk_selected[std::size_t(t)] != 0;
            addAgreement(ls.predictor, predicted, truth);
            addAgreement(ls.class_predictor[cls], predicted, truth);
            addAgreement(ls.position_predictor[std::size_t(t)], predicted, truth);
            ls.router_logits.add(lt.router_logits[std::size_t(t)]);
        }
    }
    for (int t = 0; t < T; ++t) {
        const unsigned m = mask[std::size_t(t)];
        ++depth_paths[m];
        for (std::size_t i = 0; i < R; ++i)
            for (std::size_t j = 0; j < R; ++j)
                if ((m >> i & 1u) && (m >> j & 1u)) ++co_selected[i][j];
    }
    for (auto& ms : mixtures) {
        const auto& lt = run.layers.at(std::size_t(ms.index));
        if (!lt.moe || lt.expert.size() != std::size_t(T))
            throw Error("statistics: mixture layer " + std::to_string(ms.index) + " has no per-token experts");
        const auto c = countMixture(lt);
        ms.reached += c.reached;
        ms.noop += c.noop;
        ms.overflow += c.overflow;
        for (int e = 0; e < ms.n_experts; ++e) ms.load[std::size_t(e)] += c.load[std::size_t(e)];
        for (int t = 0; t < T; ++t) {
            const int e = lt.expert[std::size_t(t)];
            if (e >= 0) ++ms.id_expert[std::size_t(run.token_ids[std::size_t(t)]) * std::size_t(ms.n_experts) + std::size_t(e)];
        }
    }
    // Contexts: eight tokens before, four after; the corpus's first ones per id.
    for (int t = 0; t < T; ++t) {
        auto& list = examples[std::size_t(run.token_ids[std::size_t(t)])];
        if (list.size() >= std::size_t(kStatsExamplesPerPiece)) continue;
        std::string context;
        for (int u = std::max(0, t - 8); u < std::min(T, t + 5); ++u) {
            if (u == t) context += "\xe2\x9f\xa6";  // ⟦
            context += token_texts[std::size_t(u)];
            if (u == t) context += "\xe2\x9f\xa7";  // ⟧
        }
        list.push_back({window_index, t, context});
    }
}

void CorpusStats::merge(const CorpusStats& o) {
    if (o.schema != schema) bad("cannot merge \"" + o.schema + "\" into \"" + schema + "\"");
    if (o.config.toJson() != config.toJson() || o.weights_sha256 != weights_sha256)
        bad("cannot merge statistics of two models (" + model_name + ", " + o.model_name + ")");
    if (o.mode != mode || o.capacity != capacity || o.window != window)
        bad("cannot merge runs with other settings (mode, capacity or window)");
    if (o.sources != sources) bad("cannot merge statistics of other corpora (their sources differ)");
    if (o.pieces != pieces) bad("cannot merge statistics of other tokenizers");
    if (o.checkpoints.size() != checkpoints.size()) bad("cannot merge runs with other checkpoints");
    windows += o.windows;
    tokens += o.tokens;
    partial = partial || o.partial;
    for (std::size_t r = 0; r < layers.size(); ++r) {
        auto& a = layers[r];
        const auto& b = o.layers.at(r);
        a.tokens += b.tokens;
        a.processed += b.processed;
        addInto(a.id_tokens, b.id_tokens, "token counts");
        addInto(a.id_processed, b.id_processed, "token counts");
        for (int c = 0; c < kTokenClasses; ++c) {
            a.class_tokens[std::size_t(c)] += b.class_tokens[std::size_t(c)];
            a.class_processed[std::size_t(c)] += b.class_processed[std::size_t(c)];
            a.class_predictor[std::size_t(c)] += b.class_predictor[std::size_t(c)];
        }
        addInto(a.position_tokens, b.position_tokens, "position counts");
        addInto(a.position_processed, b.position_processed, "position counts");
        for (std::size_t t = 0; t < a.position_predictor.size(); ++t) a.position_predictor[t] += b.position_predictor.at(t);
        a.predictor += b.predictor;
        addHistogram(a.router_logits, b.router_logits);
        addHistogram(a.threshold, b.threshold);
    }
    for (std::size_t m = 0; m < mixtures.size(); ++m) {
        auto& a = mixtures[m];
        const auto& b = o.mixtures.at(m);
        a.reached += b.reached;
        a.noop += b.noop;
        a.overflow += b.overflow;
        addInto(a.load, b.load, "expert loads");
        addInto(a.id_expert, b.id_expert, "expert vocabularies");
    }
    for (std::size_t i = 0; i < co_selected.size(); ++i) addInto(co_selected[i], o.co_selected.at(i), "co-selection");
    addInto(depth_paths, o.depth_paths, "depth paths");
    for (std::size_t id = 0; id < examples.size(); ++id) mergeExamples(examples[id], o.examples.at(id));
    for (std::size_t c = 0; c < checkpoints.size(); ++c) {
        if (checkpoints[c].directory != o.checkpoints[c].directory) bad("cannot merge runs with other checkpoints");
        addInto(checkpoints[c].matching, o.checkpoints[c].matching, "checkpoint matches");
        addInto(checkpoints[c].decisions, o.checkpoints[c].decisions, "checkpoint decisions");
    }
    // The merged part: the whole corpus once every shard is in (the caller checks which were given).
    shard_index = 1;
    shard_count = 1;
}

RateInterval wilsonInterval(std::int64_t hits, std::int64_t total) {
    RateInterval r;
    if (total <= 0) return r;
    const double n = double(total), p = double(hits) / n, z = 1.959963984540054;
    const double denom = 1.0 + z * z / n;
    const double center = (p + z * z / (2 * n)) / denom;
    const double half = z * std::sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom;
    r.rate = p;
    r.low = std::max(0.0, center - half);
    r.high = std::min(1.0, center + half);
    return r;
}

namespace {

ordered_json agreementJson(const Agreement& a) { return ordered_json::array({a.tp, a.fp, a.tn, a.fn}); }

Agreement agreementFrom(const ordered_json& j, const std::string& where) {
    if (!j.is_array() || j.size() != 4) bad(where + ": expected [tp, fp, tn, fn]");
    Agreement a;
    a.tp = j[0].get<std::int64_t>(), a.fp = j[1].get<std::int64_t>(), a.tn = j[2].get<std::int64_t>(),
    a.fn = j[3].get<std::int64_t>();
    if (a.tp < 0 || a.fp < 0 || a.tn < 0 || a.fn < 0) bad(where + ": a negative count");
    return a;
}

ordered_json histogramJson(const StatsHistogram& h) {
    return {{"lo", h.lo}, {"hi", h.hi}, {"counts", h.counts}, {"below", h.below}, {"above", h.above}};
}

StatsHistogram histogramFrom(const ordered_json& j) {
    StatsHistogram h;
    h.lo = j.at("lo").get<double>();
    h.hi = j.at("hi").get<double>();
    h.counts = j.at("counts").get<std::vector<std::int64_t>>();
    h.below = j.at("below").get<std::int64_t>();
    h.above = j.at("above").get<std::int64_t>();
    return h;
}

ordered_json rateJson(std::int64_t hits, std::int64_t total) {
    const auto r = wilsonInterval(hits, total);
    return {{"tokens", total}, {"processed", hits}, {"rate", r.rate}, {"low", r.low}, {"high", r.high}};
}

}  // namespace

std::vector<int> rankedPieces(const LayerStats& l, int min_count, bool processed_first, std::size_t limit) {
    std::vector<int> ids;
    for (std::size_t id = 0; id < l.id_tokens.size(); ++id)
        if (l.id_tokens[id] >= min_count && l.id_tokens[id] > 0) ids.push_back(static_cast<int>(id));
    const auto rate = [&](int id) { return double(l.id_processed[std::size_t(id)]) / double(l.id_tokens[std::size_t(id)]); };
    std::sort(ids.begin(), ids.end(), [&](int a, int b) {
        const double ra = rate(a), rb = rate(b);
        if (ra != rb) return processed_first ? ra > rb : ra < rb;
        if (l.id_tokens[std::size_t(a)] != l.id_tokens[std::size_t(b)])
            return l.id_tokens[std::size_t(a)] > l.id_tokens[std::size_t(b)];
        return a < b;
    });
    if (ids.size() > limit) ids.resize(limit);
    return ids;
}

namespace {

constexpr std::size_t kListedPieces = 30;

ordered_json derivedTables(const CorpusStats& s, int min_count) {
    ordered_json tables;
    tables["min_count"] = min_count;
    ordered_json layers = ordered_json::array();
    for (const auto& l : s.layers) {
        ordered_json t;
        t["index"] = l.index;
        t["rate"] = rateJson(l.processed, l.tokens);
        for (const bool processed_first : {true, false}) {
            ordered_json list = ordered_json::array();
            for (int id : rankedPieces(l, min_count, processed_first, kListedPieces)) {
                auto row = rateJson(l.id_processed[std::size_t(id)], l.id_tokens[std::size_t(id)]);
                row["id"] = id;
                row["piece"] = s.pieces[std::size_t(id)];
                list.push_back(row);
            }
            t[processed_first ? "most_processed" : "most_skipped"] = list;
        }
        ordered_json classes = ordered_json::array();
        for (int c = 0; c < kTokenClasses; ++c) {
            auto row = rateJson(l.class_processed[std::size_t(c)], l.class_tokens[std::size_t(c)]);
            row["class"] = toString(static_cast<TokenClass>(c));
            const auto& a = l.class_predictor[std::size_t(c)];
            row["predictor_accuracy"] = a.total() ? a.accuracy() : 1.0;
            row["predictor_balanced_accuracy"] = a.total() ? a.balancedAccuracy() : 1.0;
            classes.push_back(row);
        }
        t["by_class"] = classes;
        ordered_json positions = ordered_json::array();
        for (std::size_t p = 0; p < l.position_tokens.size(); ++p) {
            auto row = rateJson(l.position_processed[p], l.position_tokens[p]);
            row["position"] = p;
            row["predictor_accuracy"] = l.position_predictor[p].total() ? l.position_predictor[p].accuracy() : 1.0;
            positions.push_back(row);
        }
        t["by_position"] = positions;
        t["predictor"] = {{"accuracy", l.predictor.total() ? l.predictor.accuracy() : 1.0},
                          {"balanced_accuracy", l.predictor.total() ? l.predictor.balancedAccuracy() : 1.0},
                          {"precision", l.predictor.precision()},
                          {"recall", l.predictor.recall()}};
        layers.push_back(t);
    }
    tables["layers"] = layers;
    // Co-selection: P(layer j processes | layer i processes) and the Jaccard overlap of their selections.
    const auto R = s.co_selected.size();
    ordered_json given = ordered_json::array(), jaccard = ordered_json::array();
    for (std::size_t i = 0; i < R; ++i) {
        ordered_json g = ordered_json::array(), jj = ordered_json::array();
        for (std::size_t j = 0; j < R; ++j) {
            const auto both = s.co_selected[i][j], pi = s.co_selected[i][i], pj = s.co_selected[j][j];
            g.push_back(pi ? double(both) / double(pi) : 0.0);
            jj.push_back(pi + pj - both ? double(both) / double(pi + pj - both) : 0.0);
        }
        given.push_back(g);
        jaccard.push_back(jj);
    }
    tables["co_selection"] = {{"layers", s.routed_layers}, {"p_j_given_i", given}, {"jaccard", jaccard}};
    ordered_json mixtures = ordered_json::array();
    for (const auto& m : s.mixtures) {
        ordered_json experts = ordered_json::array();
        for (int e = 0; e < m.n_experts; ++e) {
            // Each expert's vocabulary: the ids it ran most often, with the share of that id's tokens it took.
            std::vector<int> ids;
            for (std::size_t id = 0; id < s.pieces.size(); ++id)
                if (m.id_expert[id * std::size_t(m.n_experts) + std::size_t(e)] > 0) ids.push_back(int(id));
            const auto count = [&](int id) { return m.id_expert[std::size_t(id) * std::size_t(m.n_experts) + std::size_t(e)]; };
            std::sort(ids.begin(), ids.end(), [&](int a, int b) { return count(a) != count(b) ? count(a) > count(b) : a < b; });
            if (ids.size() > kListedPieces) ids.resize(kListedPieces);
            ordered_json vocab = ordered_json::array();
            for (int id : ids) vocab.push_back({{"id", id}, {"piece", s.pieces[std::size_t(id)]}, {"tokens", count(id)}});
            experts.push_back({{"expert", e}, {"tokens", m.load[std::size_t(e)]}, {"top_pieces", vocab}});
        }
        mixtures.push_back({{"index", m.index}, {"experts", experts}});
    }
    tables["mixtures"] = mixtures;
    return tables;
}

std::int64_t sum(const std::vector<std::int64_t>& v) {
    std::int64_t n = 0;
    for (auto x : v) n += x;
    return n;
}

}  // namespace

std::string statsToJson(const CorpusStats& s, int min_count) {
    ordered_json j;
    j["schema"] = s.schema;
    j["model"] = {{"name", s.model_name},
                  {"directory", s.model_directory},
                  {"weights_sha256", s.weights_sha256},
                  {"config", ordered_json::parse(s.config.toJson())}};
    j["run"] = {{"mode", toString(s.mode)}, {"capacity", s.capacity}, {"window", s.window}};
    j["corpus"] = {{"sources", s.sources},
                   {"shard", {{"index", s.shard_index}, {"count", s.shard_count}}},
                   {"partial", s.partial},
                   {"windows", s.windows},
                   {"tokens", s.tokens}};
    ordered_json classes = ordered_json::array();
    for (int c = 0; c < kTokenClasses; ++c) classes.push_back(toString(static_cast<TokenClass>(c)));
    j["token_classes"] = classes;
    j["pieces"] = s.pieces;
    ordered_json layers = ordered_json::array();
    for (const auto& l : s.layers) {
        std::vector<std::int64_t> ids, counts, processed;
        for (std::size_t id = 0; id < l.id_tokens.size(); ++id)
            if (l.id_tokens[id] > 0) ids.push_back(std::int64_t(id)), counts.push_back(l.id_tokens[id]), processed.push_back(l.id_processed[id]);
        ordered_json class_pred = ordered_json::array(), pos_pred = ordered_json::array();
        for (const auto& a : l.class_predictor) class_pred.push_back(agreementJson(a));
        for (const auto& a : l.position_predictor) pos_pred.push_back(agreementJson(a));
        layers.push_back({{"index", l.index},
                          {"tokens", l.tokens},
                          {"processed", l.processed},
                          {"predictor", agreementJson(l.predictor)},
                          {"by_id", {{"id", ids}, {"tokens", counts}, {"processed", processed}}},
                          {"by_class", {{"tokens", l.class_tokens}, {"processed", l.class_processed}, {"predictor", class_pred}}},
                          {"by_position",
                           {{"tokens", l.position_tokens}, {"processed", l.position_processed}, {"predictor", pos_pred}}},
                          {"router_logits", histogramJson(l.router_logits)},
                          {"threshold", histogramJson(l.threshold)}});
    }
    j["layers"] = layers;
    ordered_json mixtures = ordered_json::array();
    for (const auto& m : s.mixtures) {
        ordered_json by_id = ordered_json::array();
        for (std::size_t id = 0; id < s.pieces.size(); ++id) {
            const auto first = m.id_expert.begin() + std::ptrdiff_t(id * std::size_t(m.n_experts));
            std::vector<std::int64_t> row(first, first + m.n_experts);
            if (sum(row) > 0) by_id.push_back({{"id", id}, {"experts", row}});
        }
        mixtures.push_back({{"index", m.index},
                            {"n_experts", m.n_experts},
                            {"reached", m.reached},
                            {"noop", m.noop},
                            {"overflow", m.overflow},
                            {"load", m.load},
                            {"by_id", by_id}});
    }
    j["mixtures"] = mixtures;
    j["co_selected"] = s.co_selected;
    j["depth_paths"] = s.depth_paths;
    ordered_json examples = ordered_json::array();
    for (std::size_t id = 0; id < s.examples.size(); ++id) {
        if (s.examples[id].empty()) continue;
        ordered_json list = ordered_json::array();
        for (const auto& e : s.examples[id])
            list.push_back({{"window", e.window}, {"position", e.position}, {"context", e.context}});
        examples.push_back({{"id", id}, {"contexts", list}});
    }
    j["examples"] = examples;
    ordered_json checkpoints = ordered_json::array();
    for (const auto& c : s.checkpoints)
        checkpoints.push_back({{"name", c.name}, {"directory", c.directory}, {"matching", c.matching}, {"decisions", c.decisions}});
    j["checkpoints"] = checkpoints;
    j["tables"] = derivedTables(s, min_count);
    return j.dump(1) + "\n";
}

CorpusStats statsFromJson(const std::string& text) {
    ordered_json j;
    try {
        j = ordered_json::parse(text);
    } catch (const std::exception& e) {
        bad(std::string("not JSON (") + e.what() + ")");
    }
    try {
        if (!j.is_object() || j.value("schema", std::string()) != kStatsSchema)
            bad("not a \"" + std::string(kStatsSchema) + "\" file");
        const auto config = ModelConfig::fromJson(j.at("model").at("config").dump());
        std::vector<std::string> pieces = j.at("pieces").get<std::vector<std::string>>();
        if (pieces.size() != std::size_t(config.vocab_size)) bad("pieces: not one per vocabulary entry");
        const auto& run = j.at("run");
        auto s = CorpusStats::forModel(config, pieces, routingModeFromString(run.at("mode").get<std::string>()),
                                       run.at("capacity").get<double>(), run.at("window").get<int>());
        s.model_name = j.at("model").at("name").get<std::string>();
        s.model_directory = j.at("model").at("directory").get<std::string>();
        s.weights_sha256 = j.at("model").at("weights_sha256").get<std::string>();
        const auto& corpus = j.at("corpus");
        s.sources = corpus.at("sources").get<std::vector<std::string>>();
        s.shard_index = corpus.at("shard").at("index").get<int>();
        s.shard_count = corpus.at("shard").at("count").get<int>();
        s.partial = corpus.at("partial").get<bool>();
        s.windows = corpus.at("windows").get<std::int64_t>();
        s.tokens = corpus.at("tokens").get<std::int64_t>();
        const auto& layers = j.at("layers");
        if (layers.size() != s.layers.size()) bad("layers: not one per routed layer of the config");
        for (std::size_t r = 0; r < s.layers.size(); ++r) {
            auto& l = s.layers[r];
            const auto& jl = layers[r];
            const std::string where = "layers[" + std::to_string(r) + "]";
            if (jl.at("index").get<int>() != l.index) bad(where + ".index: not the config's routed layer");
            l.tokens = jl.at("tokens").get<std::int64_t>();
            l.processed = jl.at("processed").get<std::int64_t>();
            l.predictor = agreementFrom(jl.at("predictor"), where + ".predictor");
            const auto ids = jl.at("by_id").at("id").get<std::vector<std::int64_t>>();
            const auto counts = jl.at("by_id").at("tokens").get<std::vector<std::int64_t>>();
            const auto processed = jl.at("by_id").at("processed").get<std::vector<std::int64_t>>();
            if (ids.size() != counts.size() || ids.size() != processed.size()) bad(where + ".by_id: arrays of other lengths");
            for (std::size_t i = 0; i < ids.size(); ++i) {
                if (ids[i] < 0 || ids[i] >= config.vocab_size) bad(where + ".by_id: an id outside the vocabulary");
                if (counts[i] < 0 || processed[i] < 0 || processed[i] > counts[i])
                    bad(where + ".by_id: a negative count, or processed beyond its tokens");
                l.id_tokens[std::size_t(ids[i])] = counts[i];
                l.id_processed[std::size_t(ids[i])] = processed[i];
            }
            const auto& bc = jl.at("by_class");
            const auto ct = bc.at("tokens").get<std::vector<std::int64_t>>(), cp = bc.at("processed").get<std::vector<std::int64_t>>();
            if (ct.size() != std::size_t(kTokenClasses) || cp.size() != ct.size() || bc.at("predictor").size() != ct.size())
                bad(where + ".by_class: not one per token class");
            for (int c = 0; c < kTokenClasses; ++c) {
                l.class_tokens[std::size_t(c)] = ct[std::size_t(c)];
                l.class_processed[std::size_t(c)] = cp[std::size_t(c)];
                l.class_predictor[std::size_t(c)] = agreementFrom(bc.at("predictor")[std::size_t(c)], where + ".by_class.predictor");
            }
            const auto& bp = jl.at("by_position");
            l.position_tokens = bp.at("tokens").get<std::vector<std::int64_t>>();
            l.position_processed = bp.at("processed").get<std::vector<std::int64_t>>();
            if (l.position_tokens.size() != std::size_t(s.window) || l.position_processed.size() != l.position_tokens.size() ||
                bp.at("predictor").size() != l.position_tokens.size())
                bad(where + ".by_position: not one per position of the window");
            for (std::size_t p = 0; p < l.position_tokens.size(); ++p)
                l.position_predictor[p] = agreementFrom(bp.at("predictor")[p], where + ".by_position.predictor");
            l.router_logits = histogramFrom(jl.at("router_logits"));
            l.threshold = histogramFrom(jl.at("threshold"));
            // Every table of the layer counts its tokens once.
            std::int64_t class_sum = 0, class_agree = 0;
            for (int c = 0; c < kTokenClasses; ++c)
                class_sum += l.class_tokens[std::size_t(c)], class_agree += l.class_predictor[std::size_t(c)].total();
            std::int64_t pos_agree = 0;
            for (const auto& a : l.position_predictor) pos_agree += a.total();
            if (l.tokens != s.tokens || sum(l.id_tokens) != l.tokens || class_sum != l.tokens ||
                sum(l.position_tokens) != l.tokens || l.predictor.total() != l.tokens || class_agree != l.tokens ||
                pos_agree != l.tokens || l.router_logits.total() != l.tokens)
                bad(where + ": its tables do not each count the " + std::to_string(s.tokens) + " tokens");
            if (sum(l.id_processed) != l.processed || sum(l.position_processed) != l.processed)
                bad(where + ": its tables do not each count its " + std::to_string(l.processed) + " processed tokens");
            if (l.threshold.total() != s.windows) bad(where + ".threshold: not one per window");
        }
        const auto& mixtures = j.at("mixtures");
        if (mixtures.size() != s.mixtures.size()) bad("mixtures: not one per mixture layer of the config");
        for (std::size_t m = 0; m < s.mixtures.size(); ++m) {
            auto& ms = s.mixtures[m];
            const auto& jm = mixtures[m];
            ms.reached = jm.at("reached").get<std::int64_t>();
            ms.noop = jm.at("noop").get<std::int64_t>();
            ms.overflow = jm.at("overflow").get<std::int64_t>();
            ms.load = jm.at("load").get<std::vector<std::int64_t>>();
            if (ms.load.size() != std::size_t(ms.n_experts)) bad("mixtures: a load per expert");
            for (const auto& row : jm.at("by_id")) {
                const auto id = row.at("id").get<std::int64_t>();
                const auto experts = row.at("experts").get<std::vector<std::int64_t>>();
                if (id < 0 || id >= config.vocab_size || experts.size() != std::size_t(ms.n_experts)) bad("mixtures.by_id: a bad row");
                std::copy(experts.begin(), experts.end(), ms.id_expert.begin() + std::ptrdiff_t(std::size_t(id) * std::size_t(ms.n_experts)));
            }
            if (sum(ms.load) + ms.noop + ms.overflow != ms.reached || sum(ms.id_expert) != sum(ms.load))
                bad("mixtures[" + std::to_string(m) + "]: loads, no-ops and overflow do not add up to the tokens that reached it");
        }
        s.co_selected = j.at("co_selected").get<std::vector<std::vector<std::int64_t>>>();
        s.depth_paths = j.at("depth_paths").get<std::vector<std::int64_t>>();
        if (s.co_selected.size() != s.layers.size() || s.depth_paths.size() != (std::size_t(1) << s.layers.size()))
            bad("co_selected or depth_paths: not sized by the routed layers");
        for (std::size_t i = 0; i < s.layers.size(); ++i)
            if (s.co_selected[i].size() != s.layers.size() || s.co_selected[i][i] != s.layers[i].processed)
                bad("co_selected: its diagonal must be each layer's processed tokens");
        if (sum(s.depth_paths) != s.tokens) bad("depth_paths: they do not count the " + std::to_string(s.tokens) + " tokens");
        for (const auto& e : j.at("examples")) {
            const auto id = e.at("id").get<std::int64_t>();
            if (id < 0 || id >= config.vocab_size) bad("examples: an id outside the vocabulary");
            for (const auto& c : e.at("contexts"))
                s.examples[std::size_t(id)].push_back(
                    {c.at("window").get<std::int64_t>(), c.at("position").get<int>(), c.at("context").get<std::string>()});
        }
        for (const auto& c : j.at("checkpoints"))
            s.checkpoints.push_back({c.at("name").get<std::string>(), c.at("directory").get<std::string>(),
                                     c.at("matching").get<std::vector<std::int64_t>>(),
                                     c.at("decisions").get<std::vector<std::int64_t>>()});
        return s;
    } catch (const nlohmann::json::exception& e) {
        bad(std::string("a field is missing or of the wrong type (") + e.what() + ")");
    }
}

CorpusStats loadStats(const std::string& path) {
    try {
        return statsFromJson(readFileBounded(path, 256ull << 20));
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    }
}

std::vector<std::string> writeStatsCsv(const CorpusStats& s, const std::string& dir, int min_count) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw Error(dir + ": cannot create directory (" + ec.message() + ")");
    const auto tables = derivedTables(s, min_count);
    std::vector<std::string> written;
    const auto quote = [](const std::string& v) {
        std::string out = "\"";
        for (char c : v) out += c == '"' ? std::string("\"\"") : std::string(1, c);
        return out + "\"";
    };
    const auto num = [](double v) {
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%.9g", v);
        return std::string(buf);
    };
    const auto save = [&](const std::string& name, const std::string& body) {
        writeFileAtomic((fs::path(dir) / name).string(), body);
        written.push_back(name);
    };
    std::string pieces = "layer,list,rank,id,piece,tokens,processed,rate,low,high\n";
    std::string classes = "layer,class,tokens,processed,rate,low,high,predictor_accuracy,predictor_balanced_accuracy\n";
    std::string positions = "layer,position,tokens,processed,rate,low,high,predictor_accuracy\n";
    for (const auto& l : tables["layers"]) {
        const std::string layer = std::to_string(l["index"].get<int>());
        for (const char* list : {"most_processed", "most_skipped"}) {
            int rank = 0;
            for (const auto& r : l[list])
                pieces += layer + "," + list + "," + std::to_string(rank++) + "," + std::to_string(r["id"].get<int>()) + "," +
                          quote(r["piece"].get<std::string>()) + "," + std::to_string(r["tokens"].get<std::int64_t>()) + "," +
                          std::to_string(r["processed"].get<std::int64_t>()) + "," + num(r["rate"]) + "," + num(r["low"]) +
                          "," + num(r["high"]) + "\n";
        }
        for (const auto& r : l["by_class"])
            classes += layer + "," + r["class"].get<std::string>() + "," + std::to_string(r["tokens"].get<std::int64_t>()) + "," +
                       std::to_string(r["processed"].get<std::int64_t>()) + "," + num(r["rate"]) + "," + num(r["low"]) + "," +
                       num(r["high"]) + "," + num(r["predictor_accuracy"]) + "," + num(r["predictor_balanced_accuracy"]) + "\n";
        for (const auto& r : l["by_position"])
            positions += layer + "," + std::to_string(r["position"].get<std::int64_t>()) + "," +
                         std::to_string(r["tokens"].get<std::int64_t>()) + "," + std::to_string(r["processed"].get<std::int64_t>()) +
                         "," + num(r["rate"]) + "," + num(r["low"]) + "," + num(r["high"]) + "," + num(r["predictor_accuracy"]) + "\n";
    }
    save("pieces.csv", pieces);
    save("classes.csv", classes);
    save("positions.csv", positions);
    std::string co = "layer_i,layer_j,both,p_j_given_i,jaccard\n";
    const auto& cs = tables["co_selection"];
    for (std::size_t i = 0; i < s.routed_layers.size(); ++i)
        for (std::size_t j = 0; j < s.routed_layers.size(); ++j)
            co += std::to_string(s.routed_layers[i]) + "," + std::to_string(s.routed_layers[j]) + "," +
                  std::to_string(s.co_selected[i][j]) + "," + num(cs["p_j_given_i"][i][j]) + "," + num(cs["jaccard"][i][j]) + "\n";
    save("co_selection.csv", co);
    std::string paths = "layers,tokens\n";
    for (std::size_t m = 0; m < s.depth_paths.size(); ++m) {
        std::string names;
        for (std::size_t r = 0; r < s.routed_layers.size(); ++r)
            if (m >> r & 1u) names += (names.empty() ? "" : " ") + std::to_string(s.routed_layers[r]);
        paths += quote(names) + "," + std::to_string(s.depth_paths[m]) + "\n";
    }
    save("depth_paths.csv", paths);
    std::string hist = "layer,histogram,bin_low,bin_high,count\n";
    for (const auto& l : s.layers)
        for (const auto* h : {&l.router_logits, &l.threshold}) {
            const char* name = h == &l.router_logits ? "router_logit" : "threshold";
            const double w = (h->hi - h->lo) / double(h->counts.size());
            hist += std::to_string(l.index) + "," + name + ",-inf," + num(h->lo) + "," + std::to_string(h->below) + "\n";
            for (std::size_t b = 0; b < h->counts.size(); ++b)
                hist += std::to_string(l.index) + "," + name + "," + num(h->lo + w * double(b)) + "," +
                        num(h->lo + w * double(b + 1)) + "," + std::to_string(h->counts[b]) + "\n";
            hist += std::to_string(l.index) + "," + name + "," + num(h->hi) + ",inf," + std::to_string(h->above) + "\n";
        }
    save("histograms.csv", hist);
    if (!s.mixtures.empty()) {
        std::string experts = "layer,expert,id,piece,tokens\n";
        for (const auto& m : tables["mixtures"])
            for (const auto& e : m["experts"])
                for (const auto& p : e["top_pieces"])
                    experts += std::to_string(m["index"].get<int>()) + "," + std::to_string(e["expert"].get<int>()) + "," +
                               std::to_string(p["id"].get<int>()) + "," + quote(p["piece"].get<std::string>()) + "," +
                               std::to_string(p["tokens"].get<std::int64_t>()) + "\n";
        save("experts.csv", experts);
    }
    if (!s.checkpoints.empty()) {
        std::string sat = "checkpoint,directory,layer,matching,decisions,share\n";
        for (const auto& c : s.checkpoints)
            for (std::size_t r = 0; r < c.matching.size(); ++r)
                sat += quote(c.name) + "," + quote(c.directory) + "," + std::to_string(s.routed_layers[r]) + "," +
                       std::to_string(c.matching[r]) + "," + std::to_string(c.decisions[r]) + "," +
                       num(c.decisions[r] ? double(c.matching[r]) / double(c.decisions[r]) : 0.0) + "\n";
        save("checkpoints.csv", sat);
    }
    return written;
}

}  // namespace modscope
