#include "engine_worker.h"

#include <algorithm>
#include <chrono>
#include <optional>

#include "modscope/trace_io.h"
#include "snapshot_builder.h"

namespace modscope {
namespace {

QString message(const std::exception& e) { return QString::fromUtf8(e.what()); }

ModelInfo infoOf(const Model& model) {
    ModelInfo info;
    info.directory = model.directory();
    info.name = model.config().name;
    info.device = model.device();
    info.backend = model.backend();
    info.parameters = model.parameterCount();
    info.config = model.config();
    info.weights_sha256 = model.weightsSha256();
    return info;
}

// Predictor decisions against top-k membership on the tokens from `from` on, per routed layer.
GenerationPoint agreementOnGenerated(const RunTrace& trace, int from) {
    GenerationPoint p;
    AgreementCounts all;
    const int T = static_cast<int>(trace.token_ids.size());
    for (const auto& layer : trace.layers) {
        if (!layer.routed) continue;
        AgreementCounts c;
        for (int t = std::max(0, from); t < T; ++t) {
            const bool pred = layer.predictor_selected[t], top = layer.topk_selected[t];
            (pred ? (top ? c.tp : c.fp) : (top ? c.fn : c.tn)) += 1;
        }
        p.routed_layers.push_back(layer.index);
        p.layer_accuracy.push_back(c.accuracy());
        all += c;
    }
    p.accuracy = all.accuracy();
    return p;
}

// How much of decoded text is final. The tokenizer decodes an unfinished multi-byte character (byte-fallback
// tokens still arriving) as U+FFFD at the end; those are held back until the next token settles them.
std::size_t settledPrefix(const std::string& text) {
    static const std::string kReplacement = "\xef\xbf\xbd";
    std::size_t end = text.size();
    for (int i = 0; i < 3 && end >= 3 && text.compare(end - 3, 3, kReplacement) == 0; ++i) end -= 3;
    return end;
}

// Whether two models' tokenizers give the same piece for every id, so that one's token ids mean the other's.
bool sameTokenizer(const Model& a, const Model& b) {
    const Tokenizer *ta = a.tokenizer(), *tb = b.tokenizer();
    if (ta == nullptr || tb == nullptr || ta->vocabSize() != tb->vocabSize()) return false;
    for (int id = 0; id < ta->vocabSize(); ++id)
        if (ta->piece(id) != tb->piece(id)) return false;
    return true;
}

}  // namespace

EngineWorker::EngineWorker() = default;
EngineWorker::~EngineWorker() = default;

void EngineWorker::loadModel(std::uint64_t job, const QString& directory, const QString& device) {
    try {
        std::shared_ptr<Model> model = Model::open(directory.toStdString(), device.toStdString());
        if (!model->tokenizer()) throw Error(directory.toStdString() + ": the model has no tokenizer");
        model_ = std::move(model);
        Q_EMIT modelLoaded(job, infoOf(*model_));
        if (reference_ && !sameTokenizer(*model_, *reference_)) {
            reference_.reset();
            Q_EMIT referenceFailed(job, tr("The reference model was closed: its tokenizer differs from %1's.")
                                            .arg(QString::fromStdString(model_->config().name)));
        }
    } catch (const std::exception& e) {
        Q_EMIT modelLoadFailed(job, message(e));
    }
}

void EngineWorker::loadReference(std::uint64_t job, const QString& directory) {
    if (directory.isEmpty()) {
        reference_.reset();
        Q_EMIT referenceLoaded(job, {}, {});
        return;
    }
    try {
        std::shared_ptr<Model> reference =
            Model::open(directory.toStdString(), model_ ? model_->device() : std::string("auto"));
        if (model_ && !sameTokenizer(*model_, *reference))
            throw Error(directory.toStdString() + ": its tokenizer differs from " + model_->config().name +
                        "'s, so their losses cannot be compared token by token");
        reference_ = std::move(reference);
        Q_EMIT referenceLoaded(job, QString::fromStdString(reference_->config().name),
                               QString::fromStdString(reference_->directory()));
    } catch (const std::exception& e) {
        Q_EMIT referenceFailed(job, message(e));
    }
}

void EngineWorker::run(const RunRequest& request) {
    // Superseded before it started: nothing to do (the newer request is queued behind).
    if (request.cancel && request.cancel->load()) return;
    if (!model_) {
        Q_EMIT runFailed(request.job, tr("No model is loaded."));
        return;
    }
    try {
        const Tokenizer& tok = *model_->tokenizer();
        auto prompt = preparePrompt(tok, request.text, model_->config().max_seq_len, /*stop_early=*/true,
                                    request.cancel.get());
        if (prompt.tokens.empty()) {
            Q_EMIT runFinished(emptySnapshot(*model_, prompt, request.job));
            return;
        }
        RunOptions options;
        options.mode = request.mode;
        options.capacity = request.capacity;
        options.layer_capacity = request.layer_capacity;
        // Asked for while another model was open: only this model's layers count.
        if (options.layer_capacity.size() > std::size_t(model_->config().n_layers))
            options.layer_capacity.resize(std::size_t(model_->config().n_layers));
        // As modscope-trace runs (traceModel): the next-token logits are part of the FLOPs a trace reports,
        // so the app's export and the CLI's agree.
        options.logits = RunOptions::Logits::Last;
        options.cancel = request.cancel.get();
        options.overrides = request.interventions.overrides;
        options.keep_capacity = request.interventions.keep_capacity;
        // Overrides of positions the prompt no longer has (it was shortened) wait until it has them again.
        const int T = static_cast<int>(prompt.tokens.size());
        options.overrides.erase(std::remove_if(options.overrides.begin(), options.overrides.end(),
                                               [T](const RoutingOverride& o) { return o.position >= T; }),
                                options.overrides.end());
        auto trace = model_->run(prompt.ids(), options);
        int generated_from = -1;
        if (request.generated_from_byte != std::string::npos) {
            for (std::size_t t = 0; t < prompt.tokens.size(); ++t)
                if (prompt.tokens[t].byte_begin >= request.generated_from_byte) {
                    generated_from = int(t);
                    break;
                }
        }
        SnapshotPtr snapshot = buildSnapshot(*model_, prompt, std::move(trace), request.job, generated_from);
        Q_EMIT runFinished(snapshot);
        if (!prompt.counted) {
            // The view is out; now the length of the rest of a long prompt, for the notice and the export.
            countRemainingTokens(tok, prompt, request.cancel.get());
            auto counted = std::make_shared<RoutingSnapshot>(*snapshot);
            counted->original_tokens = prompt.original_tokens;
            counted->original_tokens_exact = true;
            counted->tokenized_on = prompt.tokenized_on;
            snapshot = counted;
            Q_EMIT runFinished(counted);
        }
        Q_EMIT runFinished(withLosses(*snapshot, prompt.ids(), options, request));
    } catch (const Cancelled&) {
        // A newer request replaced this one; it reports instead.
    } catch (const std::exception& e) {
        Q_EMIT runFailed(request.job, message(e));
    }
}

SnapshotPtr EngineWorker::withLosses(const RoutingSnapshot& shown, const std::vector<int>& ids,
                                     const RunOptions& run_options, const RunRequest& request) {
    // The same run with every position's logits, which the heatmap did not wait for: its losses, its top
    // predictions and, when asked, its decision values (progress at most every 50 ms).
    RunOptions options = run_options;
    options.token_loss = true;
    options.top_predictions = kTopPredictions;
    options.decision_values = request.interventions.decision_values;
    auto last_progress = std::chrono::steady_clock::now();
    options.progress = [&](int done, int total) {
        const auto now = std::chrono::steady_clock::now();
        if (done != 0 && done != total && now - last_progress < std::chrono::milliseconds(50)) return;
        last_progress = now;
        Q_EMIT runProgress(request.job, done, total);
    };
    const auto full = model_->run(ids, options);
    auto out = std::make_shared<RoutingSnapshot>(shown);
    out->trace.token_loss = full.token_loss;
    out->trace.top_n = full.top_n;
    out->trace.top_ids = full.top_ids;
    out->trace.top_probs = full.top_probs;
    out->trace.decision_values = full.decision_values;
    const Tokenizer& tok = *model_->tokenizer();
    for (int id : full.top_ids) out->top_pieces.push_back(tok.piece(id));
    for (std::size_t li = 0; li < out->trace.layers.size() && li < full.layers.size(); ++li)
        out->trace.layers[li].decision_value = full.layers[li].decision_value;
    if (!options.overrides.empty()) {  // what the overrides changed
        RunOptions baseline = options;
        baseline.overrides.clear();
        baseline.decision_values = false;
        baseline.progress = nullptr;
        const auto base = model_->run(ids, baseline);
        out->baseline_token_loss = base.token_loss;
        out->baseline_top_ids = base.top_ids;
        out->baseline_top_probs = base.top_probs;
        for (int id : base.top_ids) out->baseline_top_pieces.push_back(tok.piece(id));
    }
    if (reference_ && ids.size() <= static_cast<std::size_t>(reference_->config().max_seq_len)) {
        RunOptions ref;
        ref.token_loss = true;
        ref.logits = RunOptions::Logits::None;
        ref.per_token_routing = false;
        ref.cancel = options.cancel;
        out->reference_token_loss = reference_->run(ids, ref).token_loss;
        out->reference_name = reference_->config().name;
    }
    return out;
}

void EngineWorker::generate(const GenerateRequest& request) {
    if (!model_) {
        Q_EMIT generationFailed(request.job, tr("No model is loaded."));
        return;
    }
    const Model& model = *model_;
    const Tokenizer& tok = *model.tokenizer();
    const int context = model.config().max_seq_len;
    try {
        PreparedPrompt prompt = preparePrompt(tok, request.prompt, context);
        if (prompt.truncated() || int(prompt.tokens.size()) >= context) {
            Q_EMIT generationFailed(request.job,
                                    tr("The prompt already fills the model's context of %1 tokens: shorten it to "
                                       "make room for generated tokens.")
                                        .arg(context));
            return;
        }
        if (prompt.tokens.empty()) {
            // Nothing typed: start from the beginning-of-sequence token when the tokenizer has one.
            if (tok.bosId() < 0) {
                Q_EMIT generationFailed(request.job, tr("Type a prompt to generate from."));
                return;
            }
            Token bos;
            bos.id = tok.bosId();
            bos.piece = tok.piece(bos.id);
            prompt.tokens.push_back(bos);
            prompt.original_tokens = 1;
        }
        const int prompt_tokens = int(prompt.tokens.size());
        const std::size_t prompt_bytes = prompt.text.size();

        // The prompt's causal run: the trace document's run, and the first view of the generation.
        RunOptions ro;
        ro.mode = RoutingMode::Causal;
        ro.capacity = request.capacity;
        ro.logits = RunOptions::Logits::Last;  // as traceModel runs, for the same FLOP count
        ro.cancel = request.cancel.get();
        RunTrace prompt_trace = model.run(prompt.ids(), ro);
        auto doc = std::make_shared<TraceDocument>(makeTraceDocument(model, prompt.text, prompt.tokens, prompt_trace));
        Q_EMIT generationStep(request.job, [] { GenerationPoint p; p.index = -1; return p; }(), buildSnapshot(model, prompt, prompt_trace, request.job, prompt_tokens));

        GenerationOptions g;
        g.max_new_tokens = request.settings.max_new_tokens;
        g.temperature = float(request.settings.temperature);
        g.top_p = float(request.settings.top_p);
        g.seed = request.settings.seed;
        g.eos_id = tok.eosId();
        g.cancel = request.cancel.get();

        PreparedPrompt running = prompt;
        std::vector<int> generated_ids;
        std::string generated_text;
        std::size_t emitted = 0;
        const auto t0 = std::chrono::steady_clock::now();
        // Each step re-runs the sequence in causal mode: the same decisions generation made (docs/MODEL.md),
        // plus router logits and the top-k reference the predictor is scored against. Throws Cancelled when
        // `cancel` is set meanwhile.
        const auto showStep = [&](const GenerationStep& step, const std::atomic<bool>* cancel) {
            RunOptions step_options = ro;
            step_options.cancel = cancel;
            RunTrace trace = model.run(running.ids(), step_options);
            GenerationPoint point = agreementOnGenerated(trace, prompt_tokens);
            point.index = step.index;
            point.position = step.position;
            point.token_id = step.token_id;
            point.processed = step.processed;
            point.kv_cache_bytes = step.kv_cache_bytes;
            point.dense_kv_cache_bytes = step.dense_kv_cache_bytes;
            point.step_ms = step.step_ms;
            const std::size_t ready = std::max(emitted, settledPrefix(generated_text));
            point.text = generated_text.substr(emitted, ready - emitted);
            emitted = ready;
            Q_EMIT generationStep(request.job, point, buildSnapshot(model, running, std::move(trace), request.job, prompt_tokens));
        };
        // A Stop that lands while a step's view is computed keeps the token: its view follows at the end.
        std::optional<GenerationStep> unshown;
        auto on_step = [&](const GenerationStep& step) -> bool {
            appendGenerated(tok, running, {step.token_id});
            generated_ids.push_back(step.token_id);
            generated_text = tok.decode(generated_ids);
            try {
                showStep(step, request.cancel.get());
            } catch (const Cancelled&) {
                unshown = step;
                return false;
            }
            return !(request.cancel && request.cancel->load());
        };
        GenerationResult result;
        bool cancelled = false;
        try {
            result = model.generate(prompt.ids(), g, on_step);
            cancelled = result.cancelled;
        } catch (const Cancelled&) {
            cancelled = true;
        }
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (request.cancel && request.cancel->load()) cancelled = true;
        // Every generated token is shown and kept, the last one included (one causal run, not cancellable:
        // the user asked to stop generating, not to lose what was generated).
        if (unshown) showStep(*unshown, nullptr);
        addGeneration(*doc, model, g, result, ms);

        GenerationSummary summary;
        summary.job = request.job;
        summary.generated = int(result.generated_ids.size());
        summary.tokens_per_second = result.tokens_per_second;
        summary.cancelled = cancelled;
        summary.hit_eos = !result.generated_ids.empty() && result.generated_ids.back() == g.eos_id;
        summary.hit_context = prompt_tokens + summary.generated >= context;
        summary.prompt_bytes = prompt_bytes;
        summary.text = sanitizeText(prompt.text + (result.generated_ids.empty() ? std::string()
                                                                                 : tok.decode(result.generated_ids)));
        summary.document = std::move(doc);
        Q_EMIT generationFinished(summary);
    } catch (const Cancelled&) {
        GenerationSummary summary;
        summary.job = request.job;
        summary.cancelled = true;
        summary.text = request.prompt;
        summary.prompt_bytes = request.prompt.size();
        Q_EMIT generationFinished(summary);
    } catch (const std::exception& e) {
        Q_EMIT generationFailed(request.job, message(e));
    }
}

}  // namespace modscope
