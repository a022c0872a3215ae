#include "snapshot_builder.h"

#include <QString>

#include <algorithm>

#include "modscope/trace_io.h"

namespace modscope {
namespace {

// The length of the UTF-8 sequence a lead byte starts (0 for a continuation byte).
int sequenceLength(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) return 2;
    if ((c & 0xF0) == 0xE0) return 3;
    if ((c & 0xF8) == 0xF0) return 4;
    return 0;
}

// The text a token covers, as valid UTF-8. Byte-fallback tokens split one character over several
// tokens: the first gets the whole character, the others nothing (their piece names the byte).
std::string tokenText(const std::string& text, const Token& token) {
    if (token.byte_begin >= token.byte_end || token.byte_end > text.size()) return {};
    std::string slice = text.substr(token.byte_begin, token.byte_end - token.byte_begin);
    if (isValidUtf8(slice)) return slice;
    const auto lead = static_cast<unsigned char>(text[token.byte_begin]);
    const int n = sequenceLength(lead);
    if (n > 1 && token.byte_begin + n <= text.size()) {
        slice = text.substr(token.byte_begin, n);
        if (isValidUtf8(slice)) return slice;
    }
    return {};
}

}  // namespace

std::vector<int> PreparedPrompt::ids() const {
    std::vector<int> ids;
    ids.reserve(tokens.size());
    for (const auto& t : tokens) ids.push_back(t.id);
    return ids;
}

std::string sanitizeText(const std::string& text) {
    if (isValidUtf8(text)) return text;
    // QString decoding replaces every ill-formed sequence with U+FFFD.
    return QString::fromUtf8(text.data(), qsizetype(text.size())).toStdString();
}

std::size_t encodeInChunks(const Tokenizer& tokenizer, const std::string& text, std::size_t from,
                           const std::atomic<bool>* cancel, const std::function<bool(std::vector<Token>&&)>& take,
                           std::size_t chunk_bytes) {
    std::size_t start = from;
    while (start < text.size()) {
        if (cancel && cancel->load()) throw Cancelled();
        std::size_t end = text.size();
        if (text.size() - start > chunk_bytes) {
            // End before a space: it begins the next piece ("▁word"). Without a space in reach, the chunk
            // grows to the next one (or the end).
            const std::size_t back = text.rfind(' ', start + chunk_bytes);
            if (back != std::string::npos && back > start) {
                end = back;
            } else {
                const std::size_t ahead = text.find(' ', start + chunk_bytes);
                if (ahead != std::string::npos) end = ahead;
            }
        }
        auto tokens = tokenizer.encode(text.substr(start, end - start));
        for (auto& t : tokens) {
            t.byte_begin += start;
            t.byte_end += start;
        }
        start = end;
        if (!take(std::move(tokens))) break;
    }
    return start;
}

PreparedPrompt preparePrompt(const Tokenizer& tokenizer, const std::string& raw, int max_tokens, bool stop_early,
                             const std::atomic<bool>* cancel) {
    PreparedPrompt p;
    p.tokenized_on = std::this_thread::get_id();
    std::string prompt = sanitizeText(raw);
    p.original_bytes = prompt.size();
    const std::size_t max = std::size_t(std::max(0, max_tokens));
    // A margin past max: only the last piece before a chunk's end could differ from a whole encode, and
    // the kept tokens end well before it.
    const std::size_t enough = max + 16;
    std::size_t seen = 0;
    p.scanned_bytes = encodeInChunks(tokenizer, prompt, 0, cancel, [&](std::vector<Token>&& tokens) {
        seen += tokens.size();
        for (auto& t : tokens) {
            if (p.tokens.size() >= enough) break;
            p.tokens.push_back(std::move(t));
        }
        return !(stop_early && seen >= enough);
    });
    p.original_tokens = seen;
    p.counted = p.scanned_bytes >= prompt.size();
    if (p.tokens.size() > max) {
        p.tokens.resize(max);
        p.text = promptTextCoveredBy(prompt, p.tokens);
    } else {
        p.text = prompt;
    }
    if (!p.counted) p.source = std::move(prompt);
    return p;
}

void countRemainingTokens(const Tokenizer& tokenizer, PreparedPrompt& p, const std::atomic<bool>* cancel) {
    if (p.counted) return;
    p.tokenized_on = std::this_thread::get_id();
    std::size_t more = 0;
    encodeInChunks(tokenizer, p.source, p.scanned_bytes, cancel, [&](std::vector<Token>&& tokens) {
        more += tokens.size();
        return true;
    });
    p.original_tokens += more;
    p.scanned_bytes = p.source.size();
    p.counted = true;
    p.source.clear();
    p.source.shrink_to_fit();
}

void appendGenerated(const Tokenizer& tokenizer, PreparedPrompt& prompt, const std::vector<int>& ids) {
    // The tokenizer decodes by concatenating pieces (no dummy prefix, identity normalisation), so each
    // token's bytes are its own decode and the byte ranges follow.
    for (const int id : ids) {
        Token t;
        t.id = id;
        t.piece = tokenizer.piece(id);
        const std::string bytes = tokenizer.decode({id});
        t.byte_begin = prompt.text.size();
        prompt.text += bytes;
        t.byte_end = prompt.text.size();
        prompt.tokens.push_back(std::move(t));
    }
    prompt.original_tokens = prompt.tokens.size();
    prompt.original_bytes = prompt.text.size();
}

namespace {

// What the views read per token and per layer, from a snapshot's trace and the tokens of its text.
void fillPerToken(RoutingSnapshot* s, const std::string& text, const std::vector<Token>& tokens) {
    const int T = s->tokens();
    const int L = s->layers();
    s->pieces.resize(T);
    s->texts.resize(T);
    for (int t = 0; t < T && t < int(tokens.size()); ++t) {
        s->pieces[t] = tokens[t].piece;
        s->texts[t] = tokenText(text, tokens[t]);
    }
    s->depth.assign(T, 0);
    s->agreement.assign(L, AgreementCounts{});
    std::int64_t processed_total = 0;
    for (const auto& layer : s->trace.layers) {
        for (int t = 0; t < T; ++t) s->depth[t] += layer.selected[t] ? 1 : 0;
        processed_total += layer.processed;
        if (!layer.routed) continue;
        const Agreement a = Agreement::of(layer);
        AgreementCounts c{a.tp, a.fp, a.tn, a.fn};
        // A trace file is untrusted: its layer indices are not used as positions unchecked.
        if (layer.index >= 0 && layer.index < L) s->agreement[layer.index] = c;
        s->agreement_total += c;
    }
    // K and V of d floats for each processed token in each layer (docs/MODEL.md, "Generation").
    const std::int64_t per_token_layer = 2LL * s->d_model * std::int64_t(sizeof(float));
    s->kv_cache_bytes = processed_total * per_token_layer;
    s->dense_kv_cache_bytes = std::int64_t(T) * L * per_token_layer;
}

}  // namespace

std::shared_ptr<RoutingSnapshot> emptySnapshot(const Model& model, const PreparedPrompt& prompt, std::uint64_t job) {
    auto s = std::make_shared<RoutingSnapshot>();
    const auto& c = model.config();
    s->job = job;
    s->model_name = c.name;
    s->config = c;
    s->weights_sha256 = model.weightsSha256();
    s->model_directory = model.directory();
    s->n_layers = c.n_layers;
    s->d_model = c.d_model;
    s->max_seq_len = c.max_seq_len;
    s->predictor_threshold = c.predictor_threshold;
    s->trace.device = model.device();
    s->prompt_bytes = prompt.original_bytes;
    s->original_tokens = prompt.original_tokens;
    s->original_tokens_exact = prompt.counted;
    s->tokenized_on = prompt.tokenized_on;
    return s;
}

std::shared_ptr<RoutingSnapshot> buildSnapshot(const Model& model, const PreparedPrompt& prompt, RunTrace trace,
                                               std::uint64_t job, int generated_from) {
    auto s = emptySnapshot(model, prompt, job);
    s->trace = std::move(trace);
    s->trace.logits.clear();  // the views never read them; a snapshot is kept around
    s->trace.logits.shrink_to_fit();
    s->prompt = prompt.text;
    s->prompt_tokens = prompt.tokens;
    s->truncated = prompt.truncated();
    s->used_bytes = prompt.text.size();
    s->generated_from = generated_from;

    fillPerToken(s.get(), prompt.text, prompt.tokens);
    return s;
}

std::shared_ptr<RoutingSnapshot> snapshotFromTrace(const TraceDocument& doc) {
    auto s = std::make_shared<RoutingSnapshot>();
    const auto& c = doc.model.config;
    s->model_name = doc.model.name;
    s->config = c;
    s->weights_sha256 = doc.model.weights_sha256;
    s->model_directory = doc.model.directory;
    s->n_layers = c.n_layers;
    s->d_model = c.d_model;
    s->max_seq_len = c.max_seq_len;
    s->predictor_threshold = c.predictor_threshold;
    s->trace = doc.run;
    s->prompt = doc.prompt;
    s->prompt_tokens = doc.tokens;
    s->original_tokens = doc.original_tokens;
    s->truncated = doc.truncated();
    s->prompt_bytes = doc.original_bytes;
    s->used_bytes = doc.prompt.size();
    fillPerToken(s.get(), doc.prompt, doc.tokens);
    return s;
}

}  // namespace modscope
