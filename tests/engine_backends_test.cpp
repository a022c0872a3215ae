// The two backends against each other in one process: the bundled model gives the same routing decisions and
// logits within kLogitTolerance on the ops backend (LibTorch's operators: what CUDA runs) and on the kernel
// backend, over prompts of 16 to 1,024 tokens in both modes and in generation; on CUDA too where
// MODSCOPE_TEST_DEVICE names it (scripts/gpu_check.sh). A float64 model runs the routing, causal and
// KV-cache checks on the ops backend.
#include <QTest>
#include <algorithm>
#include <cmath>

#include "modscope/paths.h"
#include "test_support.h"

using namespace modscope;

namespace {

// Largest |logit difference| allowed between two backends (or devices) on the bundled model, whose logits
// span about +-20: float32 products summed in another order drift by about 1e-4 over six layers.
constexpr double kLogitTolerance = 2e-3;

std::string bundledModel() { return std::string(MODSCOPE_SOURCE_DIR) + "/resources/models/default"; }

// Text for prompts of any length: prose as the bundled model saw in training, repeated with variations.
std::vector<int> promptIds(const Model& model, int T, int variant) {
    static const char* kParagraphs[] = {
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ",
        "You will be successful in your work. A day for firm decisions!!!!! Or is it? Q: How many programmers "
        "does it take to change a light bulb? A: None, that's a hardware problem. 42 is the answer. ",
        "And it came to pass, when men began to multiply on the face of the earth, and daughters were born "
        "unto them, that the sons of God saw the daughters of men that they were fair; ",
    };
    std::string text;
    int i = variant;
    std::vector<int> ids;
    while (static_cast<int>(ids.size()) < T) {
        text += kParagraphs[i++ % 3];
        text += std::to_string(i) + "\n";
        ids = model.tokenizer()->encodeIds(text);
    }
    ids.resize(static_cast<std::size_t>(T));
    return ids;
}

RunTrace traced(const Model& model, const std::vector<int>& ids, RoutingMode mode) {
    RunOptions o;
    o.mode = mode;
    o.logits = RunOptions::Logits::All;
    return model.run(ids, o);
}

double maxLogitDifference(const RunTrace& a, const RunTrace& b) {
    double worst = 0.0;
    for (std::size_t i = 0; i < a.logits.size(); ++i)
        worst = std::max(worst, double(std::abs(a.logits[i] - b.logits[i])));
    return worst;
}

// Every routing decision of `got` equals `want`'s; the first difference is named.
void compareRouting(const RunTrace& want, const RunTrace& got, const QString& what) {
    QCOMPARE(got.layers.size(), want.layers.size());
    for (std::size_t l = 0; l < want.layers.size(); ++l) {
        const auto& w = want.layers[l];
        const auto& g = got.layers[l];
        QCOMPARE(g.k, w.k);
        QCOMPARE(g.processed, w.processed);
        for (std::size_t t = 0; t < w.selected.size(); ++t) {
            if (g.selected[t] == w.selected[t] && g.topk_selected[t] == w.topk_selected[t] &&
                (w.predictor_selected.empty() || g.predictor_selected[t] == w.predictor_selected[t]))
                continue;
            QFAIL(qPrintable(QString("%1: layer %2, token %3: selected %4/%5, top-k %6/%7 (router logit %8/%9)")
                                 .arg(what)
                                 .arg(l)
                                 .arg(t)
                                 .arg(w.selected[t])
                                 .arg(g.selected[t])
                                 .arg(w.topk_selected[t])
                                 .arg(g.topk_selected[t])
                                 .arg(w.router_logits.empty() ? 0.f : w.router_logits[t])
                                 .arg(g.router_logits.empty() ? 0.f : g.router_logits[t])));
        }
    }
}

struct Candidate {
    QString name;
    std::unique_ptr<Model> model;
};

// The bundled model on every (backend, device) this build and machine can run besides the reference (ops on
// the CPU).
std::vector<Candidate> candidates() {
    std::vector<Candidate> out;
    if (cpuKernelsEnabled()) out.push_back({"cpu-kernels", Model::open(bundledModel(), "cpu", "cpu-kernels")});
    if (test::device() != "cpu")
        out.push_back({QString::fromStdString("ops on " + test::device()), Model::open(bundledModel(), test::device(), "ops")});
    return out;
}

}  // namespace

class EngineBackendsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void modelsNameTheirBackend() {
        auto ops = Model::create(test::tinyConfig(), 1, "cpu", "ops");
        QCOMPARE(QString::fromStdString(ops->backend()), QString("ops"));
        QCOMPARE(QString::fromStdString(ops->run({1, 2, 3}).backend), QString("ops"));
        auto automatic = Model::create(test::tinyConfig(), 1, "cpu");
        const QString expected = cpuKernelsEnabled() ? "cpu-kernels" : "ops";
        QCOMPARE(QString::fromStdString(automatic->backend()), expected);
        QCOMPARE(QString::fromStdString(automatic->run({1, 2, 3}).backend), expected);
        QVERIFY_THROWS_EXCEPTION(Error, Model::create(test::tinyConfig(), 1, "cpu", "gpu-kernels"));
        if (!cpuKernelsCompiledIn())
            QVERIFY_THROWS_EXCEPTION(Error, Model::create(test::tinyConfig(), 1, "cpu", "cpu-kernels"));
    }

    void bundledModelRoutesAlikeOnEveryBackend_data() {
        QTest::addColumn<int>("length");
        QTest::addColumn<int>("variant");
        QTest::addColumn<bool>("causal");
        for (int T : {16, 64, 256, 1024})
            for (int variant : {0, 1})
                for (bool causal : {false, true})
                    QTest::newRow(qPrintable(QString("T %1, prompt %2, %3").arg(T).arg(variant).arg(causal ? "causal" : "top-k")))
                        << T << variant << causal;
    }

    void bundledModelRoutesAlikeOnEveryBackend() {
        QFETCH(int, length);
        QFETCH(int, variant);
        QFETCH(bool, causal);
        static auto reference = Model::open(bundledModel(), "cpu", "ops");
        static auto others = candidates();
        if (others.empty()) QSKIP("only the ops backend on the CPU here: nothing to compare it with");
        const auto ids = promptIds(*reference, length, variant);
        const auto mode = causal ? RoutingMode::Causal : RoutingMode::TopK;
        const auto want = traced(*reference, ids, mode);
        QCOMPARE(QString::fromStdString(want.backend), QString("ops"));
        for (const auto& c : others) {
            const auto got = traced(*c.model, ids, mode);
            compareRouting(want, got, c.name);
            const double diff = maxLogitDifference(want, got);
            QVERIFY2(diff <= kLogitTolerance, qPrintable(QString("%1: logits differ by %2").arg(c.name).arg(diff)));
            QCOMPARE(got.flops, want.flops);
        }
    }

    void bundledModelGeneratesAlikeOnEveryBackend() {
        auto reference = Model::open(bundledModel(), "cpu", "ops");
        auto others = candidates();
        if (others.empty()) QSKIP("only the ops backend on the CPU here: nothing to compare it with");
        GenerationOptions g;
        g.max_new_tokens = 40;
        g.temperature = 0.0f;  // greedy: the same logits give the same tokens
        const auto prompt = promptIds(*reference, 24, 2);
        const auto want = reference->generate(prompt, g);
        QCOMPARE(int(want.generated_ids.size()), 40);
        for (const auto& c : others) {
            const auto got = c.model->generate(prompt, g);
            QCOMPARE(got.generated_ids, want.generated_ids);
            for (std::size_t i = 0; i < want.steps.size(); ++i) {
                QCOMPARE(got.steps[i].processed, want.steps[i].processed);
                for (std::size_t l = 0; l < want.steps[i].predictor_prob.size(); ++l) {
                    const float a = want.steps[i].predictor_prob[l], b = got.steps[i].predictor_prob[l];
                    QVERIFY(std::isnan(a) ? std::isnan(b) : std::abs(a - b) < 1e-3f);
                }
            }
            QCOMPARE(got.kv_cache_bytes, want.kv_cache_bytes);
        }
    }

    // The bundled model in float64 on the ops backend: the routing float32 chose, logits within float32's
    // rounding, k tokens per routed layer in top-k mode, and generation with the KV cache deciding each token as
    // a full causal forward over the same sequence does.
    void float64ModelRunsTheSameChecks() {
        auto single = Model::open(bundledModel(), "cpu", "ops");
        auto dbl = Model::open(bundledModel(), "cpu", "ops");
        internals(*dbl).net->to(torch::kFloat64);
        QCOMPARE(internals(*dbl).net->tok_emb->weight.scalar_type(), torch::kFloat64);
        for (int T : {16, 128}) {
            for (auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
                const auto ids = promptIds(*single, T, 1);
                const auto want = traced(*single, ids, mode), got = traced(*dbl, ids, mode);
                compareRouting(want, got, "float64");
                QVERIFY(maxLogitDifference(want, got) <= kLogitTolerance);
                for (const auto& layer : got.layers)
                    if (layer.routed && mode == RoutingMode::TopK) QCOMPARE(layer.processed, capacityToK(0.125, T));
            }
        }
        GenerationOptions g;
        g.max_new_tokens = 24;
        g.temperature = 0.0f;
        const auto prompt = promptIds(*single, 12, 0);
        const auto result = dbl->generate(prompt, g);
        QCOMPARE(int(result.generated_ids.size()), 24);
        std::vector<int> all = prompt;
        all.insert(all.end(), result.generated_ids.begin(), result.generated_ids.end());
        const auto full = traced(*dbl, all, RoutingMode::Causal);
        for (std::size_t i = 0; i < result.steps.size(); ++i) {
            const auto pos = static_cast<std::size_t>(result.steps[i].position);
            for (std::size_t l = 0; l < full.layers.size(); ++l)
                QCOMPARE(int(result.steps[i].processed[l]), int(full.layers[l].selected[pos]));
        }
    }
};

MODSCOPE_ENGINE_TEST_MAIN(EngineBackendsTest)
#include "engine_backends_test.moc"
