// Building trace documents from a model: tokenizing a prompt, running it, adding a generation. The only
// part of the trace code that runs the model; formats/ (writing and reading files) needs no LibTorch,
// so the fuzz targets for the readers build without it.
#include <chrono>

#include "modscope/trace_io.h"

namespace modscope {

PromptTokens tokenizePrompt(const Model& model, const std::string& prompt) {
    const Tokenizer* tok = model.tokenizer();
    if (!tok) throw Error("the model has no tokenizer");
    std::size_t bad_at = 0;
    if (!isValidUtf8(prompt, &bad_at))
        throw Error("the prompt is not valid UTF-8 text (byte " + std::to_string(bad_at) + ")");
    PromptTokens p;
    p.tokens = tok->encode(prompt);
    if (p.tokens.empty()) throw Error("the prompt is empty: it gives no tokens");
    p.original_tokens = p.tokens.size();
    p.original_bytes = prompt.size();
    const auto max = static_cast<std::size_t>(model.config().max_seq_len);
    if (p.tokens.size() > max) {
        p.tokens.resize(max);
        p.text = promptTextCoveredBy(prompt, p.tokens);
    } else {
        p.text = prompt;
    }
    return p;
}

TraceDocument makeTraceDocument(const Model& model, const std::string& prompt,
                                const std::vector<Token>& tokens, const RunTrace& trace) {
    if (tokens.size() != trace.token_ids.size())
        throw Error("trace: " + std::to_string(tokens.size()) + " tokens but the run has " +
                    std::to_string(trace.token_ids.size()));
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        if (tokens[i].id != trace.token_ids[i])
            throw Error("trace: token " + std::to_string(i) + " is id " + std::to_string(tokens[i].id) +
                        " but the run has " + std::to_string(trace.token_ids[i]));
        if (tokens[i].byte_begin > tokens[i].byte_end || tokens[i].byte_end > prompt.size())
            throw Error("trace: token " + std::to_string(i) + " lies outside the prompt's bytes");
    }
    std::size_t bad_at = 0;
    if (!isValidUtf8(prompt, &bad_at))
        throw Error("trace: the prompt is not valid UTF-8 text (byte " + std::to_string(bad_at) + ")");
    TraceDocument doc;
    doc.model.name = model.config().name;
    doc.model.config = model.config();
    doc.model.weights_sha256 = model.weightsSha256();
    doc.model.directory = model.directory();
    doc.prompt = prompt;
    doc.tokens = tokens;
    doc.original_tokens = tokens.size();
    doc.original_bytes = prompt.size();
    doc.run = trace;
    doc.run.logits.clear();  // not part of a trace file
    doc.run.logits.shrink_to_fit();
    doc.run.all_logits = false;
    return doc;
}

TraceDocument makeTraceDocument(const Model& model, const PromptTokens& prompt, const RunTrace& trace) {
    auto doc = makeTraceDocument(model, prompt.text, prompt.tokens, trace);
    doc.original_tokens = prompt.original_tokens;
    doc.original_bytes = prompt.original_bytes;
    return doc;
}

void addGeneration(TraceDocument& doc, const Model& model, const GenerationOptions& options,
                   const GenerationResult& result, double elapsed_ms) {
    TraceGeneration g;
    g.max_new_tokens = options.max_new_tokens;
    g.temperature = options.temperature;
    g.top_p = options.top_p;
    g.seed = options.seed;
    g.eos_id = options.eos_id;
    g.result = result;
    g.elapsed_ms = elapsed_ms;
    if (const Tokenizer* tok = model.tokenizer()) {
        for (const int id : result.generated_ids) g.pieces.push_back(sanitizeUtf8(tok->piece(id)));
        g.text = sanitizeUtf8(tok->decode(result.generated_ids));
    } else {
        g.pieces.assign(result.generated_ids.size(), std::string());
    }
    doc.generation = std::move(g);
}

TraceDocument traceModel(const Model& model, const std::string& prompt, const TraceRequest& request) {
    const auto p = tokenizePrompt(model, prompt);
    std::vector<int> ids;
    ids.reserve(p.tokens.size());
    for (const auto& t : p.tokens) ids.push_back(t.id);
    RunOptions ro;
    ro.mode = request.mode;
    ro.capacity = request.capacity;
    ro.layer_capacity = request.layer_capacity;
    ro.logits = RunOptions::Logits::Last;
    ro.cancel = request.cancel;
    ro.overrides = request.overrides;
    ro.keep_capacity = request.keep_capacity;
    ro.token_loss = request.token_loss;
    ro.decision_values = request.decision_values;
    ro.top_predictions = request.top_predictions;
    ro.progress = request.progress;
    auto doc = makeTraceDocument(model, p, model.run(ids, ro));
    if (request.generate_tokens > 0) {
        GenerationOptions g = request.generation;
        g.max_new_tokens = request.generate_tokens;
        g.cancel = request.cancel;
        const auto t0 = std::chrono::steady_clock::now();
        const auto result = model.generate(ids, g);
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        addGeneration(doc, model, g, result, ms);
    }
    return doc;
}

}  // namespace modscope
