// Routing traces read from JSON (docs/TRACE_FORMAT.md): untrusted bytes, so every read is bounded and every
// refusal names the value at fault by its path (layers[3].router_logits[7]).
//
// One parser, nlohmann's SAX interface, runs twice over the text; no DOM of the trace is ever built:
//  1. The survey checks the syntax (UTF-8, escapes, number overflow, nesting depth) and keeps, for each
//     document, only what bounds the rest: its schema, its model's config and its number of tokens.
//  2. The read fills the typed documents through a stack of frames, one per object or array being read,
//     each checking its values as they arrive. Every array is capped at the length the config and the token
//     count give, so a hostile file cannot make the reader allocate more than a genuine trace of the same
//     model and prompt length needs.
// Relations between members that may come in any order (byte ranges against the prompt, k against the
// capacity) are checked last, on the finished document.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "formats/trace_text.h"
#include "formats/utf8.h"
#include "modscope/trace_io.h"

namespace modscope {

namespace {

constexpr int kMaxJsonDepth = 32;
constexpr std::size_t kMaxMembers = 4096;     // members of one object
constexpr std::size_t kMaxConfigValues = 4096;  // values in a trace's model.config (a genuine one has ~20)
constexpr std::int64_t kMaxBytes = std::int64_t{1} << 50;

[[noreturn]] void bad(const std::string& message) {
    throw Error(message);
}

std::string invalid(const std::string& what) {
    return "invalid trace: " + what;
}

// ---------------------------------------------------------------------------------------------------------
// Values as the SAX parser delivers them, and their typed reads.

enum class Kind { Object, Array, String, Number, True, False, Null };

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
    }
    return "?";
}

// One value. Objects and arrays appear here only where a scalar was expected, so that the typed read
// names what it found.
struct Value {
    enum class Number { Signed, Unsigned, Real };
    Kind kind = Kind::Null;
    Number number = Number::Signed;
    std::int64_t i = 0;
    std::uint64_t u = 0;
    double d = 0.0;
    std::string text;  // a string's value, or a real number as written

    static Value of(Kind k) {
        Value v;
        v.kind = k;
        return v;
    }
    // The number for messages: a real number as written, an integer in decimal.
    std::string numberText() const {
        switch (number) {
            case Number::Signed:
                return std::to_string(i);
            case Number::Unsigned:
                return std::to_string(u);
            case Number::Real:
                break;
        }
        return printable(text, 40);
    }
};

[[noreturn]] void wrongType(const std::string& where, const char* expected, Kind found) {
    bad(where + ": expected " + expected + ", found " + describe(found));
}

void checkRange(const std::string& where, std::int64_t v, std::int64_t lo, std::int64_t hi) {
    if (lo == hi && v != lo) bad(where + ": " + std::to_string(v) + ", expected " + std::to_string(lo));
    if (v < lo || v > hi)
        bad(where + ": " + std::to_string(v) + " is out of range (" + std::to_string(lo) + " to " +
            std::to_string(hi) + ")");
}

std::int64_t readInt(const Value& v, const std::string& where, std::int64_t lo, std::int64_t hi) {
    if (v.kind != Kind::Number) wrongType(where, "an integer", v.kind);
    std::int64_t x = v.i;
    if (v.number == Value::Number::Real) {
        // nlohmann reads an integer too large for 64 bits as a real number.
        const auto& t = v.text;
        const bool digits = !t.empty() && t.find_first_not_of("-0123456789") == std::string::npos;
        bad(where + ": " + v.numberText() + (digits ? " is out of range" : " is not an integer"));
    }
    if (v.number == Value::Number::Unsigned) {
        if (v.u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
            bad(where + ": " + v.numberText() + " is out of range");
        x = static_cast<std::int64_t>(v.u);
    }
    checkRange(where, x, lo, hi);
    return x;
}

std::uint64_t readUnsigned(const Value& v, const std::string& where) {
    if (v.kind != Kind::Number) wrongType(where, "an integer", v.kind);
    if (v.number != Value::Number::Unsigned)
        bad(where + ": " + v.numberText() + " is not an integer from 0 to 2^64-1");
    return v.u;
}

double readDouble(const Value& v, const std::string& where, double lo, double hi) {
    if (v.kind != Kind::Number) wrongType(where, "a number", v.kind);
    double x = v.number == Value::Number::Signed ? static_cast<double>(v.i) : static_cast<double>(v.u);
    if (v.number == Value::Number::Real) {
        // From the text, as float32 values are: a value below the smallest double (1e-400) is refused, not
        // read as 0.
        const auto res = std::from_chars(v.text.data(), v.text.data() + v.text.size(), x);
        if (res.ec != std::errc() || res.ptr != v.text.data() + v.text.size()) x = NAN;
    }
    if (!std::isfinite(x)) bad(where + ": " + v.numberText() + " is not a finite number");
    if (!(x >= lo && x <= hi))
        bad(where + ": " + v.numberText() + " is out of range (" + show(lo) + " to " + show(hi) + ")");
    return x;
}

// A float32 parsed from the number's text (not rounded twice through a double). `expected` names the type
// in a message when the value is not a number.
float readFloat(const Value& v, const std::string& where, float lo = -std::numeric_limits<float>::max(),
                float hi = std::numeric_limits<float>::max(), const char* expected = "a number") {
    if (v.kind != Kind::Number) wrongType(where, expected, v.kind);
    const float x = parseFloat32(v.number == Value::Number::Real ? v.text : v.numberText(), where);
    if (!(x >= lo && x <= hi))
        bad(where + ": " + v.numberText() + " is out of range (" + show(lo) + " to " + show(hi) + ")");
    return x;
}

bool readBool(const Value& v, const std::string& where) {
    if (v.kind != Kind::True && v.kind != Kind::False) wrongType(where, "true or false", v.kind);
    return v.kind == Kind::True;
}

std::string readString(Value& v, const std::string& where) {
    if (v.kind != Kind::String) wrongType(where, "a string", v.kind);
    return std::move(v.text);
}

// ---------------------------------------------------------------------------------------------------------
// Step 1, the survey: syntax, and what bounds each document.

struct Skeleton {
    Kind kind = Kind::Null;  // the document's own value: an object, or what was found instead
    bool has_schema = false, has_model = false, has_config = false, has_tokens = false;
    Kind schema_kind = Kind::Null, model_kind = Kind::Null, config_kind = Kind::Null, tokens_kind = Kind::Null;
    std::string schema;     // its first kMaxSchemaBytes: enough to tell it from kTraceSchema and to quote it
    std::string duplicate;  // a member the survey reads that appears twice ("model", "model.config", ...)
    // model.config, built from its events while it is read and parsed the moment it closes, so that a batch
    // holds one config's values at a time.
    nlohmann::json building;
    std::size_t config_values = 0;
    std::optional<ModelConfig> config;
    std::string config_error;
    std::size_t tokens = 0;  // elements of "tokens"
};

constexpr std::size_t kMaxSchemaBytes = 256;

class Survey final : public nlohmann::json_sax<nlohmann::json> {
public:
    explicit Survey(bool batch_allowed) : batch_allowed_(batch_allowed) {}

    std::vector<Skeleton> docs;
    Kind top = Kind::Null;  // the text's outermost value
    std::string error;
    bool too_many = false;  // more documents than kMaxTraceDocuments (error says so)

    bool null() override { return scalar(Kind::Null, nullptr); }
    bool boolean(bool b) override { return scalar(b ? Kind::True : Kind::False, b); }
    bool number_integer(number_integer_t v) override { return scalar(Kind::Number, v); }
    bool number_unsigned(number_unsigned_t v) override { return scalar(Kind::Number, v); }
    bool number_float(number_float_t v, const string_t&) override { return scalar(Kind::Number, v); }
    bool string(string_t& s) override {
        if (!stack_.empty() && stack_.back().role == Role::Doc && stack_.back().key == "schema")
            doc().schema = s.substr(0, kMaxSchemaBytes);
        return scalar(Kind::String, s);
    }
    bool binary(binary_t&) override { return scalar(Kind::String, nullptr); }
    bool start_object(std::size_t) override { return start(Kind::Object); }
    bool start_array(std::size_t) override { return start(Kind::Array); }
    bool key(string_t& k) override {
        auto& level = stack_.back();
        level.key = k;
        // Of the members the survey reads, a second one is refused as the read would (it never gets there).
        const char* path = nullptr;
        if (level.role == Role::Doc && (k == "schema" || k == "model" || k == "tokens")) path = "trace";
        if (level.role == Role::Model && k == "config") path = "model";
        if (path && !level.seen.insert(k).second && doc().duplicate.empty())
            doc().duplicate = std::string(path) + ": '" + k + "' appears twice";
        return true;
    }
    bool end_object() override { return end(); }
    bool end_array() override { return end(); }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
        // "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ..." -> from "parse".
        std::string what = ex.what();
        const auto close = what.find("] ");
        if (what.rfind("[json.exception", 0) == 0 && close != std::string::npos) what = what.substr(close + 2);
        error = printable(what, 300);
        return false;
    }

private:
    enum class Role { Other, Batch, Doc, Model, Tokens, Config };
    struct Level {
        Role role = Role::Other;
        std::string key;             // the current member's name, in an object
        std::set<std::string> seen;  // in a document or its model: the members the survey reads, seen so far
    };

    Skeleton& doc() { return docs.back(); }

    bool newDocument(Kind k) {
        if (docs.size() >= static_cast<std::size_t>(kMaxTraceDocuments)) {
            error = "more than " + std::to_string(kMaxTraceDocuments) + " traces in one file";
            too_many = true;
            return false;
        }
        docs.emplace_back().kind = k;
        return true;
    }

    // Inside model.config: the value joins the config being built.
    bool addToConfig(nlohmann::json value, Role role) {
        if (++doc().config_values > kMaxConfigValues) return true;  // refused after the survey, by name
        auto* parent = building_.back();
        nlohmann::json* added = nullptr;
        if (parent->is_object())
            added = &((*parent)[stack_.back().key] = std::move(value));
        else
            added = &(parent->emplace_back(std::move(value)));
        if (role == Role::Config) building_.push_back(added);
        return true;
    }

    template <typename T>
    bool scalar(Kind k, T&& value) {
        if (stack_.empty()) {
            top = k;
            return newDocument(k);
        }
        auto& parent = stack_.back();
        switch (parent.role) {
            case Role::Batch:
                return newDocument(k);
            case Role::Doc:
                if (parent.key == "schema") doc().has_schema = true, doc().schema_kind = k;
                if (parent.key == "model") doc().has_model = true, doc().model_kind = k;
                if (parent.key == "tokens") doc().has_tokens = true, doc().tokens_kind = k;
                return true;
            case Role::Model:
                if (parent.key == "config") doc().has_config = true, doc().config_kind = k;
                return true;
            case Role::Tokens:
                ++doc().tokens;
                return true;
            case Role::Config:
                return addToConfig(nlohmann::json(std::forward<T>(value)), Role::Other);
            case Role::Other:
                return true;
        }
        return true;
    }

    bool start(Kind k) {
        if (stack_.size() >= static_cast<std::size_t>(kMaxJsonDepth)) {
            error = "values nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
            return false;
        }
        Role role = Role::Other;
        if (stack_.empty()) {
            top = k;
            if (k == Kind::Array && batch_allowed_)
                role = Role::Batch;
            else if (!newDocument(k))
                return false;
            else if (k == Kind::Object)
                role = Role::Doc;
        } else {
            const auto& parent = stack_.back();
            switch (parent.role) {
                case Role::Batch:
                    if (!newDocument(k)) return false;
                    if (k == Kind::Object) role = Role::Doc;
                    break;
                case Role::Doc:
                    if (parent.key == "schema") doc().has_schema = true, doc().schema_kind = k;
                    if (parent.key == "model") {
                        doc().has_model = true, doc().model_kind = k;
                        if (k == Kind::Object) role = Role::Model;
                    }
                    if (parent.key == "tokens") {
                        doc().has_tokens = true, doc().tokens_kind = k;
                        if (k == Kind::Array) role = Role::Tokens;
                    }
                    break;
                case Role::Model:
                    if (parent.key == "config") {
                        doc().has_config = true, doc().config_kind = k;
                        if (k == Kind::Object) {
                            doc().building = nlohmann::json::object();
                            doc().config_values = 0;
                            building_.push_back(&doc().building);
                            role = Role::Config;
                        }
                    }
                    break;
                case Role::Tokens:
                    ++doc().tokens;
                    break;
                case Role::Config:
                    if (doc().config_values < kMaxConfigValues) {
                        addToConfig(k == Kind::Object ? nlohmann::json::object() : nlohmann::json::array(),
                                    Role::Config);
                        role = Role::Config;
                    } else {
                        ++doc().config_values;
                    }
                    break;
                case Role::Other:
                    break;
            }
        }
        stack_.push_back({role, {}, {}});
        return true;
    }

    bool end() {
        if (stack_.back().role == Role::Config) {
            building_.pop_back();
            if (building_.empty()) parseConfig(doc());
        }
        stack_.pop_back();
        return true;
    }

    static void parseConfig(Skeleton& s) {
        s.config.reset();
        s.config_error.clear();
        if (s.config_values > kMaxConfigValues) {
            s.config_error = "more than " + std::to_string(kMaxConfigValues) + " values";
        } else {
            try {
                s.config = ModelConfig::fromJson(s.building.dump());
            } catch (const Error& e) {
                s.config_error = e.what();
            }
        }
        s.building = nlohmann::json();  // its values are not needed once parsed
    }

    bool batch_allowed_;
    std::vector<Level> stack_;
    std::vector<nlohmann::json*> building_;
};

// What the survey found must hold before anything is read: a trace of a known schema whose model's config
// is valid and whose token count fits it. Returns the config. Messages as the fields' own reads give them.
ModelConfig checkSkeleton(const Skeleton& s) {
    if (s.kind != Kind::Object) wrongType("trace", "an object", s.kind);
    if (!s.duplicate.empty()) bad(s.duplicate);
    if (!s.has_schema)
        bad("not a ModScope trace: no 'schema' field (expected \"" + std::string(kTraceSchema) + "\")");
    if (s.schema_kind != Kind::String)
        bad("not a ModScope trace: 'schema' is " + std::string(describe(s.schema_kind)) + ", expected \"" +
            kTraceSchema + "\"");
    if (s.schema != kTraceSchema && s.schema != kTraceSchemaV3 && s.schema != kTraceSchemaV2 &&
        s.schema != kTraceSchemaV1)
        bad("unsupported trace schema \"" + printable(s.schema) + "\": this build of ModScope reads \"" +
            kTraceSchema + "\", \"" + kTraceSchemaV3 + "\", \"" + kTraceSchemaV2 + "\" and \"" + kTraceSchemaV1 + "\"");
    if (!s.has_model) bad("missing 'model'");
    if (s.model_kind != Kind::Object) wrongType("model", "an object", s.model_kind);
    if (!s.has_config) bad("model: missing 'config'");
    if (s.config_kind != Kind::Object) wrongType("model.config", "an object", s.config_kind);
    if (!s.config) bad("model.config: " + s.config_error);
    const ModelConfig cfg = *s.config;
    if (!s.has_tokens) bad("missing 'tokens'");
    if (s.tokens_kind != Kind::Array) wrongType("tokens", "an array", s.tokens_kind);
    if (s.tokens == 0) bad("tokens: empty (a trace has at least one token)");
    const auto max_tokens = static_cast<std::size_t>(std::min(cfg.max_seq_len, kMaxTraceTokens));
    if (s.tokens > max_tokens)
        bad("tokens has more than " + std::to_string(max_tokens) + " tokens (the model's context)");
    return cfg;
}

// ---------------------------------------------------------------------------------------------------------
// Step 2, the read: a frame per object or array being read.

class Frame {
public:
    virtual ~Frame() = default;
    // The next value is a scalar.
    virtual void scalar(Value& v) = 0;
    // The next value is an object or an array: the frame that reads it, or none to skip it unread.
    virtual std::unique_ptr<Frame> open(Kind k) = 0;
    // In an object: the next member's name.
    virtual void key(std::string& k) { (void)k; }
    // Its end: what must hold once all of it has been read.
    virtual void close() {}
};

// An object: each member at most once, at most kMaxMembers of them. Members it does not know are skipped.
class ObjectFrame : public Frame {
public:
    explicit ObjectFrame(std::string where, std::string label = {})
        : where_(std::move(where)), label_(label.empty() ? where_ : std::move(label)) {}

    void key(std::string& k) final {
        if (seen_.size() >= kMaxMembers) bad(label_ + " has more than " + std::to_string(kMaxMembers) + " members");
        if (!seen_.insert(k).second) bad(label_ + ": '" + printable(k) + "' appears twice");
        key_ = std::move(k);
    }
    void scalar(Value& v) final { member(key_, v); }
    std::unique_ptr<Frame> open(Kind k) final {
        if (auto child = container(key_, k)) return child;
        // Not a container this object reads: a known scalar member's read names the type it wanted.
        auto v = Value::of(k);
        member(key_, v);
        return nullptr;
    }
    void close() final { finish(); }

protected:
    virtual void member(const std::string& key, Value& v) = 0;
    virtual std::unique_ptr<Frame> container(const std::string& key, Kind k) {
        (void)key, (void)k;
        return nullptr;
    }
    virtual void finish() {}

    std::string path(const std::string& key) const { return where_.empty() ? key : where_ + "." + key; }
    bool has(const char* key) const { return seen_.count(key) > 0; }
    void require(std::initializer_list<const char*> keys) const {
        for (const char* key : keys)
            if (!has(key)) bad(where_ + (where_.empty() ? "" : ": ") + "missing '" + key + "'");
    }

    std::string where_, label_;

private:
    std::set<std::string> seen_;
    std::string key_;
};

// An array of exactly n scalars, read one by one (at most n are ever stored).
template <typename T>
class ScalarArrayFrame final : public Frame {
public:
    using ReadOne = std::function<T(Value&, const std::string& where, std::size_t i)>;
    ScalarArrayFrame(std::string where, std::size_t n, const char* per, std::vector<T>& out, ReadOne one)
        : where_(std::move(where)), n_(n), per_(per), out_(out), one_(std::move(one)) {
        out_.clear();
        out_.reserve(n_);
    }
    void scalar(Value& v) override {
        if (out_.size() >= n_)
            bad(where_ + " has more than " + std::to_string(n_) + " values, expected " + std::to_string(n_) +
                " (" + per_ + ")");
        const auto i = out_.size();
        out_.push_back(one_(v, at(where_, i), i));
    }
    std::unique_ptr<Frame> open(Kind k) override {
        auto v = Value::of(k);
        scalar(v);  // throws: no element of these arrays is a container
        return nullptr;
    }
    void close() override {
        if (out_.size() != n_)
            bad(where_ + " has " + std::to_string(out_.size()) + " values, expected " + std::to_string(n_) + " (" +
                per_ + ")");
    }

private:
    std::string where_;
    std::size_t n_;
    const char* per_;
    std::vector<T>& out_;
    ReadOne one_;
};

std::unique_ptr<Frame> boolArray(const std::string& where, std::size_t n, const char* per,
                                 std::vector<std::uint8_t>& out) {
    return std::make_unique<ScalarArrayFrame<std::uint8_t>>(
        where, n, per, out,
        [](Value& v, const std::string& w, std::size_t) -> std::uint8_t { return readBool(v, w) ? 1 : 0; });
}

std::unique_ptr<Frame> floatArray(const std::string& where, std::size_t n, float lo, float hi,
                                  std::vector<float>& out) {
    return std::make_unique<ScalarArrayFrame<float>>(
        where, n, "one per token", out,
        [lo, hi](Value& v, const std::string& w, std::size_t) { return readFloat(v, w, lo, hi, "a finite number"); });
}

// An array whose elements are objects, each read by the frame `element` makes for it; at most `max` of them.
class ObjectArrayFrame final : public Frame {
public:
    using Element = std::function<std::unique_ptr<Frame>(std::size_t i, const std::string& where)>;
    ObjectArrayFrame(std::string where, std::size_t max, std::string too_many, Element element,
                     std::function<void(std::size_t count)> done = {})
        : where_(std::move(where)), max_(max), too_many_(std::move(too_many)), element_(std::move(element)),
          done_(std::move(done)) {}
    void scalar(Value& v) override { (void)next(v.kind); }
    std::unique_ptr<Frame> open(Kind k) override { return next(k); }
    void close() override {
        if (done_) done_(count_);
    }

private:
    std::unique_ptr<Frame> next(Kind k) {
        if (count_ >= max_) bad(where_ + " has more than " + std::to_string(max_) + " " + too_many_);
        const std::string w = at(where_, count_);
        if (k != Kind::Object) wrongType(w, "an object", k);
        return element_(count_++, w);
    }
    std::string where_;
    std::size_t max_;
    std::string too_many_;
    Element element_;
    std::function<void(std::size_t)> done_;
    std::size_t count_ = 0;
};

// What the frames of one document share: the document being filled, what bounds it, and the values whose
// checks wait for members that may come later in the text.
struct DocumentContext {
    TraceDocument doc;
    ModelConfig cfg;
    std::size_t T = 0;                       // tokens, from the survey
    std::vector<std::int64_t> byte_begin, byte_end;  // per token, checked against the prompt at the end
    bool truncated = false;                  // the document says how long the prompt was before truncation
    std::int64_t original_bytes = 0;         // truncated.original_bytes, checked against the prompt at the end
    bool capacity_read = false;              // when it was: each layer's k is checked as the layer ends
    double generation_ms = 0.0, tokens_per_second = 0.0;
    int layers_with_values = 0;              // routed layers with decision values: none or all of them
};

// A layer's k is what the capacity gives for the prompt's length (every token for a full layer).
void checkK(const LayerTrace& l, const std::string& where, const DocumentContext& c) {
    const int T = static_cast<int>(c.T);
    const bool own = l.capacity >= 0;  // the layer gave its own (until checkRelations fills in the run's)
    const double capacity = layerCapacity(c.doc.run, l);
    const int expected_k = l.routed ? capacityToK(capacity, T) : T;
    if (l.k != expected_k)
        bad(where + ".k: " + std::to_string(l.k) + ", but " +
            (l.routed ? std::string(own ? "the layer's " : "") + "capacity " + show(capacity) + " of " +
                            std::to_string(T) + " tokens gives "
                      : std::string("a full layer has k = T = ")) +
            std::to_string(expected_k));
}

class TokenFrame final : public ObjectFrame {
public:
    TokenFrame(DocumentContext& c, std::size_t i, std::string where) : ObjectFrame(std::move(where)), c_(c), i_(i) {}

private:
    void member(const std::string& key, Value& v) override {
        const auto w = path(key);
        const auto lowest = std::numeric_limits<std::int64_t>::min(), any = std::numeric_limits<std::int64_t>::max();
        if (key == "position")
            readInt(v, w, static_cast<std::int64_t>(i_), static_cast<std::int64_t>(i_));
        else if (key == "id")
            t_.id = static_cast<int>(readInt(v, w, 0, c_.cfg.vocab_size - 1));
        else if (key == "piece")
            t_.piece = readString(v, w);
        else if (key == "byte_begin")
            begin_ = readInt(v, w, lowest, any);
        else if (key == "byte_end")
            end_ = readInt(v, w, lowest, any);
    }
    void finish() override {
        require({"id", "piece", "byte_begin", "byte_end"});
        c_.byte_begin.push_back(begin_);
        c_.byte_end.push_back(end_);
        c_.doc.tokens.push_back(std::move(t_));
    }
    DocumentContext& c_;
    std::size_t i_;
    Token t_;
    std::int64_t begin_ = 0, end_ = 0;
};

class TruncatedFrame final : public ObjectFrame {
public:
    explicit TruncatedFrame(DocumentContext& c) : ObjectFrame("truncated"), c_(c) {}

private:
    void member(const std::string& key, Value& v) override {
        if (key == "original_tokens")
            c_.doc.original_tokens =
                static_cast<std::size_t>(readInt(v, path(key), static_cast<std::int64_t>(c_.T), kMaxBytes));
        else if (key == "original_bytes")
            c_.original_bytes = readInt(v, path(key), std::numeric_limits<std::int64_t>::min(),
                                        std::numeric_limits<std::int64_t>::max());
    }
    void finish() override {
        require({"original_tokens", "original_bytes"});
        c_.truncated = true;
    }
    DocumentContext& c_;
};

// What a document of this schema may hold: mixture members (from the third version on), interventions (the
// fourth's).
bool hasMixtures(const std::string& schema) { return schema == kTraceSchema || schema == kTraceSchemaV3; }
bool hasInterventions(const std::string& schema) { return schema == kTraceSchema; }

// A layer's mixture members (the third version's), in the order written.
bool mixtureMember(const std::string& key) {
    static const std::set<std::string> keys{"moe",           "n_experts",     "noop_experts",   "expert_capacity",
                                            "expert_load",   "expert_overflow", "expert",       "expert_choice",
                                            "expert_prob",   "expert_runner_up", "expert_runner_up_prob"};
    return keys.count(key) > 0;
}

class LayerFrame final : public ObjectFrame {
public:
    LayerFrame(DocumentContext& c, std::size_t li, std::string where)
        : ObjectFrame(std::move(where)),
          c_(c),
          li_(li),
          routed_(c.cfg.isRouted(static_cast<int>(li))),
          moe_(c.cfg.isMoe(static_cast<int>(li)) && hasMixtures(c.doc.schema)) {}

private:
    static bool routedOnly(const std::string& key) {
        return key == "topk_threshold" || key == "router_logits" || key == "rank" || key == "topk_selected" ||
               key == "predictor_prob" || key == "predictor_selected" || key == "capacity" || key == "gate";
    }
    // A full layer has none of the routed layers' members (null or absent).
    void refuseOnFullLayer(const std::string& key, Kind k) const {
        if (!routed_ && routedOnly(key) && k != Kind::Null)
            bad(path(key) + ": a full layer has none (expected null)");
    }

    // Members the second version added: a first-version document does not have them, and they are ignored
    // there as any unknown member is (its layers run at the document's capacity).
    // The same for the third version's mixture members in the first two.
    // The same for the fourth version's decision values in the first three.
    bool laterMember(const std::string& key) const {
        if (!hasMixtures(c_.doc.schema) && mixtureMember(key)) return true;
        if (!hasInterventions(c_.doc.schema) && (key == "decision_value" || key == "decision_value_top_selected"))
            return true;
        return c_.doc.schema == kTraceSchemaV1 && (key == "capacity" || key == "gate" || key == "update_ratio");
    }
    // A layer without a mixture has none of its members but "moe" (null or absent).
    void refuseWithoutMixture(const std::string& key, Kind k) const {
        if (!moe_ && mixtureMember(key) && key != "moe" && k != Kind::Null)
            bad(path(key) + ": a layer without a mixture has none (expected null)");
    }

    void member(const std::string& key, Value& v) override {
        if (laterMember(key)) return;
        refuseOnFullLayer(key, v.kind);
        refuseWithoutMixture(key, v.kind);
        if (!routed_ && routedOnly(key)) return;  // null
        const auto w = path(key);
        const auto T = static_cast<std::int64_t>(c_.T);
        if (key == "decision_value" || key == "decision_value_top_selected") {
            if (v.kind == Kind::Null) return;
            if (!routed_) bad(w + ": a full layer has none (expected null)");
            if (key == "decision_value") wrongType(w, "an array", v.kind);
            top_selected_ = static_cast<int>(readInt(v, w, 0, T));
            return;
        }
        if (key == "moe") {
            const bool moe = readBool(v, w);
            if (moe != c_.cfg.isMoe(static_cast<int>(li_)))
                bad(w + ": " + (moe ? "true" : "false") + ", but the config's moe_layers say " + (moe ? "false" : "true"));
            return;
        }
        if (mixtureMember(key)) {
            if (!moe_) return;  // null
            const auto E = static_cast<std::int64_t>(c_.cfg.n_experts);
            if (key == "n_experts")
                l_.n_experts = static_cast<int>(readInt(v, w, E, E));
            else if (key == "noop_experts")
                l_.noop_experts = static_cast<int>(readInt(v, w, c_.cfg.noop_experts, c_.cfg.noop_experts));
            else if (key == "expert_capacity")
                l_.expert_capacity = static_cast<int>(readInt(v, w, 0, T));
            else if (key == "expert_overflow")
                l_.expert_overflow = static_cast<int>(readInt(v, w, 0, T));
            else
                wrongType(w, "an array", v.kind);
            return;
        }
        if (key == "index") {
            l_.index = static_cast<int>(
                readInt(v, w, static_cast<std::int64_t>(li_), static_cast<std::int64_t>(li_)));
        } else if (key == "routed") {
            l_.routed = readBool(v, w);
            if (l_.routed != routed_)
                bad(w + ": " + (l_.routed ? "true" : "false") + ", but the config's routed_layers say " +
                    (l_.routed ? "false" : "true"));
        } else if (key == "k") {
            l_.k = static_cast<int>(readInt(v, w, 1, T));
        } else if (key == "processed") {
            l_.processed = static_cast<int>(readInt(v, w, 0, T));
        } else if (key == "topk_threshold" && routed_) {
            l_.topk_threshold = readFloat(v, w);
        } else if (key == "capacity" && routed_) {
            l_.capacity = readDouble(v, w, 0.0, 1.0);
        } else if (key == "update_ratio" && v.kind == Kind::Null) {
            // a trace that had none
        } else if (key == "update_ratio" || routedOnly(key) || key == "selected") {
            wrongType(w, "an array", v.kind);
        }
    }

    // T integers in [lo, hi].
    std::unique_ptr<Frame> intArray(const std::string& w, std::size_t n, const char* per, std::int64_t lo,
                                    std::int64_t hi, std::vector<int>& out) {
        return std::make_unique<ScalarArrayFrame<int>>(w, n, per, out, [lo, hi](Value& v, const std::string& ww, std::size_t) {
            return static_cast<int>(readInt(v, ww, lo, hi));
        });
    }
    // T probabilities, null where the token never reached the mixture (kept as NaN).
    std::unique_ptr<Frame> probabilitiesOrNull(const std::string& w, std::vector<float>& out) {
        return std::make_unique<ScalarArrayFrame<float>>(w, c_.T, "one per token", out,
                                                         [](Value& v, const std::string& ww, std::size_t) {
                                                             if (v.kind == Kind::Null)
                                                                 return std::numeric_limits<float>::quiet_NaN();
                                                             return readFloat(v, ww, 0.0f, 1.0f);
                                                         });
    }

    std::unique_ptr<Frame> container(const std::string& key, Kind k) override {
        if (laterMember(key)) return nullptr;
        refuseOnFullLayer(key, k);
        refuseWithoutMixture(key, k);
        if (k != Kind::Array) return nullptr;
        const auto w = path(key);
        const auto T = c_.T;
        if (moe_ && mixtureMember(key)) {
            const std::int64_t E = c_.cfg.n_experts, choices = c_.cfg.routerChoices();
            if (key == "expert_load") return intArray(w, static_cast<std::size_t>(E), "one per expert", 0, static_cast<std::int64_t>(T), load_);
            if (key == "expert") return intArray(w, T, "one per token", -1, E - 1, l_.expert);
            if (key == "expert_choice") return intArray(w, T, "one per token", -1, choices - 1, l_.expert_choice);
            if (key == "expert_runner_up") return intArray(w, T, "one per token", -1, choices - 1, l_.expert_runner_up);
            if (key == "expert_prob") return probabilitiesOrNull(w, l_.expert_prob);
            if (key == "expert_runner_up_prob") return probabilitiesOrNull(w, l_.expert_runner_up_prob);
            return nullptr;
        }
        if (key == "selected") return boolArray(w, T, "one per token", l_.selected);
        if (key == "decision_value") {
            if (!routed_) bad(w + ": a full layer has none (expected null)");
            return floatArray(w, T, -std::numeric_limits<float>::max(), std::numeric_limits<float>::max(),
                              l_.decision_value);
        }
        if (key == "update_ratio")
            return floatArray(w, T, 0.0f, std::numeric_limits<float>::max(), l_.update_ratio);
        if (!routed_) return nullptr;
        if (key == "gate") return floatArray(w, T, 0.0f, 1.0f, gate_);  // sigmoid(router_logits): not kept
        if (key == "router_logits")
            return floatArray(w, T, -std::numeric_limits<float>::max(), std::numeric_limits<float>::max(),
                              l_.router_logits);
        if (key == "predictor_prob") return floatArray(w, T, 0.0f, 1.0f, l_.predictor_prob);
        if (key == "topk_selected") return boolArray(w, T, "one per token", l_.topk_selected);
        if (key == "predictor_selected") return boolArray(w, T, "one per token", l_.predictor_selected);
        if (key == "rank") {
            rank_seen_.assign(T, 0);
            return std::make_unique<ScalarArrayFrame<int>>(
                w, T, "one per token", l_.rank, [this, T](Value& v, const std::string& ww, std::size_t) {
                    const int r = static_cast<int>(readInt(v, ww, 0, static_cast<std::int64_t>(T) - 1));
                    if (rank_seen_[static_cast<std::size_t>(r)]++) bad(ww + ": rank " + std::to_string(r) + " appears twice");
                    return r;
                });
        }
        return nullptr;
    }

    void finish() override {
        require({"index", "routed", "k", "processed", "selected"});
        l_.index = static_cast<int>(li_);
        const auto count = [](const std::vector<std::uint8_t>& v) {
            return static_cast<int>(std::count(v.begin(), v.end(), 1));
        };
        if (c_.capacity_read) checkK(l_, where_, c_);
        if (count(l_.selected) != l_.processed)
            bad(where_ + ".processed: " + std::to_string(l_.processed) + ", but " +
                std::to_string(count(l_.selected)) + " tokens are selected");
        if (!l_.routed) {
            if (l_.processed != static_cast<int>(c_.T)) bad(where_ + ".processed: a full layer processes every token");
            l_.topk_selected = l_.selected;
        } else {
            require({"topk_threshold", "router_logits", "rank", "topk_selected", "predictor_prob",
                     "predictor_selected"});
            if (count(l_.topk_selected) != l_.k)
                bad(where_ + ".topk_selected: " + std::to_string(count(l_.topk_selected)) +
                    " tokens in the top k, expected k = " + std::to_string(l_.k));
        }
        if (moe_) finishMixture();
        if (!l_.decision_value.empty() || top_selected_ >= 0) {
            if (l_.decision_value.empty() || top_selected_ < 0)
                bad(where_ + ": decision_value and decision_value_top_selected come together");
            if (valuableSelected(l_) != top_selected_)
                bad(where_ + ".decision_value_top_selected: " + std::to_string(top_selected_) + ", but the values give " +
                    std::to_string(valuableSelected(l_)));
            ++c_.layers_with_values;
        }
        c_.doc.run.layers.push_back(std::move(l_));
    }

    // A mixture's arrays must tell one story (docs/MODEL.md "Mixture layers"): the tokens that reached it are
    // the ones the layer processed, a token that ran went to its top choice, probabilities exist exactly where
    // a choice does; the load, overflow and capacity are what the arrays give.
    void finishMixture() {
        require({"moe", "n_experts", "noop_experts", "expert_capacity", "expert_load", "expert_overflow", "expert",
                 "expert_choice", "expert_prob", "expert_runner_up", "expert_runner_up_prob"});
        l_.moe = true;
        const int E = c_.cfg.n_experts;
        for (std::size_t t = 0; t < c_.T; ++t) {
            const auto at_t = where_ + "[token " + std::to_string(t) + "]";
            const int choice = l_.expert_choice[t], expert = l_.expert[t], second = l_.expert_runner_up[t];
            if ((choice >= 0) != bool(l_.selected[t]))
                bad(at_t + ": expert_choice " + std::to_string(choice) + ", but the token was " +
                    (l_.selected[t] ? "processed" : "not processed") + " by the layer");
            if (std::isnan(l_.expert_prob[t]) != (choice < 0))
                bad(at_t + ": expert_prob must be null exactly where expert_choice is -1");
            if (std::isnan(l_.expert_runner_up_prob[t]) != (second < 0))
                bad(at_t + ": expert_runner_up_prob must be null exactly where expert_runner_up is -1");
            if (second >= 0 && (second == choice || choice < 0))
                bad(at_t + ": expert_runner_up " + std::to_string(second) + " beside expert_choice " + std::to_string(choice));
            if (expert >= 0 && expert != choice)
                bad(at_t + ": expert " + std::to_string(expert) + ", but the router chose " + std::to_string(choice));
        }
        auto counts = countMixture(l_);  // l_.n_experts was read and checked against the config
        if (counts.load != load_) bad(where_ + ".expert_load does not count the tokens of expert");
        if (counts.overflow != l_.expert_overflow)
            bad(where_ + ".expert_overflow: " + std::to_string(l_.expert_overflow) + ", but " +
                std::to_string(counts.overflow) + " tokens chose an expert that did not run them");
        const int capacity = expertCapacity(c_.cfg.expert_capacity_factor, E, counts.reached);
        if (l_.expert_capacity != capacity)
            bad(where_ + ".expert_capacity: " + std::to_string(l_.expert_capacity) + ", but the capacity factor gives " +
                std::to_string(capacity) + " for " + std::to_string(counts.reached) + " tokens");
        for (int e = 0; e < E; ++e)
            if (counts.load[e] > capacity) bad(where_ + ".expert_load: expert " + std::to_string(e) + " is over its capacity");
        l_.expert_load = std::move(counts.load);
    }

    DocumentContext& c_;
    std::size_t li_;
    bool routed_;  // what the config says; the layer's own "routed" must agree
    bool moe_;     // a mixture layer of a document of this version (earlier ones have no mixture members)
    std::vector<int> load_;
    LayerTrace l_;
    std::vector<std::uint8_t> rank_seen_;
    std::vector<float> gate_;
    int top_selected_ = -1;  // decision_value_top_selected, checked against the values
};

// One forced decision of the run (RunTrace::overrides): a routed layer of the config, a position of the prompt.
class OverrideFrame final : public ObjectFrame {
public:
    OverrideFrame(DocumentContext& c, std::string where) : ObjectFrame(std::move(where)), c_(c) {}

private:
    void member(const std::string& key, Value& v) override {
        const auto w = path(key);
        if (key == "layer") {
            o_.layer = static_cast<int>(readInt(v, w, 0, c_.cfg.n_layers - 1));
            if (!c_.cfg.isRouted(o_.layer)) bad(w + ": layer " + std::to_string(o_.layer) + " is not a routed layer");
        } else if (key == "position") {
            o_.position = v.kind == Kind::Null ? RoutingOverride::kAllPositions
                                               : static_cast<int>(readInt(v, w, 0, static_cast<std::int64_t>(c_.T) - 1));
        } else if (key == "process") {
            o_.process = readBool(v, w);
        }
    }
    void finish() override {
        require({"layer", "position", "process"});
        c_.doc.run.overrides.push_back(o_);
    }
    DocumentContext& c_;
    RoutingOverride o_;
};

// Of the stats only the FLOPs are data; the rest is derived from the layers and recomputed.
class StatsFrame final : public ObjectFrame {
public:
    explicit StatsFrame(DocumentContext& c) : ObjectFrame("stats"), c_(c) {}

private:
    void member(const std::string& key, Value& v) override {
        if (key == "flops") c_.doc.run.flops = readDouble(v, path(key), 0, 1e30);
        if (key == "dense_flops") c_.doc.run.dense_flops = readDouble(v, path(key), 0, 1e30);
    }
    void finish() override { require({"flops", "dense_flops"}); }
    DocumentContext& c_;
};

class TimingFrame final : public ObjectFrame {
public:
    explicit TimingFrame(DocumentContext& c) : ObjectFrame("timing"), c_(c) {}

private:
    void member(const std::string& key, Value& v) override {
        if (key == "run_ms") c_.doc.run.elapsed_ms = readDouble(v, path(key), 0, 1e15);
        if (v.kind == Kind::Null) return;  // generation_ms and tokens_per_second: null without a generation
        if (key == "generation_ms") c_.generation_ms = readDouble(v, path(key), 0, 1e15);
        if (key == "tokens_per_second") c_.tokens_per_second = readDouble(v, path(key), 0, 1e15);
    }
    DocumentContext& c_;
};

class StepFrame final : public ObjectFrame {
public:
    StepFrame(DocumentContext& c, TraceGeneration& g, std::size_t i, std::string where)
        : ObjectFrame(std::move(where)), c_(c), g_(g), i_(i) {}

private:
    void member(const std::string& key, Value& v) override {
        const auto w = path(key);
        if (key == "index") {
            s_.index = static_cast<int>(readInt(v, w, static_cast<std::int64_t>(i_), static_cast<std::int64_t>(i_)));
        } else if (key == "position") {
            const auto p = static_cast<std::int64_t>(c_.T + i_);
            s_.position = static_cast<int>(readInt(v, w, p, p));
        } else if (key == "token_id") {
            s_.token_id = static_cast<int>(readInt(v, w, 0, c_.cfg.vocab_size - 1));
        } else if (key == "piece") {
            piece_ = readString(v, w);
        } else if (key == "kv_cache_bytes") {
            s_.kv_cache_bytes = readInt(v, w, 0, kMaxBytes);
        } else if (key == "dense_kv_cache_bytes") {
            s_.dense_kv_cache_bytes = readInt(v, w, 0, kMaxBytes);
        } else if (key == "step_ms") {
            s_.step_ms = readDouble(v, w, 0, 1e15);
        } else if (key == "processed" || key == "predictor_prob" || (key == "expert" && mixtures())) {
            wrongType(w, "an array", v.kind);
        }
    }
    std::unique_ptr<Frame> container(const std::string& key, Kind k) override {
        if (k != Kind::Array) return nullptr;
        const auto L = static_cast<std::size_t>(c_.cfg.n_layers);
        if (key == "processed") return boolArray(path(key), L, "one per layer", s_.processed);
        if (key == "expert" && mixtures())
            return std::make_unique<ScalarArrayFrame<int>>(
                path(key), L, "one per layer", s_.expert, [this](Value& v, const std::string& w, std::size_t li) {
                    if (!c_.cfg.isMoe(static_cast<int>(li))) {
                        if (v.kind != Kind::Null) wrongType(w, "null (a layer without a mixture)", v.kind);
                        return -1;
                    }
                    return static_cast<int>(readInt(v, w, -1, c_.cfg.n_experts - 1));
                });
        if (key == "predictor_prob")
            return std::make_unique<ScalarArrayFrame<float>>(
                path(key), L, "one per layer", s_.predictor_prob, [this](Value& v, const std::string& w, std::size_t li) {
                    if (!c_.cfg.isRouted(static_cast<int>(li))) {
                        if (v.kind != Kind::Null) wrongType(w, "null (a full layer)", v.kind);
                        return std::numeric_limits<float>::quiet_NaN();
                    }
                    return readFloat(v, w, 0.0f, 1.0f);
                });
        return nullptr;
    }
    void finish() override {
        require({"index", "position", "token_id", "piece", "processed", "predictor_prob", "kv_cache_bytes",
                 "dense_kv_cache_bytes"});
        if (mixtures()) require({"expert"});
        s_.expert.resize(static_cast<std::size_t>(c_.cfg.n_layers), -1);
        g_.result.generated_ids.push_back(s_.token_id);
        g_.result.steps.push_back(std::move(s_));
        g_.pieces.push_back(std::move(piece_));
    }
    bool mixtures() const { return hasMixtures(c_.doc.schema); }
    DocumentContext& c_;
    TraceGeneration& g_;
    std::size_t i_;
    GenerationStep s_;
    std::string piece_;
};

class GenerationFrame final : public ObjectFrame {
public:
    explicit GenerationFrame(DocumentContext& c) : ObjectFrame("generation"), c_(c), g_(c.doc.generation.emplace()) {}

private:
    void member(const std::string& key, Value& v) override {
        const auto w = path(key);
        auto& res = g_.result;
        if (key == "mode") {
            if (readString(v, w) != "causal") bad(w + ": generation is always causal");
        } else if (key == "max_new_tokens") {
            g_.max_new_tokens = static_cast<int>(readInt(v, w, 0, std::numeric_limits<int>::max()));
        } else if (key == "temperature") {
            g_.temperature = readFloat(v, w, 0.0f, 1e6f);
        } else if (key == "top_p") {
            g_.top_p = readFloat(v, w, 0.0f, 1.0f);
        } else if (key == "seed") {
            g_.seed = readUnsigned(v, w);
        } else if (key == "eos_id") {
            g_.eos_id = static_cast<int>(readInt(v, w, -1, c_.cfg.vocab_size - 1));
        } else if (key == "cancelled") {
            res.cancelled = readBool(v, w);
        } else if (key == "text") {
            g_.text = readString(v, w);
        } else if (key == "kv_cache_bytes") {
            res.kv_cache_bytes = readInt(v, w, 0, kMaxBytes);
        } else if (key == "dense_kv_cache_bytes") {
            res.dense_kv_cache_bytes = readInt(v, w, 0, kMaxBytes);
        } else if (key == "steps") {
            wrongType(w, "an array", v.kind);
        }
    }
    std::unique_ptr<Frame> container(const std::string& key, Kind k) override {
        if (key != "steps" || k != Kind::Array) return nullptr;
        const auto max_steps = static_cast<std::size_t>(c_.cfg.max_seq_len) - c_.T;
        return std::make_unique<ObjectArrayFrame>(
            path(key), max_steps, "steps (the context left after the prompt)",
            [this](std::size_t i, const std::string& w) { return std::make_unique<StepFrame>(c_, g_, i, w); });
    }
    void finish() override {
        require({"max_new_tokens", "temperature", "top_p", "seed", "eos_id", "kv_cache_bytes",
                 "dense_kv_cache_bytes", "steps"});
    }
    DocumentContext& c_;
    TraceGeneration& g_;
};

class ModelFrame final : public ObjectFrame {
public:
    explicit ModelFrame(DocumentContext& c) : ObjectFrame("model"), c_(c) {}

private:
    void member(const std::string& key, Value& v) override {
        auto& m = c_.doc.model;
        const auto w = path(key);
        if (key == "name") {
            m.name = readString(v, w);
        } else if (key == "weights_sha256") {
            m.weights_sha256 = readString(v, w);
            const auto& h = m.weights_sha256;
            const bool hex = std::all_of(h.begin(), h.end(),
                                         [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
            if (!(h.empty() || (h.size() == 64 && hex)))
                bad(w + ": \"" + printable(h) + "\" is not a SHA-256 (64 lowercase hex digits)");
        } else if (key == "directory") {
            m.directory = readString(v, w);
        }
        // "config" was read by the survey (checkSkeleton).
    }
    void finish() override { require({"name", "config"}); }
    DocumentContext& c_;
};

// Checks between members that may come in any order, on the finished document; then the fields derived
// from others.
void checkRelations(DocumentContext& c) {
    auto& doc = c.doc;
    auto& run = doc.run;
    const auto P = static_cast<std::int64_t>(doc.prompt.size());
    for (std::size_t i = 0; i < doc.tokens.size(); ++i) {
        const std::string w = at("tokens", i);
        checkRange(w + ".byte_begin", c.byte_begin[i], 0, P);
        checkRange(w + ".byte_end", c.byte_end[i], c.byte_begin[i], P);
        doc.tokens[i].byte_begin = static_cast<std::size_t>(c.byte_begin[i]);
        doc.tokens[i].byte_end = static_cast<std::size_t>(c.byte_end[i]);
        run.token_ids.push_back(doc.tokens[i].id);
    }
    for (std::size_t li = 0; li < run.layers.size(); ++li) {
        auto& l = run.layers[li];
        checkK(l, at("layers", li), c);
        if (l.routed) l.capacity = layerCapacity(run, l);  // the run's where it gave none
    }
    const auto routed = static_cast<int>(c.cfg.routed_layers.size());
    if (c.layers_with_values != 0 && c.layers_with_values != routed)
        bad("layers: decision values in " + std::to_string(c.layers_with_values) + " of the " + std::to_string(routed) +
            " routed layers (a run has them in all or none)");
    run.decision_values = c.layers_with_values > 0;
    if (run.decision_values && run.token_loss.empty()) bad("decision values without token_loss");
    if (c.truncated) {
        checkRange("truncated.original_bytes", c.original_bytes, P, kMaxBytes);
        doc.original_bytes = static_cast<std::size_t>(c.original_bytes);
    } else {
        doc.original_tokens = c.T;
        doc.original_bytes = doc.prompt.size();
    }
    if (doc.generation) {
        doc.generation->result.prompt_ids = run.token_ids;
        doc.generation->result.tokens_per_second = c.tokens_per_second;
        doc.generation->elapsed_ms = c.generation_ms;
    }
}

// One trace document: the top-level object.
class DocumentFrame final : public ObjectFrame {
public:
    DocumentFrame(const Skeleton& s, std::vector<TraceDocument>& out) : ObjectFrame("", "trace"), out_(out) {
        c_.cfg = checkSkeleton(s);
        c_.T = s.tokens;
        c_.doc.model.config = c_.cfg;
        c_.doc.schema = s.schema;  // the version read: what it may hold (checkSkeleton knows it)
    }

private:
    void member(const std::string& key, Value& v) override {
        auto& doc = c_.doc;
        if (key == "mode") {
            const auto mode = readString(v, key);
            if (mode != "topk" && mode != "causal") bad(key + ": \"" + printable(mode) + "\" is not topk or causal");
            doc.run.mode = routingModeFromString(mode);
        } else if (key == "capacity") {
            doc.run.capacity = readDouble(v, key, 0.0, 1.0);
            c_.capacity_read = true;
        } else if (key == "device") {
            doc.run.device = readString(v, key);
        } else if (key == "backend") {
            doc.run.backend = readString(v, key);
        } else if (key == "prompt") {
            doc.prompt = readString(v, key);
        } else if (hasInterventions(doc.schema) && key == "keep_capacity") {
            doc.run.keep_capacity = readBool(v, key);
        } else if (hasInterventions(doc.schema) && (key == "token_loss" || key == "overrides") && v.kind != Kind::Null) {
            wrongType(key, "an array", v.kind);
        } else if (v.kind == Kind::Null && (key == "prompt_index" || key == "prompt_id" || key == "truncated" ||
                                            key == "timing" || key == "generation")) {
            // optional: null is absent
        } else if (key == "prompt_index") {
            doc.prompt_index = static_cast<int>(readInt(v, key, 0, kMaxTraceDocuments - 1));
        } else if (key == "prompt_id" && v.kind == Kind::Number && doc.schema != kTraceSchemaV1) {
            doc.prompt_id = std::to_string(readInt(v, key, std::numeric_limits<std::int64_t>::min(),
                                                   std::numeric_limits<std::int64_t>::max()));
            doc.prompt_id_integer = true;
        } else if (key == "prompt_id") {
            doc.prompt_id = readString(v, key);
        } else if (key == "model" || key == "truncated" || key == "stats" || key == "timing" ||
                   key == "generation") {
            wrongType(key, "an object", v.kind);
        } else if (key == "tokens" || key == "layers") {
            wrongType(key, "an array", v.kind);
        }
    }

    std::unique_ptr<Frame> container(const std::string& key, Kind k) override {
        const bool object = k == Kind::Object, array = k == Kind::Array;
        if (key == "model" && object) return std::make_unique<ModelFrame>(c_);
        if (key == "truncated" && object) return std::make_unique<TruncatedFrame>(c_);
        if (key == "stats" && object) return std::make_unique<StatsFrame>(c_);
        if (key == "timing" && object) return std::make_unique<TimingFrame>(c_);
        if (key == "generation" && object) return std::make_unique<GenerationFrame>(c_);
        if (key == "token_loss" && array && hasInterventions(c_.doc.schema))  // T values, the last null
            return std::make_unique<ScalarArrayFrame<float>>(
                "token_loss", c_.T, "one per token", c_.doc.run.token_loss,
                [this](Value& v, const std::string& w, std::size_t t) {
                    if (t + 1 == c_.T) {
                        if (v.kind != Kind::Null) wrongType(w, "null (the last position has no next token)", v.kind);
                        return std::numeric_limits<float>::quiet_NaN();
                    }
                    return readFloat(v, w, 0.0f, std::numeric_limits<float>::max(), "a finite number");
                });
        if (key == "overrides" && array && hasInterventions(c_.doc.schema))
            return std::make_unique<ObjectArrayFrame>(
                "overrides", static_cast<std::size_t>(kMaxTraceTokens) * 4, "overrides",
                [this](std::size_t, const std::string& w) { return std::make_unique<OverrideFrame>(c_, w); });
        if (key == "tokens" && array)
            return std::make_unique<ObjectArrayFrame>(
                "tokens", c_.T, "tokens (the model's context)",
                [this](std::size_t i, const std::string& w) { return std::make_unique<TokenFrame>(c_, i, w); });
        if (key == "layers" && array) {
            const auto n_layers = static_cast<std::size_t>(c_.cfg.n_layers);
            return std::make_unique<ObjectArrayFrame>(
                "layers", n_layers, "layers (the config's n_layers)",
                [this](std::size_t li, const std::string& w) { return std::make_unique<LayerFrame>(c_, li, w); },
                [n_layers](std::size_t count) {
                    if (count != n_layers)
                        bad("layers: " + std::to_string(count) + " layers, but the config has n_layers " +
                            std::to_string(n_layers));
                });
        }
        return nullptr;
    }

    void finish() override {
        require({"model", "mode", "capacity", "prompt", "tokens", "layers", "stats"});
        checkRelations(c_);
        out_.push_back(std::move(c_.doc));
    }

    DocumentContext c_;
    std::vector<TraceDocument>& out_;
};

// The text's outermost value: one document, or with `batch` an array of them.
class RootFrame final : public Frame {
public:
    RootFrame(std::vector<Skeleton>& skeletons, std::vector<TraceDocument>& out, std::size_t& current, bool batch)
        : skeletons_(skeletons), out_(out), current_(current), batch_(batch) {}
    void scalar(Value& v) override { wrongType("trace", "an object", v.kind); }
    std::unique_ptr<Frame> open(Kind k) override {
        if (k == Kind::Object) return document();
        if (!batch_) wrongType("trace", "an object", k);
        return std::make_unique<BatchFrame>(*this);  // the batch's array: its elements are documents
    }

private:
    class BatchFrame final : public Frame {
    public:
        explicit BatchFrame(RootFrame& root) : root_(root) {}
        void scalar(Value& v) override {
            root_.current_ = next_++;
            wrongType("trace", "an object", v.kind);
        }
        std::unique_ptr<Frame> open(Kind k) override {
            root_.current_ = next_++;
            if (k != Kind::Object) wrongType("trace", "an object", k);
            return root_.document();
        }

    private:
        RootFrame& root_;
        std::size_t next_ = 0;
    };

    std::unique_ptr<Frame> document() {
        return std::make_unique<DocumentFrame>(skeletons_.at(out_.size()), out_);
    }

    std::vector<Skeleton>& skeletons_;
    std::vector<TraceDocument>& out_;
    std::size_t& current_;
    bool batch_;
};

// The read's SAX handler: hands each event to the innermost frame; skips what no frame reads.
class Read final : public nlohmann::json_sax<nlohmann::json> {
public:
    explicit Read(std::unique_ptr<Frame> root) { stack_.push_back(std::move(root)); }

    bool null() override { return scalar(Value::of(Kind::Null)); }
    bool boolean(bool b) override { return scalar(Value::of(b ? Kind::True : Kind::False)); }
    bool number_integer(number_integer_t x) override {
        auto v = Value::of(Kind::Number);
        v.number = Value::Number::Signed, v.i = x;
        return scalar(std::move(v));
    }
    bool number_unsigned(number_unsigned_t x) override {
        auto v = Value::of(Kind::Number);
        v.number = Value::Number::Unsigned, v.u = x;
        return scalar(std::move(v));
    }
    bool number_float(number_float_t x, const string_t& text) override {
        if (skip_ > 0) return true;
        auto v = Value::of(Kind::Number);
        v.number = Value::Number::Real, v.d = x, v.text = text;
        // nlohmann (before 3.11.3) hands over the text with the C locale's decimal separator, which a
        // program that called setlocale (any Qt application) may have made a comma: the text is JSON's.
        for (auto& c : v.text)
            if (!((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e' || c == 'E')) c = '.';
        return scalar(std::move(v));
    }
    bool string(string_t& s) override {
        if (skip_ > 0) return true;
        auto v = Value::of(Kind::String);
        v.text = std::move(s);
        return scalar(std::move(v));
    }
    bool binary(binary_t&) override { return scalar(Value::of(Kind::String)); }
    bool start_object(std::size_t) override { return start(Kind::Object); }
    bool start_array(std::size_t) override { return start(Kind::Array); }
    bool key(string_t& k) override {
        if (skip_ == 0) stack_.back()->key(k);
        return true;
    }
    bool end_object() override { return end(); }
    bool end_array() override { return end(); }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
        bad("not valid JSON");  // the survey accepted this text: not reached
    }

private:
    bool scalar(Value v) {
        if (skip_ == 0) stack_.back()->scalar(v);
        return true;
    }
    bool start(Kind k) {
        if (skip_ > 0) {
            ++skip_;
            return true;
        }
        auto child = stack_.back()->open(k);
        if (child)
            stack_.push_back(std::move(child));
        else
            skip_ = 1;
        return true;
    }
    bool end() {
        if (skip_ > 0) {
            --skip_;
            return true;
        }
        stack_.back()->close();
        stack_.pop_back();
        return true;
    }

    std::vector<std::unique_ptr<Frame>> stack_;
    int skip_ = 0;  // > 0: inside a value no frame reads, this many levels deep
};

// A refusal as the public readers word it: "invalid trace: ..." unless the text is no trace of this
// schema at all.
std::string refusal(const std::string& message) {
    if (message.rfind("unsupported trace schema", 0) == 0 || message.rfind("not a ModScope trace", 0) == 0)
        return message;
    return invalid(message);
}

void checkSize(std::size_t size) {
    if (size > kMaxTraceFileBytes)
        throw Error(invalid(std::to_string(size) + " bytes, more than the " + std::to_string(kMaxTraceFileBytes) +
                            " a trace may have"));
}

// The documents of `text`: one, or with `batch` the elements of a top-level array. `one_of_many`: text that
// is one line of a JSON Lines file, where an array is no batch to point to.
std::vector<TraceDocument> readDocuments(std::string_view text, bool batch, bool one_of_many = false) {
    Survey survey(batch);
    bool ok = false;
    try {
        ok = nlohmann::json::sax_parse(text.begin(), text.end(), &survey, nlohmann::json::input_format_t::json,
                                       /*strict=*/true);
    } catch (const std::exception& e) {
        survey.error = printable(e.what(), 300);
    }
    if (!ok) {
        if (survey.too_many) throw Error(invalid(survey.error));
        throw Error(invalid("not valid JSON: " + (survey.error.empty() ? std::string("syntax error") : survey.error)));
    }
    if (!batch && !one_of_many && survey.top == Kind::Array)
        throw Error(invalid("an array of traces (a batch); read it with loadTraces or tracesFromJson"));

    std::vector<TraceDocument> docs;
    std::size_t current = 0;
    const bool is_batch = batch && survey.top == Kind::Array;
    Read read(std::make_unique<RootFrame>(survey.docs, docs, current, batch));
    try {
        nlohmann::json::sax_parse(text.begin(), text.end(), &read, nlohmann::json::input_format_t::json, true);
    } catch (const Error& e) {
        if (is_batch) throw Error("trace " + std::to_string(current) + ": " + refusal(e.what()));
        throw Error(refusal(e.what()));
    }
    return docs;
}

}  // namespace

TraceDocument traceFromJson(const std::string& text) {
    checkSize(text.size());
    return std::move(readDocuments(text, false).front());
}

std::vector<TraceDocument> tracesFromJson(const std::string& text) {
    checkSize(text.size());
    return readDocuments(text, true);
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
            docs.push_back(std::move(readDocuments(line, false, /*one_of_many=*/true).front()));
        } catch (const Error& e) {
            throw Error("line " + std::to_string(line_no) + ": " + e.what());
        }
    }
    return docs;
}

}  // namespace modscope
