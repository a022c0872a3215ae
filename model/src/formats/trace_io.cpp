// Routing traces as files (docs/TRACE_FORMAT.md): building a TraceDocument from a run, writing it as JSON
// or CSV, and reading it back from untrusted bytes.
//
// Reading is three steps, each bounded: the size is capped; nlohmann's SAX parser checks the JSON syntax
// (UTF-8, escapes, number overflow, nesting depth) without building a DOM; then a small pull reader walks
// the validated text and fills the typed document directly, checking every count against the model's
// config and the token count as it goes, so a hostile file cannot make it allocate more than a genuine
// trace of the same model and prompt length would need.
#include "modscope/trace_io.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string_view>

#include "formats/file_io.h"

namespace modscope {

namespace {

constexpr int kMaxJsonDepth = 32;

// ---------------------------------------------------------------------------------------------------------
// Text helpers

std::size_t utf8SequenceLength(const std::string& s, std::size_t i) {
    const auto b = static_cast<unsigned char>(s[i]);
    auto cont = [&](std::size_t j) {
        return j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80;
    };
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return cont(i + 1) ? 2 : 0;
    if (b >= 0xE0 && b <= 0xEF) {
        if (!cont(i + 1) || !cont(i + 2)) return 0;
        const auto b1 = static_cast<unsigned char>(s[i + 1]);
        if (b == 0xE0 && b1 < 0xA0) return 0;   // overlong
        if (b == 0xED && b1 >= 0xA0) return 0;  // UTF-16 surrogates
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
        const auto b1 = static_cast<unsigned char>(s[i + 1]);
        if (b == 0xF0 && b1 < 0x90) return 0;   // overlong
        if (b == 0xF4 && b1 >= 0x90) return 0;  // past U+10FFFF
        return 4;
    }
    return 0;
}

// Makes text from an untrusted file safe to put in a one-line message: valid UTF-8, no control characters,
// not too long.
std::string printable(const std::string& s, std::size_t max_chars = 60) {
    std::string clean = sanitizeUtf8(s);
    for (auto& c : clean)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) c = '?';
    if (clean.size() > max_chars) {
        std::size_t cut = max_chars;
        while (cut > 0 && (static_cast<unsigned char>(clean[cut]) & 0xC0) == 0x80) --cut;
        clean = clean.substr(0, cut) + "...";
    }
    return clean;
}

std::string lowerExtension(const std::string& path) {
    const auto slash = path.find_last_of('/');
    const auto dot = path.find_last_of('.');
    if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return {};
    std::string ext = path.substr(dot);
    for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return ext;
}

// Real numbers always carry a '.' or an exponent ("1.0", "-0.0"), so that readers which type numbers by
// their look (Python's json, pandas) read a float, and -0.0 keeps its sign.
std::string withFractionMark(std::string s) {
    if (s.find_first_of(".eE") == std::string::npos) s += ".0";
    return s;
}

// The shortest decimal that reads back as the same float32 both when parsed as float32 and when parsed as
// float64 and then rounded (what Python, pandas and most JSON libraries do). The shortest float32 form
// passes the second test for every finite float but two (+-7.038531e-26: double rounding), checked
// exhaustively; those get the float64 form of the value, which is exact either way.
std::string formatFloat(float v) {
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof(buf), v);
    double d = 0.0;
    std::from_chars(buf, r.ptr, d);
    const float back = static_cast<float>(d);
    if (std::memcmp(&back, &v, sizeof(float)) != 0)
        r = std::to_chars(buf, buf + sizeof(buf), static_cast<double>(v));
    return withFractionMark(std::string(buf, r.ptr));
}

std::string formatDouble(double v) {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    return withFractionMark(std::string(buf, r.ptr));
}

// ---------------------------------------------------------------------------------------------------------
// JSON writing: a streaming writer, pretty (two-space indent, per-token arrays on one line) or on one line.

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

// A number in a message.
std::string show(double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

std::string at(const std::string& base, std::size_t i) {
    return base + "[" + std::to_string(i) + "]";
}

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

std::string writeDocument(const TraceDocument& doc, bool pretty) {
    const auto& run = doc.run;
    const auto T = doc.tokens.size();
    if (run.token_ids.size() != T)
        throw Error("cannot write the trace: " + std::to_string(T) + " tokens but the run has " +
                    std::to_string(run.token_ids.size()) + " token ids");
    JsonWriter w(pretty);
    w.beginObject();
    w.key("schema"), w.string(kTraceSchema, "schema");

    w.key("model");
    w.beginObject();
    w.key("name"), w.string(doc.model.name, "model.name");
    // The config exactly as a checkpoint's config.json holds it (ModelConfig::toJson), on one line.
    w.key("config"), w.raw(nlohmann::ordered_json::parse(doc.model.config.toJson()).dump());
    w.key("weights_sha256"), w.string(doc.model.weights_sha256, "model.weights_sha256");
    w.key("directory"), w.string(doc.model.directory, "model.directory");
    w.endObject();

    w.key("mode"), w.string(toString(run.mode), "mode");
    w.key("capacity"), w.number(run.capacity, "capacity");
    w.key("device"), w.string(run.device, "device");
    w.key("backend"), w.string(run.backend, "backend");
    if (doc.prompt_index >= 0) {
        w.key("prompt_index"), w.integer(doc.prompt_index);
        w.key("prompt_id"), w.string(doc.prompt_id, "prompt_id");
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

    w.key("tokens");
    w.beginArray();
    for (std::size_t i = 0; i < T; ++i) {
        const auto& t = doc.tokens[i];
        if (t.id != run.token_ids[i])
            throw Error("cannot write the trace: tokens[" + std::to_string(i) + "] has id " +
                        std::to_string(t.id) + " but the run has " + std::to_string(run.token_ids[i]));
        w.beginInlineObject();
        w.key("position"), w.integer(static_cast<std::int64_t>(i));
        w.key("id"), w.integer(t.id);
        w.key("piece"), w.string(t.piece, at("tokens", i) + ".piece");
        w.key("byte_begin"), w.unsignedInteger(t.byte_begin);
        w.key("byte_end"), w.unsignedInteger(t.byte_end);
        w.endInlineObject();
    }
    w.endArray();

    w.key("layers");
    w.beginArray();
    for (std::size_t li = 0; li < run.layers.size(); ++li) {
        const auto& l = run.layers[li];
        const std::string where = at("layers", li);
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
        if (l.routed) {
            checkLength(l.router_logits.size(), "router_logits");
            checkLength(l.rank.size(), "rank");
            checkLength(l.topk_selected.size(), "topk_selected");
            checkLength(l.predictor_prob.size(), "predictor_prob");
            checkLength(l.predictor_selected.size(), "predictor_selected");
            w.key("topk_threshold"), w.number32(l.topk_threshold, where + ".topk_threshold");
            w.key("router_logits"), writeFloats(w, l.router_logits, where + ".router_logits");
            w.key("rank"), writeInts(w, l.rank);
            w.key("topk_selected"), writeBools(w, l.topk_selected);
            w.key("predictor_prob"), writeFloats(w, l.predictor_prob, where + ".predictor_prob");
            w.key("predictor_selected"), writeBools(w, l.predictor_selected);
            w.key("predictor"), writeAgreement(w, Agreement::of(l));
        } else {
            for (const char* k : {"topk_threshold", "router_logits", "rank", "topk_selected",
                                  "predictor_prob", "predictor_selected", "predictor"})
                w.key(k), w.null();
        }
        w.endObject();
    }
    w.endArray();

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

    w.key("generation");
    if (doc.generation) {
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
        for (std::size_t i = 0; i < res.steps.size(); ++i) {
            const auto& s = res.steps[i];
            const std::string where = at("generation.steps", i);
            if (s.processed.size() != run.layers.size() || s.predictor_prob.size() != run.layers.size())
                throw Error("cannot write the trace: " + where + " has routing for " +
                            std::to_string(s.processed.size()) + " layers, the model " +
                            std::to_string(run.layers.size()));
            w.beginObject();
            w.key("index"), w.integer(s.index);
            w.key("position"), w.integer(s.position);
            w.key("token_id"), w.integer(s.token_id);
            w.key("piece"), w.string(g.pieces[i], where + ".piece");
            w.key("processed"), writeBools(w, s.processed);
            w.key("predictor_prob");
            w.beginInlineArray();
            for (std::size_t li = 0; li < s.predictor_prob.size(); ++li) {
                if (!run.layers[li].routed)
                    w.null();
                else
                    w.number32(s.predictor_prob[li], at(where + ".predictor_prob", li));
            }
            w.endInlineArray();
            w.key("kv_cache_bytes"), w.integer(s.kv_cache_bytes);
            w.key("dense_kv_cache_bytes"), w.integer(s.dense_kv_cache_bytes);
            w.key("step_ms"), w.number(s.step_ms, where + ".step_ms");
            w.endObject();
        }
        w.endArray();
        w.endObject();
    } else {
        w.null();
    }

    w.key("timing");
    w.beginInlineObject();
    w.key("run_ms"), w.number(run.elapsed_ms, "timing.run_ms");
    if (doc.generation) {
        w.key("generation_ms"), w.number(doc.generation->elapsed_ms, "timing.generation_ms");
        w.key("tokens_per_second"),
            w.number(doc.generation->result.tokens_per_second, "timing.tokens_per_second");
    } else {
        w.key("generation_ms"), w.null();
        w.key("tokens_per_second"), w.null();
    }
    w.endInlineObject();
    w.endObject();
    std::string out = w.take();
    if (pretty) out += '\n';
    return out;
}

// ---------------------------------------------------------------------------------------------------------
// JSON reading, step 1: syntax, with nlohmann's SAX parser (no DOM is built).

class SyntaxCheck final : public nlohmann::json_sax<nlohmann::json> {
public:
    std::string error;

    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(number_integer_t) override { return true; }
    bool number_unsigned(number_unsigned_t) override { return true; }
    bool number_float(number_float_t, const string_t&) override { return true; }
    bool string(string_t&) override { return true; }
    bool binary(binary_t&) override { return true; }
    bool start_object(std::size_t) override { return enter(); }
    bool key(string_t&) override { return true; }
    bool end_object() override { return leave(); }
    bool start_array(std::size_t) override { return enter(); }
    bool end_array() override { return leave(); }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
        // "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ..." -> from
        // "parse".
        std::string what = ex.what();
        const auto close = what.find("] ");
        if (what.rfind("[json.exception", 0) == 0 && close != std::string::npos)
            what = what.substr(close + 2);
        error = printable(what, 300);
        return false;
    }

private:
    bool enter() {
        if (++depth_ > kMaxJsonDepth) {
            error = "values nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
            return false;
        }
        return true;
    }
    bool leave() {
        --depth_;
        return true;
    }
    int depth_ = 0;
};

void checkJsonSyntax(std::string_view text) {
    SyntaxCheck check;
    bool ok = false;
    try {
        ok = nlohmann::json::sax_parse(text.begin(), text.end(), &check, nlohmann::json::input_format_t::json,
                                       /*strict=*/true);
    } catch (const std::exception& e) {
        check.error = printable(e.what(), 300);
    }
    if (!ok)
        throw Error("not valid JSON: " + (check.error.empty() ? std::string("syntax error") : check.error));
}

// ---------------------------------------------------------------------------------------------------------
// JSON reading, step 2: a pull reader over text that step 1 accepted.

enum class Kind { Object, Array, String, Number, True, False, Null, End };

const char* describe(Kind k) {
    switch (k) {
        case Kind::Object:
            return "an object";
        case Kind::Array:
            return "an array";
        case Kind::String:
            return "a string";
        case Kind::Number:
            return "a number";
        case Kind::True:
            return "true";
        case Kind::False:
            return "false";
        case Kind::Null:
            return "null";
        case Kind::End:
            return "nothing";
    }
    return "?";
}

[[noreturn]] void bad(const std::string& message) {
    throw Error(message);
}

class Reader {
public:
    explicit Reader(std::string_view text) : s_(text) {
        if (s_.substr(0, 3) == "\xEF\xBB\xBF") pos_ = 3;
    }

    Kind peek() {
        ws();
        if (pos_ >= s_.size()) return Kind::End;
        switch (s_[pos_]) {
            case '{':
                return Kind::Object;
            case '[':
                return Kind::Array;
            case '"':
                return Kind::String;
            case 't':
                return Kind::True;
            case 'f':
                return Kind::False;
            case 'n':
                return Kind::Null;
            default:
                return Kind::Number;
        }
    }
    bool atEnd() { return peek() == Kind::End; }

    // The raw text of the next value, which is skipped.
    std::string_view skip() {
        const Kind k = peek();
        const std::size_t start = pos_;
        switch (k) {
            case Kind::Object:
            case Kind::Array: {
                int depth = 0;
                do {
                    const char c = s_[pos_];
                    if (c == '"') {
                        skipString();
                        continue;
                    }
                    if (c == '{' || c == '[')
                        ++depth;
                    else if (c == '}' || c == ']')
                        --depth;
                    ++pos_;
                } while (depth > 0 && pos_ < s_.size());
                break;
            }
            case Kind::String:
                skipString();
                break;
            case Kind::Number:
                number();
                break;
            case Kind::True:
            case Kind::Null:
                pos_ += 4;
                break;
            case Kind::False:
                pos_ += 5;
                break;
            case Kind::End:
                break;
        }
        return s_.substr(start, pos_ - start);
    }

    std::string string() {
        ws();
        const std::size_t start = ++pos_;  // after the opening quote
        bool escaped = false;
        skipStringBody(escaped);
        const auto body = s_.substr(start, pos_ - 1 - start);
        return escaped ? unescape(body) : std::string(body);
    }

    std::string_view number() {
        ws();
        const std::size_t start = pos_;
        while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-' ||
                                    s_[pos_] == '+' || s_[pos_] == '.' || s_[pos_] == 'e' || s_[pos_] == 'E'))
            ++pos_;
        return s_.substr(start, pos_ - start);
    }

    bool boolean() {
        const bool v = peek() == Kind::True;
        pos_ += v ? 4 : 5;
        return v;
    }
    void null() {
        peek();
        pos_ += 4;
    }

    // f(key) must consume the member's value.
    template <typename F>
    void object(F&& f) {
        expect('{');
        if (consume('}')) return;
        do {
            const std::string k = string();
            expect(':');
            f(k);
        } while (consume(','));
        expect('}');
    }
    // f(index) must consume the element.
    template <typename F>
    void array(F&& f) {
        expect('[');
        if (consume(']')) return;
        std::size_t i = 0;
        do f(i++);
        while (consume(','));
        expect(']');
    }

private:
    void ws() {
        while (pos_ < s_.size() &&
               (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
            ++pos_;
    }
    bool consume(char c) {
        ws();
        if (pos_ < s_.size() && s_[pos_] == c) {
            ++pos_;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!consume(c)) bad(std::string("malformed JSON near byte ") + std::to_string(pos_));
    }
    void skipString() {
        ++pos_;
        bool escaped = false;
        skipStringBody(escaped);
    }
    // From just after the opening quote to just after the closing one.
    void skipStringBody(bool& escaped) {
        while (pos_ < s_.size()) {
            const char c = s_[pos_++];
            if (c == '"') return;
            if (c == '\\') {
                escaped = true;
                ++pos_;
            }
        }
    }
    static unsigned hex4(std::string_view s, std::size_t i) {
        unsigned v = 0;
        for (std::size_t j = i; j < i + 4 && j < s.size(); ++j) {
            const char c = s[j];
            v = v * 16 + static_cast<unsigned>(std::isdigit(static_cast<unsigned char>(c))
                                                   ? c - '0'
                                                   : (std::tolower(c) - 'a' + 10));
        }
        return v;
    }
    static void appendUtf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }
    static std::string unescape(std::string_view body) {
        std::string out;
        out.reserve(body.size());
        for (std::size_t i = 0; i < body.size(); ++i) {
            const char c = body[i];
            if (c != '\\' || i + 1 >= body.size()) {
                out += c;
                continue;
            }
            const char e = body[++i];
            switch (e) {
                case 'n':
                    out += '\n';
                    break;
                case 'r':
                    out += '\r';
                    break;
                case 't':
                    out += '\t';
                    break;
                case 'b':
                    out += '\b';
                    break;
                case 'f':
                    out += '\f';
                    break;
                case 'u': {
                    unsigned cp = hex4(body, i + 1);
                    i += 4;
                    // Step 1 checked that a high surrogate is followed by "\u" and a low one.
                    if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 < body.size() && body[i + 1] == '\\' &&
                        body[i + 2] == 'u') {
                        const unsigned lo = hex4(body, i + 3);
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                    appendUtf8(out, cp);
                    break;
                }
                default:
                    out += e;  // " \ /
            }
        }
        return out;
    }

    std::string_view s_;
    std::size_t pos_ = 0;
};

// Typed reads. `where` names the value in messages, as a path: layers[3].router_logits[7].

[[noreturn]] void wrongType(const std::string& where, const char* expected, Kind found) {
    bad(where + ": expected " + expected + ", found " + describe(found));
}

std::string numberText(std::string_view t) {
    return printable(std::string(t), 40);
}

std::int64_t readInt(Reader& r, const std::string& where, std::int64_t lo, std::int64_t hi) {
    const Kind k = r.peek();
    if (k != Kind::Number) wrongType(where, "an integer", k);
    const auto t = r.number();
    std::int64_t v = 0;
    const auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (res.ec == std::errc::result_out_of_range) bad(where + ": " + numberText(t) + " is out of range");
    if (res.ec != std::errc() || res.ptr != t.data() + t.size())
        bad(where + ": " + numberText(t) + " is not an integer");
    if (lo == hi && v != lo) bad(where + ": " + std::to_string(v) + ", expected " + std::to_string(lo));
    if (v < lo || v > hi)
        bad(where + ": " + std::to_string(v) + " is out of range (" + std::to_string(lo) + " to " +
            std::to_string(hi) + ")");
    return v;
}

std::uint64_t readUnsigned(Reader& r, const std::string& where) {
    const Kind k = r.peek();
    if (k != Kind::Number) wrongType(where, "an integer", k);
    const auto t = r.number();
    std::uint64_t v = 0;
    const auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (res.ec != std::errc() || res.ptr != t.data() + t.size())
        bad(where + ": " + numberText(t) + " is not an integer from 0 to 2^64-1");
    return v;
}

double readDouble(Reader& r, const std::string& where, double lo, double hi) {
    const Kind k = r.peek();
    if (k != Kind::Number) wrongType(where, "a number", k);
    const auto t = r.number();
    double v = 0;
    const auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (res.ec != std::errc() || res.ptr != t.data() + t.size() || !std::isfinite(v))
        bad(where + ": " + numberText(t) + " is not a finite number");
    if (!(v >= lo && v <= hi))
        bad(where + ": " + numberText(t) + " is out of range (" + show(lo) + " to " + show(hi) + ")");
    return v;
}

float parseFloat32(std::string_view t, const std::string& where) {
    float v = 0;
    const auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (res.ec == std::errc::result_out_of_range)
        bad(where + ": " + numberText(t) + " is outside the float32 range");
    if (res.ec != std::errc() || res.ptr != t.data() + t.size() || !std::isfinite(v))
        bad(where + ": " + numberText(t) + " is not a finite number");
    return v;
}

float readFloat(Reader& r, const std::string& where, float lo = -std::numeric_limits<float>::max(),
                float hi = std::numeric_limits<float>::max()) {
    const Kind k = r.peek();
    if (k != Kind::Number) wrongType(where, "a number", k);
    const auto t = r.number();
    const float v = parseFloat32(t, where);
    if (!(v >= lo && v <= hi))
        bad(where + ": " + numberText(t) + " is out of range (" + show(lo) + " to " + show(hi) + ")");
    return v;
}

bool readBool(Reader& r, const std::string& where) {
    const Kind k = r.peek();
    if (k != Kind::True && k != Kind::False) wrongType(where, "true or false", k);
    return r.boolean();
}

std::string readString(Reader& r, const std::string& where) {
    const Kind k = r.peek();
    if (k != Kind::String) wrongType(where, "a string", k);
    return r.string();
}

// An array of exactly `expected` elements (at most `expected` are ever stored).
template <typename T, typename ReadOne>
std::vector<T> readArray(Reader& r, const std::string& where, std::size_t expected, const char* per,
                         ReadOne&& one) {
    const Kind k = r.peek();
    if (k != Kind::Array) wrongType(where, "an array", k);
    std::vector<T> out;
    out.reserve(expected);
    r.array([&](std::size_t i) {
        if (i >= expected)
            bad(where + " has more than " + std::to_string(expected) + " values, expected " +
                std::to_string(expected) + " (" + per + ")");
        out.push_back(one(i));
    });
    if (out.size() != expected)
        bad(where + " has " + std::to_string(out.size()) + " values, expected " + std::to_string(expected) +
            " (" + per + ")");
    return out;
}

std::vector<std::uint8_t> readBools(Reader& r, const std::string& where, std::size_t n, const char* per) {
    return readArray<std::uint8_t>(r, where, n, per, [&](std::size_t i) -> std::uint8_t {
        const Kind k = r.peek();
        if (k != Kind::True && k != Kind::False) wrongType(at(where, i), "true or false", k);
        return r.boolean() ? 1 : 0;
    });
}

std::vector<float> readFloats(Reader& r, const std::string& where, std::size_t n, const char* per, float lo,
                              float hi) {
    return readArray<float>(r, where, n, per, [&](std::size_t i) {
        const Kind k = r.peek();
        if (k != Kind::Number) wrongType(at(where, i), "a finite number", k);
        const auto t = r.number();
        const float v = parseFloat32(t, at(where, i));
        if (!(v >= lo && v <= hi))
            bad(at(where, i) + ": " + numberText(t) + " is out of range (" + show(lo) + " to " + show(hi) +
                ")");
        return v;
    });
}

// The members of an object, each at most once, as raw text spans to read in an order of our choosing.
using Members = std::map<std::string, std::string_view>;

Members members(Reader& r, const std::string& where) {
    const Kind k = r.peek();
    if (k != Kind::Object) wrongType(where, "an object", k);
    Members m;
    std::size_t count = 0;
    r.object([&](const std::string& key) {
        if (++count > 4096) bad(where + " has more than 4096 members");
        const auto span = r.skip();
        if (!m.emplace(key, span).second) bad(where + ": '" + printable(key) + "' appears twice");
    });
    return m;
}

// Runs f on a reader over member `key` (absent: returns false, or fails when required).
template <typename F>
bool member(const Members& m, const std::string& where, const char* key, bool required, F&& f) {
    const auto it = m.find(key);
    if (it == m.end()) {
        if (required) bad(where + (where.empty() ? "" : ": ") + "missing '" + key + "'");
        return false;
    }
    Reader r(it->second);
    f(r, where.empty() ? std::string(key) : where + "." + key);
    return true;
}

bool isNull(const Members& m, const char* key) {
    const auto it = m.find(key);
    return it == m.end() || it->second == "null";
}

void checkSchema(const Members& top) {
    const auto it = top.find("schema");
    if (it == top.end())
        bad("not a ModScope trace: no 'schema' field (expected \"" + std::string(kTraceSchema) + "\")");
    Reader r(it->second);
    const Kind k = r.peek();
    if (k != Kind::String)
        bad("not a ModScope trace: 'schema' is " + std::string(describe(k)) + ", expected \"" + kTraceSchema +
            "\"");
    const auto schema = r.string();
    if (schema != kTraceSchema)
        bad("unsupported trace schema \"" + printable(schema) + "\": this build of ModScope reads \"" +
            kTraceSchema + "\" only");
}

TraceDocument readDocument(std::string_view text) {
    Reader top_reader(text);
    const Members top = members(top_reader, "trace");
    checkSchema(top);

    TraceDocument doc;
    auto& run = doc.run;

    // The model first: its config bounds everything else.
    member(top, "", "model", true, [&](Reader& r, const std::string& where) {
        const auto m = members(r, where);
        member(m, where, "name", true,
               [&](Reader& r2, const std::string& w) { doc.model.name = readString(r2, w); });
        member(m, where, "config", true, [&](Reader& r2, const std::string& w) {
            const Kind k = r2.peek();
            if (k != Kind::Object) wrongType(w, "an object", k);
            try {
                doc.model.config = ModelConfig::fromJson(std::string(r2.skip()));
            } catch (const Error& e) {
                bad(w + ": " + e.what());
            }
        });
        member(m, where, "weights_sha256", false, [&](Reader& r2, const std::string& w) {
            doc.model.weights_sha256 = readString(r2, w);
            const auto& h = doc.model.weights_sha256;
            const bool hex = std::all_of(
                h.begin(), h.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
            if (!(h.empty() || (h.size() == 64 && hex)))
                bad(w + ": \"" + printable(h) + "\" is not a SHA-256 (64 lowercase hex digits)");
        });
        member(m, where, "directory", false,
               [&](Reader& r2, const std::string& w) { doc.model.directory = readString(r2, w); });
    });
    const auto& cfg = doc.model.config;
    const int n_layers = cfg.n_layers;

    member(top, "", "mode", true, [&](Reader& r, const std::string& w) {
        const auto mode = readString(r, w);
        if (mode != "topk" && mode != "causal")
            bad(w + ": \"" + printable(mode) + "\" is not topk or causal");
        run.mode = routingModeFromString(mode);
    });
    member(top, "", "capacity", true,
           [&](Reader& r, const std::string& w) { run.capacity = readDouble(r, w, 0.0, 1.0); });
    member(top, "", "device", false, [&](Reader& r, const std::string& w) { run.device = readString(r, w); });
    member(top, "", "backend", false, [&](Reader& r, const std::string& w) { run.backend = readString(r, w); });
    member(top, "", "prompt", true, [&](Reader& r, const std::string& w) { doc.prompt = readString(r, w); });
    if (!isNull(top, "prompt_index"))
        member(top, "", "prompt_index", false, [&](Reader& r, const std::string& w) {
            doc.prompt_index = static_cast<int>(readInt(r, w, 0, kMaxTraceDocuments - 1));
        });
    if (!isNull(top, "prompt_id"))
        member(top, "", "prompt_id", false,
               [&](Reader& r, const std::string& w) { doc.prompt_id = readString(r, w); });

    // Tokens: 1 ... max_seq_len of them, ids in the vocabulary, byte ranges inside the prompt.
    const std::size_t max_tokens = static_cast<std::size_t>(std::min(cfg.max_seq_len, kMaxTraceTokens));
    member(top, "", "tokens", true, [&](Reader& r, const std::string& where) {
        const Kind k = r.peek();
        if (k != Kind::Array) wrongType(where, "an array", k);
        r.array([&](std::size_t i) {
            if (i >= max_tokens)
                bad(where + " has more than " + std::to_string(max_tokens) + " tokens (the model's context)");
            const std::string w = at(where, i);
            const auto m = members(r, w);
            Token t;
            member(m, w, "position", false, [&](Reader& r2, const std::string& ww) {
                readInt(r2, ww, static_cast<std::int64_t>(i), static_cast<std::int64_t>(i));
            });
            member(m, w, "id", true, [&](Reader& r2, const std::string& ww) {
                t.id = static_cast<int>(readInt(r2, ww, 0, cfg.vocab_size - 1));
            });
            member(m, w, "piece", true,
                   [&](Reader& r2, const std::string& ww) { t.piece = readString(r2, ww); });
            const auto size = static_cast<std::int64_t>(doc.prompt.size());
            member(m, w, "byte_begin", true, [&](Reader& r2, const std::string& ww) {
                t.byte_begin = static_cast<std::size_t>(readInt(r2, ww, 0, size));
            });
            member(m, w, "byte_end", true, [&](Reader& r2, const std::string& ww) {
                t.byte_end =
                    static_cast<std::size_t>(readInt(r2, ww, static_cast<std::int64_t>(t.byte_begin), size));
            });
            doc.tokens.push_back(std::move(t));
        });
    });
    const std::size_t T = doc.tokens.size();
    if (T == 0) bad("tokens: empty (a trace has at least one token)");
    for (const auto& t : doc.tokens) run.token_ids.push_back(t.id);
    const int Ti = static_cast<int>(T);

    doc.original_tokens = T;
    doc.original_bytes = doc.prompt.size();
    if (!isNull(top, "truncated"))
        member(top, "", "truncated", false, [&](Reader& r, const std::string& where) {
            const auto m = members(r, where);
            member(m, where, "original_tokens", true, [&](Reader& r2, const std::string& w) {
                doc.original_tokens = static_cast<std::size_t>(readInt(r2, w, Ti, std::int64_t{1} << 50));
            });
            member(m, where, "original_bytes", true, [&](Reader& r2, const std::string& w) {
                doc.original_bytes = static_cast<std::size_t>(
                    readInt(r2, w, static_cast<std::int64_t>(doc.prompt.size()), std::int64_t{1} << 50));
            });
        });

    // Layers: exactly the config's, in order, each per-token array exactly T long.
    member(top, "", "layers", true, [&](Reader& r, const std::string& where) {
        const Kind k = r.peek();
        if (k != Kind::Array) wrongType(where, "an array", k);
        r.array([&](std::size_t li) {
            const std::string w = at(where, li);
            if (li >= static_cast<std::size_t>(n_layers))
                bad(where + " has more than " + std::to_string(n_layers) + " layers (the config's n_layers)");
            const auto m = members(r, w);
            LayerTrace l;
            member(m, w, "index", true, [&](Reader& r2, const std::string& ww) {
                l.index = static_cast<int>(
                    readInt(r2, ww, static_cast<std::int64_t>(li), static_cast<std::int64_t>(li)));
            });
            member(m, w, "routed", true, [&](Reader& r2, const std::string& ww) {
                l.routed = readBool(r2, ww);
                if (l.routed != cfg.isRouted(l.index))
                    bad(ww + ": " + (l.routed ? "true" : "false") + ", but the config's routed_layers say " +
                        (l.routed ? "false" : "true"));
            });
            const int expected_k = l.routed ? capacityToK(run.capacity, Ti) : Ti;
            member(m, w, "k", true, [&](Reader& r2, const std::string& ww) {
                l.k = static_cast<int>(readInt(r2, ww, 1, Ti));
                if (l.k != expected_k)
                    bad(ww + ": " + std::to_string(l.k) + ", but " +
                        (l.routed ? "capacity " + show(run.capacity) + " of " + std::to_string(T) +
                                        " tokens gives "
                                  : std::string("a full layer has k = T = ")) +
                        std::to_string(expected_k));
            });
            member(m, w, "processed", true, [&](Reader& r2, const std::string& ww) {
                l.processed = static_cast<int>(readInt(r2, ww, 0, Ti));
            });
            member(m, w, "selected", true, [&](Reader& r2, const std::string& ww) {
                l.selected = readBools(r2, ww, T, "one per token");
            });
            const auto count = [](const std::vector<std::uint8_t>& v) {
                return static_cast<int>(std::count(v.begin(), v.end(), 1));
            };
            if (count(l.selected) != l.processed)
                bad(w + ".processed: " + std::to_string(l.processed) + ", but " +
                    std::to_string(count(l.selected)) + " tokens are selected");
            static const char* routed_only[] = {"topk_threshold", "router_logits",  "rank",
                                                "topk_selected",  "predictor_prob", "predictor_selected"};
            if (!l.routed) {
                for (const char* key : routed_only)
                    if (!isNull(m, key)) bad(w + "." + key + ": a full layer has none (expected null)");
                if (l.processed != Ti) bad(w + ".processed: a full layer processes every token");
                l.topk_selected = l.selected;
                run.layers.push_back(std::move(l));
                return;
            }
            member(m, w, "topk_threshold", true,
                   [&](Reader& r2, const std::string& ww) { l.topk_threshold = readFloat(r2, ww); });
            member(m, w, "router_logits", true, [&](Reader& r2, const std::string& ww) {
                l.router_logits = readFloats(r2, ww, T, "one per token", -std::numeric_limits<float>::max(),
                                             std::numeric_limits<float>::max());
            });
            member(m, w, "rank", true, [&](Reader& r2, const std::string& ww) {
                std::vector<std::uint8_t> seen(T, 0);
                l.rank = readArray<int>(r2, ww, T, "one per token", [&](std::size_t i) {
                    const int v = static_cast<int>(readInt(r2, at(ww, i), 0, Ti - 1));
                    if (seen[v]++) bad(at(ww, i) + ": rank " + std::to_string(v) + " appears twice");
                    return v;
                });
            });
            member(m, w, "topk_selected", true, [&](Reader& r2, const std::string& ww) {
                l.topk_selected = readBools(r2, ww, T, "one per token");
                if (count(l.topk_selected) != l.k)
                    bad(ww + ": " + std::to_string(count(l.topk_selected)) +
                        " tokens in the top k, expected k = " + std::to_string(l.k));
            });
            member(m, w, "predictor_prob", true, [&](Reader& r2, const std::string& ww) {
                l.predictor_prob = readFloats(r2, ww, T, "one per token", 0.0f, 1.0f);
            });
            member(m, w, "predictor_selected", true, [&](Reader& r2, const std::string& ww) {
                l.predictor_selected = readBools(r2, ww, T, "one per token");
            });
            run.layers.push_back(std::move(l));
        });
    });
    if (run.layers.size() != static_cast<std::size_t>(n_layers))
        bad("layers: " + std::to_string(run.layers.size()) + " layers, but the config has n_layers " +
            std::to_string(n_layers));

    // Of the stats only the FLOPs are data (the rest is derived from the layers and recomputed).
    member(top, "", "stats", true, [&](Reader& r, const std::string& where) {
        const auto m = members(r, where);
        member(m, where, "flops", true,
               [&](Reader& r2, const std::string& w) { run.flops = readDouble(r2, w, 0, 1e30); });
        member(m, where, "dense_flops", true,
               [&](Reader& r2, const std::string& w) { run.dense_flops = readDouble(r2, w, 0, 1e30); });
    });

    double generation_ms = 0.0, tokens_per_second = 0.0;
    if (!isNull(top, "timing"))
        member(top, "", "timing", false, [&](Reader& r, const std::string& where) {
            const auto m = members(r, where);
            member(m, where, "run_ms", false,
                   [&](Reader& r2, const std::string& w) { run.elapsed_ms = readDouble(r2, w, 0, 1e15); });
            if (!isNull(m, "generation_ms"))
                member(m, where, "generation_ms", false,
                       [&](Reader& r2, const std::string& w) { generation_ms = readDouble(r2, w, 0, 1e15); });
            if (!isNull(m, "tokens_per_second"))
                member(m, where, "tokens_per_second", false, [&](Reader& r2, const std::string& w) {
                    tokens_per_second = readDouble(r2, w, 0, 1e15);
                });
        });

    if (!isNull(top, "generation"))
        member(top, "", "generation", false, [&](Reader& r, const std::string& where) {
            const auto m = members(r, where);
            TraceGeneration g;
            auto& res = g.result;
            member(m, where, "mode", false, [&](Reader& r2, const std::string& w) {
                if (readString(r2, w) != "causal") bad(w + ": generation is always causal");
            });
            member(m, where, "max_new_tokens", true, [&](Reader& r2, const std::string& w) {
                g.max_new_tokens = static_cast<int>(readInt(r2, w, 0, std::numeric_limits<int>::max()));
            });
            member(m, where, "temperature", true,
                   [&](Reader& r2, const std::string& w) { g.temperature = readFloat(r2, w, 0.0f, 1e6f); });
            member(m, where, "top_p", true,
                   [&](Reader& r2, const std::string& w) { g.top_p = readFloat(r2, w, 0.0f, 1.0f); });
            member(m, where, "seed", true,
                   [&](Reader& r2, const std::string& w) { g.seed = readUnsigned(r2, w); });
            member(m, where, "eos_id", true, [&](Reader& r2, const std::string& w) {
                g.eos_id = static_cast<int>(readInt(r2, w, -1, cfg.vocab_size - 1));
            });
            member(m, where, "cancelled", false,
                   [&](Reader& r2, const std::string& w) { res.cancelled = readBool(r2, w); });
            member(m, where, "text", false,
                   [&](Reader& r2, const std::string& w) { g.text = readString(r2, w); });
            constexpr std::int64_t kMaxBytes = std::int64_t{1} << 50;
            member(m, where, "kv_cache_bytes", true, [&](Reader& r2, const std::string& w) {
                res.kv_cache_bytes = readInt(r2, w, 0, kMaxBytes);
            });
            member(m, where, "dense_kv_cache_bytes", true, [&](Reader& r2, const std::string& w) {
                res.dense_kv_cache_bytes = readInt(r2, w, 0, kMaxBytes);
            });
            const std::size_t max_steps = static_cast<std::size_t>(cfg.max_seq_len) - T;
            member(m, where, "steps", true, [&](Reader& r2, const std::string& sw) {
                const Kind k = r2.peek();
                if (k != Kind::Array) wrongType(sw, "an array", k);
                r2.array([&](std::size_t i) {
                    if (i >= max_steps)
                        bad(sw + " has more than " + std::to_string(max_steps) +
                            " steps (the context left after the prompt)");
                    const std::string w = at(sw, i);
                    const auto sm = members(r2, w);
                    GenerationStep s;
                    std::string piece;
                    member(sm, w, "index", true, [&](Reader& r3, const std::string& ww) {
                        s.index = static_cast<int>(
                            readInt(r3, ww, static_cast<std::int64_t>(i), static_cast<std::int64_t>(i)));
                    });
                    member(sm, w, "position", true, [&](Reader& r3, const std::string& ww) {
                        const auto p = static_cast<std::int64_t>(T + i);
                        s.position = static_cast<int>(readInt(r3, ww, p, p));
                    });
                    member(sm, w, "token_id", true, [&](Reader& r3, const std::string& ww) {
                        s.token_id = static_cast<int>(readInt(r3, ww, 0, cfg.vocab_size - 1));
                    });
                    member(sm, w, "piece", true,
                           [&](Reader& r3, const std::string& ww) { piece = readString(r3, ww); });
                    const auto L = static_cast<std::size_t>(n_layers);
                    member(sm, w, "processed", true, [&](Reader& r3, const std::string& ww) {
                        s.processed = readBools(r3, ww, L, "one per layer");
                    });
                    member(sm, w, "predictor_prob", true, [&](Reader& r3, const std::string& ww) {
                        s.predictor_prob = readArray<float>(r3, ww, L, "one per layer", [&](std::size_t li) {
                            const bool routed = cfg.isRouted(static_cast<int>(li));
                            const Kind kk = r3.peek();
                            if (!routed) {
                                if (kk != Kind::Null) wrongType(at(ww, li), "null (a full layer)", kk);
                                r3.null();
                                return std::numeric_limits<float>::quiet_NaN();
                            }
                            return readFloat(r3, at(ww, li), 0.0f, 1.0f);
                        });
                    });
                    member(sm, w, "kv_cache_bytes", true, [&](Reader& r3, const std::string& ww) {
                        s.kv_cache_bytes = readInt(r3, ww, 0, kMaxBytes);
                    });
                    member(sm, w, "dense_kv_cache_bytes", true, [&](Reader& r3, const std::string& ww) {
                        s.dense_kv_cache_bytes = readInt(r3, ww, 0, kMaxBytes);
                    });
                    member(sm, w, "step_ms", false, [&](Reader& r3, const std::string& ww) {
                        s.step_ms = readDouble(r3, ww, 0, 1e15);
                    });
                    res.generated_ids.push_back(s.token_id);
                    res.steps.push_back(std::move(s));
                    g.pieces.push_back(std::move(piece));
                });
            });
            res.prompt_ids = run.token_ids;
            res.tokens_per_second = tokens_per_second;
            g.elapsed_ms = generation_ms;
            doc.generation = std::move(g);
        });
    return doc;
}

std::string invalid(const std::string& what) {
    return "invalid trace: " + what;
}

void checkSize(std::size_t size) {
    if (size > kMaxTraceFileBytes)
        throw Error(invalid(std::to_string(size) + " bytes, more than the " +
                            std::to_string(kMaxTraceFileBytes) + " a trace may have"));
}

TraceDocument parseOne(std::string_view text) {
    try {
        return readDocument(text);
    } catch (const Error& e) {
        const std::string msg = e.what();
        if (msg.rfind("unsupported trace schema", 0) == 0 || msg.rfind("not a ModScope trace", 0) == 0) throw;
        throw Error(invalid(msg));
    }
}

// ---------------------------------------------------------------------------------------------------------
// CSV

bool needsQuotes(const std::string& s) {
    if (s.empty()) return true;
    if (s.front() == ' ' || s.front() == '\t' || s.back() == ' ' || s.back() == '\t') return true;
    return s.find_first_of(",\"\r\n") != std::string::npos;
}

void csvField(std::string& out, const std::string& s) {
    if (!needsQuotes(s)) {
        out += s;
        return;
    }
    out += '"';
    for (const char c : s) {
        if (c == '"') out += '"';
        out += c;
    }
    out += '"';
}

void appendCsvRows(std::string& out, const TraceDocument& doc, int prompt_index) {
    const auto& run = doc.run;
    const std::size_t T = doc.tokens.size();
    const std::string prefix = prompt_index >= 0 ? std::to_string(prompt_index) + "," : std::string();
    for (std::size_t li = 0; li < run.layers.size(); ++li) {
        const auto& l = run.layers[li];
        const std::string layer = std::to_string(l.index) + ",";
        for (std::size_t t = 0; t < T; ++t) {
            out += prefix;
            out += layer;
            out += std::to_string(t) + "," + std::to_string(doc.tokens[t].id) + ",";
            if (!isValidUtf8(doc.tokens[t].piece))
                throw Error("cannot write the trace: tokens[" + std::to_string(t) +
                            "].piece is not valid UTF-8");
            csvField(out, doc.tokens[t].piece);
            out += l.routed ? ",1," : ",0,";
            if (l.routed) {
                if (!std::isfinite(l.router_logits.at(t)) || !std::isfinite(l.predictor_prob.at(t)))
                    throw Error("cannot write the trace: layer " + std::to_string(li) + " token " +
                                std::to_string(t) + " has a non-finite value");
                out += formatFloat(l.router_logits[t]) + "," + std::to_string(l.rank.at(t)) + ",";
                out += l.selected.at(t) ? "1," : "0,";
                out += formatFloat(l.predictor_prob[t]) + ",";
                out += l.predictor_selected.at(t) ? "1," : "0,";
                out += l.topk_selected.at(t) ? "1," : "0,";
            } else {
                out += ",,";
                out += l.selected.at(t) ? "1," : "0,";
                out += ",,";
                out += l.selected.at(t) ? "1," : "0,";
            }
            out += "prompt\r\n";
        }
        if (!doc.generation) continue;
        const auto& g = *doc.generation;
        for (std::size_t i = 0; i < g.result.steps.size(); ++i) {
            const auto& s = g.result.steps[i];
            out += prefix;
            out += layer;
            out += std::to_string(s.position) + "," + std::to_string(s.token_id) + ",";
            csvField(out, g.pieces.at(i));
            out += l.routed ? ",1,,," : ",0,,,";
            out += s.processed.at(li) ? "1," : "0,";
            if (l.routed) {
                const float p = s.predictor_prob.at(li);
                if (!std::isfinite(p))
                    throw Error("cannot write the trace: generation step " + std::to_string(i) + " layer " +
                                std::to_string(li) + " has a non-finite predictor probability");
                out += formatFloat(p) + ",";
                // A generation step runs in causal mode: what the rule decided is what the layer processed.
                out += s.processed.at(li) ? "1," : "0,";
            } else {
                out += ",,";
            }
            out += ",generate\r\n";
        }
    }
}

std::string csvHeader(bool with_index) {
    std::string h = with_index ? "prompt_index," : "";
    bool first = true;
    for (const char* c : kTraceCsvColumns) {
        if (!first) h += ',';
        h += c;
        first = false;
    }
    return h + "\r\n";
}

template <typename T>
T csvInt(const std::string& s, std::size_t line, const char* column, T lo, T hi) {
    T v{};
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size() || v < lo || v > hi)
        throw Error("CSV row " + std::to_string(line) + ", " + column + ": \"" + printable(s) +
                    "\" is not an integer from " + std::to_string(lo) + " to " + std::to_string(hi));
    return v;
}

bool csvBool(const std::string& s, std::size_t line, const char* column) {
    if (s == "1") return true;
    if (s == "0") return false;
    throw Error("CSV row " + std::to_string(line) + ", " + column + ": \"" + printable(s) +
                "\" is not 0 or 1");
}

float csvFloat(const std::string& s, std::size_t line, const char* column) {
    try {
        return parseFloat32(s, std::string(column));
    } catch (const Error& e) {
        throw Error("CSV row " + std::to_string(line) + ", " + e.what());
    }
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Public functions

std::string sanitizeUtf8(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size();) {
        const auto n = utf8SequenceLength(s, i);
        if (n == 0) {
            out += "\xEF\xBF\xBD";
            ++i;
        } else {
            out.append(s, i, n);
            i += n;
        }
    }
    return out;
}

bool isValidUtf8(const std::string& text, std::size_t* bad_offset) {
    for (std::size_t i = 0; i < text.size();) {
        const auto n = utf8SequenceLength(text, i);
        if (n == 0) {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        i += n;
    }
    return true;
}

std::string promptTextCoveredBy(const std::string& prompt, const std::vector<Token>& kept) {
    std::size_t cut = 0;
    for (const auto& t : kept) cut = std::max(cut, t.byte_end);
    cut = std::min(cut, prompt.size());
    while (cut < prompt.size() && (static_cast<unsigned char>(prompt[cut]) & 0xC0) == 0x80) ++cut;
    return prompt.substr(0, cut);
}

TraceStats& TraceStats::operator+=(const TraceStats& o) {
    tokens += o.tokens;
    processed += o.processed;
    pairs += o.pairs;
    routed_processed += o.routed_processed;
    routed_pairs += o.routed_pairs;
    flops += o.flops;
    dense_flops += o.dense_flops;
    predictor += o.predictor;
    if (layers.empty()) {
        layers = o.layers;
    } else {
        for (std::size_t i = 0; i < std::min(layers.size(), o.layers.size()); ++i) {
            layers[i].k += o.layers[i].k;
            layers[i].processed += o.layers[i].processed;
            layers[i].tokens += o.layers[i].tokens;
            layers[i].predictor += o.layers[i].predictor;
        }
    }
    return *this;
}

TraceStats traceStats(const TraceDocument& doc) {
    TraceStats s;
    const int T = static_cast<int>(doc.tokens.size());
    s.tokens = T;
    s.flops = doc.run.flops;
    s.dense_flops = doc.run.dense_flops;
    for (const auto& l : doc.run.layers) {
        TraceLayerStats ls;
        ls.index = l.index;
        ls.routed = l.routed;
        ls.k = l.k;
        ls.processed = l.processed;
        ls.tokens = T;
        ls.predictor = Agreement::of(l);
        s.processed += l.processed;
        s.pairs += T;
        if (l.routed) {
            s.routed_processed += l.processed;
            s.routed_pairs += T;
            s.predictor += ls.predictor;
        }
        s.layers.push_back(ls);
    }
    return s;
}

std::string traceToJson(const TraceDocument& doc) {
    return writeDocument(doc, true);
}

std::string traceToJsonLine(const TraceDocument& doc) {
    return writeDocument(doc, false);
}

TraceDocument traceFromJson(const std::string& text) {
    checkSize(text.size());
    try {
        checkJsonSyntax(text);
    } catch (const Error& e) {
        throw Error(invalid(e.what()));
    }
    Reader r(text);
    if (r.peek() == Kind::Array)
        throw Error(invalid("an array of traces (a batch); read it with loadTraces or tracesFromJson"));
    return parseOne(text);
}

std::vector<TraceDocument> tracesFromJson(const std::string& text) {
    checkSize(text.size());
    try {
        checkJsonSyntax(text);
    } catch (const Error& e) {
        throw Error(invalid(e.what()));
    }
    Reader r(text);
    if (r.peek() != Kind::Array) return {parseOne(text)};
    std::vector<TraceDocument> docs;
    r.array([&](std::size_t i) {
        if (i >= static_cast<std::size_t>(kMaxTraceDocuments))
            throw Error(invalid("more than " + std::to_string(kMaxTraceDocuments) + " traces in one file"));
        const auto span = r.skip();
        try {
            docs.push_back(parseOne(span));
        } catch (const Error& e) {
            throw Error("trace " + std::to_string(i) + ": " + e.what());
        }
    });
    return docs;
}

std::vector<TraceDocument> tracesFromJsonLines(const std::string& text) {
    checkSize(text.size());
    std::vector<TraceDocument> docs;
    std::size_t line_no = 0, start = 0;
    while (start < text.size()) {
        auto end = text.find('\n', start);
        if (end == std::string::npos) end = text.size();
        ++line_no;
        const std::string_view line(text.data() + start, end - start);
        start = end + 1;
        if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
        if (docs.size() >= static_cast<std::size_t>(kMaxTraceDocuments))
            throw Error(invalid("more than " + std::to_string(kMaxTraceDocuments) + " traces in one file"));
        try {
            try {
                checkJsonSyntax(line);
            } catch (const Error& e) {
                throw Error(invalid(e.what()));
            }
            docs.push_back(parseOne(line));
        } catch (const Error& e) {
            throw Error("line " + std::to_string(line_no) + ": " + e.what());
        }
    }
    return docs;
}

std::string traceToCsv(const TraceDocument& doc) {
    std::string out = csvHeader(false);
    appendCsvRows(out, doc, -1);
    return out;
}

std::string tracesToCsv(const std::vector<TraceDocument>& docs) {
    std::string out = csvHeader(true);
    for (std::size_t i = 0; i < docs.size(); ++i)
        appendCsvRows(out, docs[i], docs[i].prompt_index >= 0 ? docs[i].prompt_index : static_cast<int>(i));
    return out;
}

namespace {

// Calls record(fields, record_number) for each record of strict RFC 4180 text (the header is record 1),
// one record in memory at a time.
template <typename F>
void forEachCsvRecord(const std::string& text, F&& record) {
    if (text.size() > kMaxTraceFileBytes)
        throw Error("CSV: " + std::to_string(text.size()) + " bytes, more than the " +
                    std::to_string(kMaxTraceFileBytes) + " a trace may have");
    std::size_t bad_at = 0;
    if (!isValidUtf8(text, &bad_at)) throw Error("CSV: not UTF-8 text (byte " + std::to_string(bad_at) + ")");
    std::size_t width = 0, count = 0;
    std::vector<std::string> fields;
    std::size_t i = text.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
    std::size_t line = 1;
    const std::size_t n = text.size();
    while (i < n) {
        const std::size_t record_line = line;
        fields.clear();
        for (;;) {  // one field per iteration
            std::string field;
            if (i < n && text[i] == '"') {
                ++i;
                for (;;) {
                    if (i >= n)
                        throw Error("CSV line " + std::to_string(record_line) +
                                    ": a quoted field is not closed");
                    const char c = text[i++];
                    if (c == '"') {
                        if (i < n && text[i] == '"') {
                            field += '"';
                            ++i;
                            continue;
                        }
                        break;
                    }
                    if (c == '\n') ++line;
                    field += c;
                }
                if (i < n && text[i] != ',' && text[i] != '\n' &&
                    !(text[i] == '\r' && i + 1 < n && text[i + 1] == '\n'))
                    throw Error("CSV line " + std::to_string(line) + ": text after a closing quote");
            } else {
                while (i < n && text[i] != ',' && text[i] != '\n' && text[i] != '\r') {
                    if (text[i] == '"')
                        throw Error("CSV line " + std::to_string(line) +
                                    ": a quote inside an unquoted field");
                    field += text[i++];
                }
                if (i < n && text[i] == '\r' && !(i + 1 < n && text[i + 1] == '\n'))
                    throw Error("CSV line " + std::to_string(line) + ": a carriage return outside quotes");
            }
            fields.push_back(std::move(field));
            if (i < n && text[i] == ',') {
                ++i;
                continue;
            }
            break;
        }
        // End of record: CRLF, LF or end of text.
        if (i < n && text[i] == '\r') ++i;
        if (i < n && text[i] == '\n') {
            ++i;
            ++line;
        }
        if (count == 0) width = fields.size();
        if (fields.size() != width)
            throw Error("CSV line " + std::to_string(record_line) + ": " + std::to_string(fields.size()) +
                        " fields, the header has " + std::to_string(width));
        record(fields, ++count);
    }
}

}  // namespace

std::vector<std::vector<std::string>> parseCsv(const std::string& text) {
    std::vector<std::vector<std::string>> rows;
    forEachCsvRecord(text, [&](std::vector<std::string>& fields, std::size_t) { rows.push_back(fields); });
    return rows;
}

std::vector<TraceCsvRow> traceRowsFromCsv(const std::string& text) {
    std::vector<TraceCsvRow> out;
    bool with_index = false, header_seen = false;
    // Messages count records (the header is row 1): a quoted newline makes records span lines.
    forEachCsvRecord(text, [&](const std::vector<std::string>& f, std::size_t line) {
        if (line == 1) {
            header_seen = true;
            std::vector<std::string> expected(std::begin(kTraceCsvColumns), std::end(kTraceCsvColumns));
            with_index = !f.empty() && f[0] == "prompt_index";
            if (with_index) expected.insert(expected.begin(), "prompt_index");
            if (f != expected) {
                std::string want;
                for (const auto& c : expected) want += (want.empty() ? "" : ",") + c;
                throw Error("CSV: not a trace CSV: the header should be " + want);
            }
            return;
        }
        std::size_t c = 0;
        TraceCsvRow row;
        if (with_index)
            row.prompt_index = csvInt<int>(f[c++], line, "prompt_index", 0, kMaxTraceDocuments - 1);
        row.layer = csvInt<int>(f[c++], line, "layer", 0, kMaxTraceLayers - 1);
        row.position = csvInt<int>(f[c++], line, "position", 0, 2 * kMaxTraceTokens);
        row.token_id = csvInt<int>(f[c++], line, "token_id", 0, std::numeric_limits<int>::max());
        row.piece = f[c++];
        row.routed = csvBool(f[c++], line, "routed");
        if (!f[c].empty()) row.router_logit = csvFloat(f[c], line, "router_logit");
        ++c;
        if (!f[c].empty()) row.rank = csvInt<int>(f[c], line, "rank", 0, 2 * kMaxTraceTokens);
        ++c;
        row.selected = csvBool(f[c++], line, "selected");
        if (!f[c].empty()) row.predictor_prob = csvFloat(f[c], line, "predictor_prob");
        ++c;
        if (!f[c].empty()) row.predictor_selected = csvBool(f[c], line, "predictor_selected");
        ++c;
        if (!f[c].empty()) row.topk_selected = csvBool(f[c], line, "topk_selected");
        ++c;
        row.phase = f[c++];
        if (row.phase != "prompt" && row.phase != "generate")
            throw Error("CSV row " + std::to_string(line) + ", phase: \"" + printable(row.phase) +
                        "\" is not prompt or generate");
        out.push_back(std::move(row));
    });
    if (!header_seen) throw Error("CSV: empty (no header)");
    return out;
}

void saveTrace(const std::string& path, const TraceDocument& doc) {
    const auto ext = lowerExtension(path);
    if (ext == ".json")
        writeFileAtomic(path, traceToJson(doc));
    else if (ext == ".jsonl")
        writeFileAtomic(path, traceToJsonLine(doc) + "\n");
    else if (ext == ".csv")
        writeFileAtomic(path, traceToCsv(doc));
    else
        throw Error(path + ": unknown trace format '" + (ext.empty() ? std::string("(no extension)") : ext) +
                    "' (use .json, .jsonl or .csv)");
}

void saveTraces(const std::string& path, const std::vector<TraceDocument>& docs) {
    const auto ext = lowerExtension(path);
    if (ext == ".json") {
        std::string out = "[\n";
        for (std::size_t i = 0; i < docs.size(); ++i) {
            std::string one = traceToJson(docs[i]);
            one.pop_back();  // the newline
            out += one;
            out += i + 1 < docs.size() ? ",\n" : "\n";
        }
        writeFileAtomic(path, out + "]\n");
    } else if (ext == ".jsonl") {
        std::string out;
        for (const auto& d : docs) out += traceToJsonLine(d) + "\n";
        writeFileAtomic(path, out);
    } else if (ext == ".csv") {
        writeFileAtomic(path, tracesToCsv(docs));
    } else {
        throw Error(path + ": unknown trace format '" + (ext.empty() ? std::string("(no extension)") : ext) +
                    "' (use .json, .jsonl or .csv)");
    }
}

TraceDocument loadTrace(const std::string& path) {
    const auto ext = lowerExtension(path);
    if (ext != ".json")
        throw Error(
            path + ": traces are opened from their .json file" +
            (ext == ".csv" ? std::string(" (the CSV form is for analysis and cannot be replayed)") : ""));
    const auto text = readFileBounded(path, kMaxTraceFileBytes);
    try {
        return traceFromJson(text);
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    }
}

std::vector<TraceDocument> loadTraces(const std::string& path) {
    const auto ext = lowerExtension(path);
    if (ext != ".json" && ext != ".jsonl")
        throw Error(
            path + ": traces are opened from .json or .jsonl files" +
            (ext == ".csv" ? std::string(" (the CSV form is for analysis and cannot be replayed)") : ""));
    const auto text = readFileBounded(path, kMaxTraceFileBytes);
    try {
        return ext == ".json" ? tracesFromJson(text) : tracesFromJsonLines(text);
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    }
}

}  // namespace modscope
