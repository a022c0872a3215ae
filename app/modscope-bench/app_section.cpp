#include "app_section.h"

#include <QElapsedTimer>
#include <QEventLoop>
#include <QGuiApplication>
#include <QRegularExpression>
#include <QTimer>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>

#include "bench_corpus.h"
#include "bench_stats.h"
#include "main_window.h"
#include "modscope/trace_io.h"
#include "paint_clock.h"
#include "plot_theme.h"
#include "routing_heatmap.h"
#include "snapshot_builder.h"

namespace modscope::bench {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double msBetween(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

// Runs the event loop until a condition holds. The loop sleeps between events and is woken by kick(): a
// busy wait would take a core from the engine's worker thread and slow what it measures.
class Waiter {
public:
    void kick() {
        if (loop_) loop_->quit();
    }
    bool until(const std::function<bool()>& done, int timeout_ms) {
        QElapsedTimer clock;
        clock.start();
        while (!done()) {
            const qint64 left = timeout_ms - clock.elapsed();
            if (left <= 0) return false;
            QEventLoop loop;
            loop_ = &loop;
            QTimer::singleShot(int(std::min<qint64>(left, 50)), &loop, &QEventLoop::quit);
            loop.exec();
            loop_ = nullptr;
        }
        return true;
    }
    // Lets queued work (the other panels' replots) finish before the next measurement.
    void settle(int ms) {
        QEventLoop loop;
        QTimer::singleShot(ms, &loop, &QEventLoop::quit);
        loop.exec();
    }

private:
    QEventLoop* loop_ = nullptr;
};

// `count` different slices of text, each exactly `tokens` tokens long for the tokenizer.
std::vector<std::string> promptsOfLength(const Tokenizer& tokenizer, const std::string& text, int tokens,
                                         int count) {
    const auto all = tokenizer.encode(text);
    std::vector<std::string> out;
    for (int i = 0; i < count; ++i) {
        const std::size_t first = std::size_t(i) * 13;
        if (first + std::size_t(tokens) > all.size()) break;
        const auto begin = all[first].byte_begin, end = all[first + tokens - 1].byte_end;
        out.push_back(text.substr(begin, end - begin));
    }
    if (out.empty()) throw Error("the prompt corpus is too short for " + std::to_string(tokens) + " tokens");
    return out;
}

// A routing snapshot of `layers` layers (every other one routed at capacity 0.125) over `tokens` tokens,
// built by the app's own snapshotFromTrace from a synthetic trace: the heatmap cannot tell it from a run.
SnapshotPtr syntheticSnapshot(int layers, int tokens, unsigned seed) {
    TraceDocument doc;
    auto& c = doc.model.config;
    c.name = doc.model.name = "synthetic-" + std::to_string(layers) + "x" + std::to_string(tokens);
    c.n_layers = layers;
    c.max_seq_len = tokens;
    c.routed_layers = ModelConfig::everyOtherLayer(layers);
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int t = 0; t < tokens; ++t) {
        const std::string word = " w" + std::to_string(t % 997);
        Token tok;
        tok.id = t % c.vocab_size;
        tok.piece = "\xE2\x96\x81w" + std::to_string(t % 997);  // "▁w…", as SentencePiece shows a word
        tok.byte_begin = doc.prompt.size();
        doc.prompt += word;
        tok.byte_end = doc.prompt.size();
        doc.tokens.push_back(tok);
        doc.run.token_ids.push_back(tok.id);
    }
    doc.original_tokens = doc.tokens.size();
    doc.original_bytes = doc.prompt.size();
    const int k = capacityToK(c.capacity, tokens);
    std::vector<int> processed;
    for (int li = 0; li < layers; ++li) {
        LayerTrace lt;
        lt.index = li;
        lt.routed = c.isRouted(li);
        if (!lt.routed) {
            lt.k = lt.processed = tokens;
            lt.selected.assign(tokens, 1);
            lt.topk_selected = lt.selected;
        } else {
            lt.k = lt.processed = k;
            lt.router_logits.resize(tokens);
            for (auto& r : lt.router_logits) r = normal(rng);
            std::vector<int> order(tokens);
            for (int t = 0; t < tokens; ++t) order[t] = t;
            std::stable_sort(order.begin(), order.end(),
                             [&](int a, int b) { return lt.router_logits[a] > lt.router_logits[b]; });
            lt.rank.assign(tokens, 0);
            lt.topk_selected.assign(tokens, 0);
            for (int i = 0; i < tokens; ++i) {
                lt.rank[order[i]] = i;
                if (i < k) lt.topk_selected[order[i]] = 1;
            }
            lt.topk_threshold = lt.router_logits[order[k - 1]];
            lt.selected = lt.topk_selected;
            lt.predictor_prob.resize(tokens);
            lt.predictor_selected.resize(tokens);
            for (int t = 0; t < tokens; ++t) {
                const float logit = 2.0f * (lt.router_logits[t] - lt.topk_threshold) + normal(rng);
                lt.predictor_prob[t] = 1.0f / (1.0f + std::exp(-logit));
                lt.predictor_selected[t] = lt.predictor_prob[t] > 0.5f;
            }
        }
        processed.push_back(lt.processed);
        doc.run.layers.push_back(std::move(lt));
    }
    doc.run.capacity = c.capacity;
    doc.run.flops = forwardFlops(c, tokens, processed, 1);
    doc.run.dense_flops = denseForwardFlops(c, tokens, 1);
    return snapshotFromTrace(doc);
}

}  // namespace

void benchApp(BenchContext& ctx) {
    // Without a display the real window still paints, into offscreen buffers.
    if (!std::getenv("QT_QPA_PLATFORM") && !std::getenv("DISPLAY") && !std::getenv("WAYLAND_DISPLAY"))
        setenv("QT_QPA_PLATFORM", "offscreen", 1);
    int argc = 1;
    char name[] = "modscope-bench";
    char* argv[] = {name, nullptr};
    PaintClock app(argc, argv);
    Waiter waiter;

    const int max_len = ctx.model().config().max_seq_len;
    const Tokenizer* tokenizer = ctx.model().tokenizer();
    if (!tokenizer) throw Error("the model has no tokenizer: the app section needs one");
    const std::string corpus = corpusText(ctx.quick() ? 40000 : 80000);
    const int warmup = ctx.quick() ? 1 : 2;
    const int reps = ctx.quick() ? 3 : 10;
    const int edit_reps = ctx.quick() ? 2 : 5;

    json out = json::object();
    Table runs("App: start of a run → heatmap repainted (real MainWindow, " + ctx.model().config().name +
                   ", " + QGuiApplication::platformName().toStdString() + " platform)",
               {"T", "what", "median ms", "p10–p90", "model ms", "window's own ms", "runs"});
    json run_rows = json::array();
    {
        MainWindow::Options wo;
        wo.settings = nullptr;  // the user's settings are neither read nor written
        wo.device = QStringLiteral("cpu");
        wo.restore_layout = false;
        MainWindow window(wo);
        window.resize(1400, 900);
        RoutingHeatmap* heatmap = window.heatmap();

        // The paint that shows a new snapshot ends the measurement.
        SnapshotPtr before;
        bool armed = false;
        Clock::time_point painted_at;
        app.watch(heatmap, [&](double) {
            const auto& s = heatmap->snapshot();
            if (!armed || !s || s == before || s->empty()) return;
            armed = false;
            painted_at = Clock::now();
            waiter.kick();
        });
        bool loaded = false, failed = false;
        QString error;
        QObject::connect(&window, &MainWindow::modelChanged, [&] {
            loaded = true;
            waiter.kick();
        });
        QObject::connect(&window, &MainWindow::modelLoadFailed, [&](const QString& m) {
            failed = true;
            error = m;
            waiter.kick();
        });
        int applied = 0;
        QObject::connect(&window, &MainWindow::runApplied, [&] {
            ++applied;
            waiter.kick();
        });

        std::vector<int> lengths;
        for (int T : {128, 1024})
            if (T <= max_len) lengths.push_back(T);
        if (lengths.empty()) lengths.push_back(max_len);

        window.setPrompt(QString::fromStdString(promptsOfLength(*tokenizer, corpus, lengths[0], 1)[0]));
        window.show();
        ctx.progress("app: opening the model in the window");
        window.openModel(QString::fromStdString(ctx.modelDirectory()));
        if (!waiter.until([&] { return loaded || failed; }, 120000) || failed)
            throw Error("the window could not open the model: " + error.toStdString());
        // The window runs its prompt once the model is in; that run is not measured.
        waiter.until([&] { return applied > 0 && !window.isStale(); }, 60000);
        waiter.settle(200);

        int forced = 0;
        // One measurement: from just before the run starts (or the edit is made) to the end of the
        // heatmap's paint of the new snapshot.
        const auto measure = [&](const std::string& text, bool through_debounce, double* model_ms,
                                 double* own_ms, int* tokens) {
            before = heatmap->snapshot();
            armed = true;
            Clock::time_point t0;
            if (through_debounce) {
                t0 = Clock::now();
                window.setPrompt(QString::fromStdString(text));  // as typing: the debounce starts
            } else {
                window.setPrompt(QString::fromStdString(text));
                t0 = Clock::now();
                window.runNow();  // the run starts now; the debounce is cancelled
            }
            if (!waiter.until([&] { return !armed; }, 60000)) {
                if (heatmap->snapshot() == before) throw Error("the app produced no run within 60 s");
                ++forced;  // a snapshot arrived but no paint was seen: force one
                heatmap->repaint();
                waiter.until([&] { return !armed; }, 5000);
            }
            const double ms = msBetween(t0, painted_at);
            waiter.until([&] { return !window.isStale(); }, 10000);
            waiter.settle(ctx.quick() ? 30 : 80);
            const auto& s = heatmap->snapshot();
            *model_ms = s ? s->trace.elapsed_ms : 0.0;
            *tokens = s ? s->tokens() : 0;
            const auto m =
                QRegularExpression(QStringLiteral("latency ([0-9.]+) ms")).match(window.statusText());
            *own_ms = m.hasMatch() ? m.captured(1).toDouble() : NAN;
            return ms;
        };

        for (int T : lengths) {
            const auto prompts = promptsOfLength(*tokenizer, corpus, T, warmup + reps + edit_reps);
            for (bool debounce : {false, true}) {
                ctx.progress(std::string("app: T=") + std::to_string(T) +
                             (debounce ? " edit → repaint" : " run → repaint"));
                std::vector<double> total, model, own;
                std::vector<double> token_counts;
                const int n = debounce ? edit_reps : reps;
                for (int i = 0; i < (debounce ? 0 : warmup) + n; ++i) {
                    double model_ms, own_ms;
                    int tokens;
                    const auto& text = prompts[std::size_t(i) % prompts.size()];
                    const double ms = measure(text, debounce, &model_ms, &own_ms, &tokens);
                    if (!debounce && i < warmup) continue;
                    total.push_back(ms), model.push_back(model_ms);
                    if (std::isfinite(own_ms)) own.push_back(own_ms);
                    token_counts.push_back(tokens);
                }
                const auto s = Summary::of(total), m = Summary::of(model), o = Summary::of(own);
                const int tokens = int(Summary::of(token_counts).median);
                runs.addRow({std::to_string(tokens),
                             debounce ? "edit → repaint (150 ms debounce included)" : "run → repaint",
                             fixed(s.median, 1), spread(s.p10, s.p90, 1), fixed(m.median, 1),
                             debounce ? "" : fixed(o.median, 1), std::to_string(s.n)});
                run_rows.push_back({{"seq_len", tokens},
                                    {"kind", debounce ? "edit_to_repaint" : "run_to_repaint"},
                                    {"ms", s.toJson()},
                                    {"model_ms", m.median},
                                    {"window_latency_ms", o.median}});
            }
        }
        app.watch(nullptr, nullptr);
        runs.addNote(
            "run → repaint: from MainWindow::runNow() (the run's start) to the end of the heatmap's paint "
            "event "
            "showing the new snapshot (QApplication::notify wraps the paint's delivery); " +
            std::to_string(warmup) + " warm-up runs, medians of " + std::to_string(reps) +
            ". model ms = RunTrace.elapsed_ms; window's own = the status bar's latency, measured by the app. "
            "edit → repaint: from setting the prompt text (as typing does) to the same paint. Paints "
            "forced: " +
            std::to_string(forced) + ".");
        out["runs"] = run_rows;
        out["forced_paints"] = forced;
        out["platform"] = QGuiApplication::platformName().toStdString();
    }
    ctx.report().add(runs);

    // The heatmap alone, at the size the views were designed for.
    const int L = 32, T = 2048;
    ctx.progress("app: heatmap repaint at 2048 x 32");
    const SnapshotPtr snapshots[2] = {syntheticSnapshot(L, T, 1), syntheticSnapshot(L, T, 2)};
    RoutingHeatmap heatmap;
    heatmap.setTheme(PlotTheme::fromPalette(heatmap.palette()));
    heatmap.resize(1200, 600);
    heatmap.show();
    waiter.settle(100);
    bool armed = false;
    double paint_ms = 0;
    Clock::time_point painted_at;
    app.watch(&heatmap, [&](double ms) {
        if (!armed) return;
        armed = false;
        painted_at = Clock::now();
        paint_ms = ms;
        waiter.kick();
    });
    const int hreps = ctx.quick() ? 5 : 20;
    Table repaint("Heatmap repaint, 2,048 tokens × 32 layers (synthetic snapshot, 1200×600 widget)",
                  {"what", "median ms", "p10–p90", "runs"});
    json hm = json::object();
    const auto timeIt = [&](const char* key, const std::string& label, const std::function<void(int)>& act) {
        std::vector<double> ms, paints;
        for (int i = 0; i < 2 + hreps; ++i) {
            armed = true;
            const auto t0 = Clock::now();
            act(i);
            if (armed && !waiter.until([&] { return !armed; }, 5000)) {
                heatmap.repaint();  // nothing painted yet: force it
                waiter.until([&] { return !armed; }, 5000);
            }
            if (i < 2) continue;  // warm-up
            ms.push_back(msBetween(t0, painted_at));
            paints.push_back(paint_ms);
        }
        const auto s = Summary::of(ms);
        repaint.addRow({label, fixed(s.median, 2), spread(s.p10, s.p90, 2), std::to_string(s.n)});
        hm[key] = s.toJson();
        hm[std::string(key) + "_paint_event_ms"] = Summary::of(paints).median;
    };
    timeIt("set_snapshot_ms", "new snapshot: setSnapshot(…, repaint_now) → painted",
           [&](int i) { heatmap.setSnapshot(snapshots[i % 2], /*repaint_now=*/true); });
    timeIt("replot_ms", "replot (every layer redrawn) → painted",
           [&](int) { heatmap.replot(QCustomPlot::rpImmediateRefresh); });
    timeIt("repaint_ms", "repaint() alone (paint event)", [&](int) { heatmap.repaint(); });
    app.watch(nullptr, nullptr);
    repaint.addNote(
        "Each from the call to the end of the heatmap's paint event, 2 warm-up calls, medians of " +
        std::to_string(hreps) + ".");
    hm["layers"] = L;
    hm["tokens"] = T;
    out["heatmap_2048x32"] = hm;
    ctx.report().add(repaint);
    ctx.report().json["app"] = out;
}

}  // namespace modscope::bench
