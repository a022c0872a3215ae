// Routing traces written as JSON (docs/TRACE_FORMAT.md): a streaming writer, pretty (two-space indent,
// per-token arrays on one line) or on one line for JSON Lines. The reader is trace_json_reader.cpp.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "formats/trace_text.h"
#include "modscope/trace_io.h"

namespace modscope {

namespace {

class JsonWriter {
public:
    explicit JsonWriter(bool pretty) : pretty_(pretty) {}
    std::string take() { return std::move(out_); }

    void beginObject() { open('{'); }
    void endObject() { close('}'); }
    void beginArray() { open('['); }
    void endArray() { close(']'); }
    // An array written on one line even in pretty mode (per-token and per-layer vectors).
    void beginInlineArray() {
        value();
        out_ += '[';
        stack_.push_back({true, false});
    }
    void endInlineArray() {
        stack_.pop_back();
        out_ += ']';
    }
    // An object written on one line even in pretty mode (tokens).
    void beginInlineObject() {
        value();
        out_ += '{';
        stack_.push_back({true, false});
    }
    void endInlineObject() { endInlineArrayLike('}'); }

    void key(const char* k) {
        separator();
        out_ += '"';
        out_ += k;
        out_ += pretty_ ? "\": " : "\":";
        after_key_ = true;
    }
    void string(const std::string& s, const std::string& what) {
        value();
        std::size_t bad = 0;
        if (!isValidUtf8(s, &bad))
            throw Error("cannot write the trace: " + what + " is not valid UTF-8 (byte " +
                        std::to_string(bad) + ")");
        out_ += '"';
        for (const char c : s) {
            switch (c) {
                case '"':
                    out_ += "\\\"";
                    break;
                case '\\':
                    out_ += "\\\\";
                    break;
                case '\n':
                    out_ += "\\n";
                    break;
                case '\r':
                    out_ += "\\r";
                    break;
                case '\t':
                    out_ += "\\t";
                    break;
                case '\b':
                    out_ += "\\b";
                    break;
                case '\f':
                    out_ += "\\f";
                    break;
                default:
                    if (static_cast<unsigned char>(c) < 0x20) {
                        char buf[8];
                        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
                        out_ += buf;
                    } else {
                        out_ += c;
                    }
            }
        }
        out_ += '"';
    }
    void raw(const std::string& text) {
        value();
        out_ += text;
    }
    void null() { raw("null"); }
    void boolean(bool b) { raw(b ? "true" : "false"); }
    void integer(std::int64_t v) { raw(std::to_string(v)); }
    void unsignedInteger(std::uint64_t v) { raw(std::to_string(v)); }
    void number(double v, const std::string& what) {
        if (!std::isfinite(v)) throw Error("cannot write the trace: " + what + " is not a finite number");
        raw(formatDouble(v));
    }
    void number32(float v, const std::string& what) {
        if (!std::isfinite(v)) throw Error("cannot write the trace: " + what + " is not a finite number");
        raw(formatFloat(v));
    }

private:
    struct Level {
        bool inline_ = false;
        bool has_items = false;
    };

    bool inlineNow() const { return !pretty_ || (!stack_.empty() && stack_.back().inline_); }
    void newline(std::size_t depth) {
        out_ += '\n';
        out_.append(2 * depth, ' ');
    }
    // Before a member or element: comma and line break as needed.
    void separator() {
        if (stack_.empty()) return;
        auto& top = stack_.back();
        if (top.has_items) out_ += (pretty_ && top.inline_) ? ", " : ",";
        if (!inlineNow()) newline(stack_.size());
        top.has_items = true;
    }
    void value() {
        if (after_key_) {
            after_key_ = false;
            return;
        }
        separator();
    }
    void open(char c) {
        value();
        out_ += c;
        stack_.push_back({!pretty_ || (!stack_.empty() && stack_.back().inline_), false});
    }
    void close(char c) {
        const bool had = stack_.back().has_items;
        const bool inl = inlineNow();
        stack_.pop_back();
        if (had && !inl) newline(stack_.size());
        out_ += c;
    }
    void endInlineArrayLike(char c) {
        stack_.pop_back();
        out_ += c;
    }

    bool pretty_;
    bool after_key_ = false;
    std::vector<Level> stack_;
    std::string out_;
};

template <typename T>
void writeBools(JsonWriter& w, const std::vector<T>& v) {
    w.beginInlineArray();
    for (const auto b : v) w.boolean(b != 0);
    w.endInlineArray();
}

void writeFloats(JsonWriter& w, const std::vector<float>& v, const std::string& what) {
    w.beginInlineArray();
    for (std::size_t i = 0; i < v.size(); ++i) {
        if (!std::isfinite(v[i]))
            throw Error("cannot write the trace: " + at(what, i) + " is not a finite number");
        w.number32(v[i], what);
    }
    w.endInlineArray();
}

void writeInts(JsonWriter& w, const std::vector<int>& v) {
    w.beginInlineArray();
    for (const int x : v) w.integer(x);
    w.endInlineArray();
}

// float32 values where present[i] >= 0, null elsewhere (a mixture's probabilities for the tokens it never saw).
void writeFloatsOrNull(JsonWriter& w, const std::vector<float>& v, const std::vector<int>& present,
                       const std::string& what) {
    w.beginInlineArray();
    for (std::size_t i = 0; i < v.size(); ++i) {
        if (present[i] < 0) {
            w.null();
            continue;
        }
        if (!std::isfinite(v[i])) throw Error("cannot write the trace: " + at(what, i) + " is not a finite number");
        w.number32(v[i], what);
    }
    w.endInlineArray();
}

constexpr const char* kMixtureMembers[] = {"n_experts", "noop_experts", "expert_capacity", "expert_load",
                                           "expert_overflow", "expert", "expert_choice", "expert_prob",
                                           "expert_runner_up", "expert_runner_up_prob"};

void writeAgreement(JsonWriter& w, const Agreement& a) {
    w.beginInlineObject();
    w.key("accuracy"), w.number(a.accuracy(), "accuracy");
    w.key("balanced_accuracy"), w.number(a.balancedAccuracy(), "balanced_accuracy");
    w.key("precision"), w.number(a.precision(), "precision");
    w.key("recall"), w.number(a.recall(), "recall");
    w.key("tp"), w.integer(a.tp);
    w.key("fp"), w.integer(a.fp);
    w.key("tn"), w.integer(a.tn);
    w.key("fn"), w.integer(a.fn);
    w.endInlineObject();
}

void writeModel(JsonWriter& w, const TraceModelInfo& model) {
    w.key("model");
    w.beginObject();
    w.key("name"), w.string(model.name, "model.name");
    // The config exactly as a checkpoint's config.json holds it (ModelConfig::toJson), on one line.
    w.key("config"), w.raw(nlohmann::ordered_json::parse(model.config.toJson()).dump());
    w.key("weights_sha256"), w.string(model.weights_sha256, "model.weights_sha256");
    w.key("directory"), w.string(model.directory, "model.directory");
    w.endObject();
}

// What ran on what: mode, capacity, device, backend, the batch index, the prompt and its truncation.
void writeRunHeader(JsonWriter& w, const TraceDocument& doc) {
    const auto& run = doc.run;
    w.key("mode"), w.string(toString(run.mode), "mode");
    w.key("capacity"), w.number(run.capacity, "capacity");
    w.key("device"), w.string(run.device, "device");
    w.key("backend"), w.string(run.backend, "backend");
    if (doc.prompt_index >= 0) {
        w.key("prompt_index"), w.integer(doc.prompt_index);
        if (doc.prompt_id_integer) {
            std::int64_t id = 0;
            const auto r = std::from_chars(doc.prompt_id.data(), doc.prompt_id.data() + doc.prompt_id.size(), id);
            if (r.ec != std::errc() || r.ptr != doc.prompt_id.data() + doc.prompt_id.size())
                throw Error("cannot write the trace: prompt_id \"" + doc.prompt_id + "\" is not an integer");
            w.key("prompt_id"), w.integer(id);
        } else {
            w.key("prompt_id"), w.string(doc.prompt_id, "prompt_id");
        }
    }
    w.key("prompt"), w.string(doc.prompt, "prompt");
    w.key("truncated");
    if (doc.truncated()) {
        w.beginInlineObject();
        w.key("original_tokens"), w.unsignedInteger(doc.original_tokens);
        w.key("original_bytes"), w.unsignedInteger(doc.original_bytes);
        w.endInlineObject();
    } else {
        w.null();
    }
}

// Interventions: the forced decisions the run applied and each position's loss (docs/TRACE_FORMAT.md).
void writeInterventions(JsonWriter& w, const TraceDocument& doc) {
    const auto& run = doc.run;
    w.key("overrides");
    w.beginArray();
    for (const auto& o : run.overrides) {
        w.beginInlineObject();
        w.key("layer"), w.integer(o.layer);
        w.key("position");
        if (o.position == RoutingOverride::kAllPositions)
            w.null();
        else
            w.integer(o.position);
        w.key("process"), w.boolean(o.process);
        w.endInlineObject();
    }
    w.endArray();
    w.key("keep_capacity"), w.boolean(run.keep_capacity);
    w.key("token_loss");
    if (run.token_loss.empty()) {
        w.null();
        return;
    }
    if (run.token_loss.size() != doc.tokens.size())
        throw Error("cannot write the trace: token_loss has " + std::to_string(run.token_loss.size()) + " values for " +
                    std::to_string(doc.tokens.size()) + " tokens");
    w.beginInlineArray();
    for (std::size_t t = 0; t < run.token_loss.size(); ++t) {
        if (t + 1 == run.token_loss.size()) {
            w.null();  // the last position has no next token
            break;
        }
        if (!std::isfinite(run.token_loss[t]))
            throw Error("cannot write the trace: " + at("token_loss", t) + " is not a finite number");
        w.number32(run.token_loss[t], "token_loss");
    }
    w.endInlineArray();
}

void writeTokens(JsonWriter& w, const TraceDocument& doc) {
    const auto& ids = doc.run.token_ids;
    w.key("tokens");
    w.beginArray();
    for (std::size_t i = 0; i < doc.tokens.size(); ++i) {
        const auto& t = doc.tokens[i];
        if (t.id != ids[i])
            throw Error("cannot write the trace: tokens[" + std::to_string(i) + "] has id " +
                        std::to_string(t.id) + " but the run has " + std::to_string(ids[i]));
        w.beginInlineObject();
        w.key("position"), w.integer(static_cast<std::int64_t>(i));
        w.key("id"), w.integer(t.id);
        w.key("piece"), w.string(t.piece, at("tokens", i) + ".piece");
        w.key("byte_begin"), w.unsignedInteger(t.byte_begin);
        w.key("byte_end"), w.unsignedInteger(t.byte_end);
        w.endInlineObject();
    }
    w.endArray();
}

void writeLayer(JsonWriter& w, const LayerTrace& l, const std::string& where, std::size_t T, const RunTrace& run) {
    const auto checkLength = [&](std::size_t n, const char* field) {
        if (n != T)
            throw Error("cannot write the trace: " + where + "." + field + " has " + std::to_string(n) +
                        " values for " + std::to_string(T) + " tokens");
    };
    w.beginObject();
    w.key("index"), w.integer(l.index);
    w.key("routed"), w.boolean(l.routed);
    w.key("k"), w.integer(l.k);
    w.key("processed"), w.integer(l.processed);
    checkLength(l.selected.size(), "selected");
    w.key("selected"), writeBools(w, l.selected);
    w.key("update_ratio");
    if (l.update_ratio.empty()) {  // a trace read from the first version, which had none
        w.null();
    } else {
        checkLength(l.update_ratio.size(), "update_ratio");
        writeFloats(w, l.update_ratio, where + ".update_ratio");
    }
    if (l.routed) {
        checkLength(l.router_logits.size(), "router_logits");
        checkLength(l.rank.size(), "rank");
        checkLength(l.topk_selected.size(), "topk_selected");
        checkLength(l.predictor_prob.size(), "predictor_prob");
        checkLength(l.predictor_selected.size(), "predictor_selected");
        w.key("capacity"), w.number(layerCapacity(run, l), where + ".capacity");
        w.key("topk_threshold"), w.number32(l.topk_threshold, where + ".topk_threshold");
        w.key("router_logits"), writeFloats(w, l.router_logits, where + ".router_logits");
        std::vector<float> gate(T);
        for (std::size_t t = 0; t < T; ++t) gate[t] = l.gate(static_cast<int>(t));
        w.key("gate"), writeFloats(w, gate, where + ".gate");
        w.key("rank"), writeInts(w, l.rank);
        w.key("topk_selected"), writeBools(w, l.topk_selected);
        w.key("predictor_prob"), writeFloats(w, l.predictor_prob, where + ".predictor_prob");
        w.key("predictor_selected"), writeBools(w, l.predictor_selected);
        w.key("predictor"), writeAgreement(w, Agreement::of(l));
    } else {
        for (const char* k : {"capacity", "topk_threshold", "router_logits", "gate", "rank", "topk_selected",
                              "predictor_prob", "predictor_selected", "predictor"})
            w.key(k), w.null();
    }
    w.key("decision_value");
    if (l.routed && !l.decision_value.empty()) {
        checkLength(l.decision_value.size(), "decision_value");
        writeFloats(w, l.decision_value, where + ".decision_value");
        w.key("decision_value_top_selected"), w.integer(valuableSelected(l));
    } else {
        w.null();
        w.key("decision_value_top_selected"), w.null();
    }
    w.key("moe"), w.boolean(l.moe);
    if (l.moe) {
        for (const auto* v : {&l.expert, &l.expert_choice, &l.expert_runner_up})
            checkLength(v->size(), "expert");
        checkLength(l.expert_prob.size(), "expert_prob");
        checkLength(l.expert_runner_up_prob.size(), "expert_runner_up_prob");
        if (l.expert_load.size() != static_cast<std::size_t>(l.n_experts))
            throw Error("cannot write the trace: " + where + ".expert_load has " + std::to_string(l.expert_load.size()) +
                        " values for " + std::to_string(l.n_experts) + " experts");
        w.key("n_experts"), w.integer(l.n_experts);
        w.key("noop_experts"), w.integer(l.noop_experts);
        w.key("expert_capacity"), w.integer(l.expert_capacity);
        w.key("expert_load"), writeInts(w, l.expert_load);
        w.key("expert_overflow"), w.integer(l.expert_overflow);
        w.key("expert"), writeInts(w, l.expert);
        w.key("expert_choice"), writeInts(w, l.expert_choice);
        w.key("expert_prob"), writeFloatsOrNull(w, l.expert_prob, l.expert_choice, where + ".expert_prob");
        w.key("expert_runner_up"), writeInts(w, l.expert_runner_up);
        w.key("expert_runner_up_prob"),
            writeFloatsOrNull(w, l.expert_runner_up_prob, l.expert_runner_up, where + ".expert_runner_up_prob");
    } else {
        for (const char* k : kMixtureMembers) w.key(k), w.null();
    }
    w.endObject();
}

// The aggregates a reader would otherwise recompute (traceStats); only the FLOPs are read back.
void writeStats(JsonWriter& w, const TraceDocument& doc) {
    const auto stats = traceStats(doc);
    w.key("stats");
    w.beginObject();
    w.key("tokens"), w.integer(stats.tokens);
    w.key("processed"), w.integer(stats.processed);
    w.key("slots"), w.integer(stats.pairs);
    w.key("processed_fraction"), w.number(stats.processedFraction(), "stats.processed_fraction");
    w.key("routed_processed_fraction"),
        w.number(stats.routedProcessedFraction(), "stats.routed_processed_fraction");
    w.key("flops"), w.number(stats.flops, "stats.flops");
    w.key("dense_flops"), w.number(stats.dense_flops, "stats.dense_flops");
    w.key("flops_fraction"), w.number(stats.flopsFraction(), "stats.flops_fraction");
    w.key("predictor"), writeAgreement(w, stats.predictor);
    w.endObject();
}

void writeGenerationStep(JsonWriter& w, const GenerationStep& s, const std::string& piece,
                         const std::vector<LayerTrace>& layers, const std::string& where) {
    if (s.processed.size() != layers.size() || s.predictor_prob.size() != layers.size())
        throw Error("cannot write the trace: " + where + " has routing for " + std::to_string(s.processed.size()) +
                    " layers, the model " + std::to_string(layers.size()));
    w.beginObject();
    w.key("index"), w.integer(s.index);
    w.key("position"), w.integer(s.position);
    w.key("token_id"), w.integer(s.token_id);
    w.key("piece"), w.string(piece, where + ".piece");
    w.key("processed"), writeBools(w, s.processed);
    w.key("predictor_prob");
    w.beginInlineArray();
    for (std::size_t li = 0; li < s.predictor_prob.size(); ++li) {
        if (!layers[li].routed)
            w.null();
        else
            w.number32(s.predictor_prob[li], at(where + ".predictor_prob", li));
    }
    w.endInlineArray();
    w.key("expert");  // mixture layers: the expert that ran the token, -1 none; null elsewhere
    w.beginInlineArray();
    for (std::size_t li = 0; li < layers.size(); ++li) {
        if (!layers[li].moe)
            w.null();
        else
            w.integer(li < s.expert.size() ? s.expert[li] : -1);
    }
    w.endInlineArray();
    w.key("kv_cache_bytes"), w.integer(s.kv_cache_bytes);
    w.key("dense_kv_cache_bytes"), w.integer(s.dense_kv_cache_bytes);
    w.key("step_ms"), w.number(s.step_ms, where + ".step_ms");
    w.endObject();
}

void writeGeneration(JsonWriter& w, const TraceDocument& doc) {
    w.key("generation");
    if (!doc.generation) {
        w.null();
        return;
    }
    const auto& g = *doc.generation;
    const auto& res = g.result;
    if (res.generated_ids.size() != res.steps.size() || g.pieces.size() != res.steps.size())
        throw Error("cannot write the trace: the generation has " + std::to_string(res.steps.size()) +
                    " steps, " + std::to_string(res.generated_ids.size()) + " ids and " +
                    std::to_string(g.pieces.size()) + " pieces");
    w.beginObject();
    w.key("mode"), w.string("causal", "generation.mode");
    w.key("max_new_tokens"), w.integer(g.max_new_tokens);
    w.key("temperature"), w.number32(g.temperature, "generation.temperature");
    w.key("top_p"), w.number32(g.top_p, "generation.top_p");
    w.key("seed"), w.unsignedInteger(g.seed);
    w.key("eos_id"), w.integer(g.eos_id);
    w.key("cancelled"), w.boolean(res.cancelled);
    w.key("text"), w.string(g.text, "generation.text");
    w.key("kv_cache_bytes"), w.integer(res.kv_cache_bytes);
    w.key("dense_kv_cache_bytes"), w.integer(res.dense_kv_cache_bytes);
    w.key("steps");
    w.beginArray();
    for (std::size_t i = 0; i < res.steps.size(); ++i)
        writeGenerationStep(w, res.steps[i], g.pieces[i], doc.run.layers, at("generation.steps", i));
    w.endArray();
    w.endObject();
}

void writeTiming(JsonWriter& w, const TraceDocument& doc) {
    w.key("timing");
    w.beginInlineObject();
    w.key("run_ms"), w.number(doc.run.elapsed_ms, "timing.run_ms");
    if (doc.generation) {
        w.key("generation_ms"), w.number(doc.generation->elapsed_ms, "timing.generation_ms");
        w.key("tokens_per_second"), w.number(doc.generation->result.tokens_per_second, "timing.tokens_per_second");
    } else {
        w.key("generation_ms"), w.null();
        w.key("tokens_per_second"), w.null();
    }
    w.endInlineObject();
}

// The document in the order of docs/TRACE_FORMAT.md.
std::string writeDocument(const TraceDocument& doc, bool pretty) {
    const auto T = doc.tokens.size();
    if (doc.run.token_ids.size() != T)
        throw Error("cannot write the trace: " + std::to_string(T) + " tokens but the run has " +
                    std::to_string(doc.run.token_ids.size()) + " token ids");
    JsonWriter w(pretty);
    w.beginObject();
    w.key("schema"), w.string(kTraceSchema, "schema");
    writeModel(w, doc.model);
    writeRunHeader(w, doc);
    writeInterventions(w, doc);
    writeTokens(w, doc);
    w.key("layers");
    w.beginArray();
    for (std::size_t li = 0; li < doc.run.layers.size(); ++li) writeLayer(w, doc.run.layers[li], at("layers", li), T, doc.run);
    w.endArray();
    writeStats(w, doc);
    writeGeneration(w, doc);
    writeTiming(w, doc);
    w.endObject();
    std::string out = w.take();
    if (pretty) out += '\n';
    return out;
}

}  // namespace

std::string traceToJson(const TraceDocument& doc) {
    return writeDocument(doc, true);
}

std::string traceToJsonLine(const TraceDocument& doc) {
    return writeDocument(doc, false);
}

}  // namespace modscope
