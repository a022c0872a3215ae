// The C++ engine against tests/reference/mod_reference.py, an independent implementation of docs/MODEL.md
// in Python: same logits and per-token losses (absolute tolerance 1e-4) and the same routing decisions, token by
// token, with and without forced decisions.
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>

#include "test_support.h"

using namespace modscope;

namespace {

constexpr double kLogitTolerance = 1e-4;

QJsonObject expectedCase(const Model& model, const std::vector<int>& ids, double capacity, RoutingMode mode,
                         const std::vector<RoutingOverride>& overrides = {}, bool keep_capacity = false) {
    RunOptions opt;
    opt.capacity = capacity;
    opt.mode = mode;
    opt.logits = RunOptions::Logits::All;
    opt.token_loss = true;
    opt.overrides = overrides;
    opt.keep_capacity = keep_capacity;
    const auto trace = model.run(ids, opt);
    const int T = static_cast<int>(ids.size()), V = model.config().vocab_size;
    QJsonObject c;
    QJsonArray jids, positions, logits, layers;
    for (int id : ids) jids.append(id);
    // Logits at up to 12 positions spread over the sequence keep the file small at T = 256.
    for (int p = 0; p < T; p += std::max(1, T / 12)) positions.append(p);
    if (positions.last().toInt() != T - 1) positions.append(T - 1);
    for (const auto& p : positions) {
        QJsonArray row;
        for (int v = 0; v < V; ++v) row.append(double(trace.logits[p.toInt() * V + v]));
        logits.append(row);
    }
    for (const auto& layer : trace.layers) {
        QJsonArray sel;
        for (auto s : layer.selected) sel.append(bool(s));
        QJsonObject l{{"selected", sel}};
        if (layer.moe) {
            QJsonArray expert, choice;
            for (int e : layer.expert) expert.append(e);
            for (int e : layer.expert_choice) choice.append(e);
            l["expert"] = expert;
            l["expert_choice"] = choice;
        }
        layers.append(l);
    }
    QJsonArray loss, forced;
    for (float v : trace.token_loss) loss.append(std::isnan(v) ? QJsonValue() : QJsonValue(double(v)));
    for (const auto& o : overrides) forced.append(QJsonArray{o.layer, o.position, o.process});
    c["token_loss"] = loss;
    c["overrides"] = forced;
    c["keep_capacity"] = keep_capacity;
    c["ids"] = jids;
    c["capacity"] = capacity;
    c["mode"] = toString(mode);
    c["positions"] = positions;
    c["logits"] = logits;
    c["layers"] = layers;
    c["tolerance"] = kLogitTolerance;
    return c;
}

void checkAgainstReference(const Model& model, const std::string& checkpoint_dir, const QList<int>& lengths) {
    QJsonArray cases;
    int seed = 1;
    for (int T : lengths) {
        const auto ids = test::randomIds(T, model.config().vocab_size, seed++);
        for (double capacity : {0.125, 0.5, 1.0}) cases.append(expectedCase(model, ids, capacity, RoutingMode::TopK));
        cases.append(expectedCase(model, ids, model.config().capacity, RoutingMode::Causal));
        // Forced decisions (docs/MODEL.md "Interventions"), both semantics and both modes: cells forced either
        // way, and a whole layer skipped but for one token.
        const auto& routed = model.config().routed_layers;
        if (T < 2 || routed.empty()) continue;
        const std::vector<RoutingOverride> cells = {{routed[0], T / 3, true}, {routed[0], T - 1, false},
                                                    {routed.back(), 0, true}};
        const std::vector<RoutingOverride> layer = {{routed.back(), RoutingOverride::kAllPositions, false},
                                                    {routed.back(), T / 2, true}};
        for (bool keep : {false, true}) {
            cases.append(expectedCase(model, ids, model.config().capacity, RoutingMode::TopK, cells, keep));
            cases.append(expectedCase(model, ids, model.config().capacity, RoutingMode::TopK, layer, keep));
        }
        cases.append(expectedCase(model, ids, model.config().capacity, RoutingMode::Causal, cells));
        cases.append(expectedCase(model, ids, model.config().capacity, RoutingMode::Causal, layer));
    }
    QTemporaryDir dir;
    const auto path = QDir(dir.path()).filePath("expected.json");
    QFile f(path);
    QVERIFY(f.open(QIODevice::WriteOnly));
    f.write(QJsonDocument(QJsonObject{{"cases", cases}}).toJson(QJsonDocument::Compact));
    f.close();
    QFile script(QStringLiteral(MODSCOPE_SOURCE_DIR "/tests/reference/mod_reference.py"));
    QVERIFY(script.open(QIODevice::ReadOnly));
    const auto out = test::runPython(QString::fromUtf8(script.readAll()),
                                     {QString::fromStdString(checkpoint_dir), "--compare", path});
    const auto report = QJsonDocument::fromJson(out.toUtf8()).object();
    qInfo("reference: %d cases, max |logit difference| %.3g, %d near ties", report["cases"].toInt(),
          report["max_logit_diff"].toDouble(), report["near_ties"].toInt());
    QCOMPARE(report["cases"].toInt(), int(cases.size()));
    // A tie within rounding is rare on random inputs; many would mean the two disagree more than rounding does.
    QVERIFY2(report["near_ties"].toInt() <= 3, qPrintable(out));
    QVERIFY2(report["problems"].toArray().isEmpty(), qPrintable(out));
}

}  // namespace

class ReferenceTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void tinyModelMatchesReference() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString(), 21);
        test::balancePredictors(*model, test::randomIds(64, model->config().vocab_size, 3));
        model->save(dir.path().toStdString());
        checkAgainstReference(*model, dir.path().toStdString(), {1, 7, 40, 160});
    }

    // Causal mode with the budget feedback and the prefix top-k (docs/MODEL.md), which the bundled model uses.
    void tinyModelWithCausalRuleMatchesReference() {
        QTemporaryDir dir;
        auto tok = Tokenizer::load(test::tinyTokenizerPath());
        auto config = test::tinyConfig(tok->vocabSize());
        config.predictor_budget_gain = 1.5;
        config.predictor_prefix_topk = true;
        auto model = Model::create(config, 23, "cpu");
        model->attachTokenizer(std::move(tok));
        test::balancePredictors(*model, test::randomIds(64, config.vocab_size, 3));
        model->save(dir.path().toStdString());
        checkAgainstReference(*model, dir.path().toStdString(), {1, 7, 40, 160});
    }

    // Mixture layers (docs/MODEL.md "Mixture layers"): a plain mixture, staged and integrated MoDE, each with
    // a capacity factor low enough that experts overflow; every token's expert must match too.
    void mixtureModelsMatchReference_data() {
        QTest::addColumn<bool>("routed");
        QTest::addColumn<int>("noop");
        QTest::newRow("mixture of experts") << false << 0;
        QTest::newRow("staged MoDE") << true << 0;
        QTest::newRow("integrated MoDE") << false << 2;
    }
    void mixtureModelsMatchReference() {
        QFETCH(bool, routed);
        QFETCH(int, noop);
        QTemporaryDir dir;
        auto tok = Tokenizer::load(test::tinyTokenizerPath());
        const auto config = test::tinyMixtureConfig(routed, noop, tok->vocabSize());
        auto model = Model::create(config, 29, "cpu");
        model->attachTokenizer(std::move(tok));
        test::spreadExpertRouters(*model);
        if (routed) test::balancePredictors(*model, test::randomIds(64, config.vocab_size, 3));
        model->save(dir.path().toStdString());
        checkAgainstReference(*model, dir.path().toStdString(), {1, 7, 40, 160});
    }

    // The bundled default model, as shipped.
    void bundledModelMatchesReference() {
        const auto dir = std::string(MODSCOPE_SOURCE_DIR "/resources/models/default");
        QVERIFY2(QFile::exists(QString::fromStdString(dir + "/weights.pt")), "the bundled model is missing");
        auto model = Model::open(dir, "cpu");
        checkAgainstReference(*model, dir, {5, 64, model->config().max_seq_len});
    }

    // The check can fail: a model whose weights differ slightly from the checkpoint must be caught.
    void referenceNoticesADifference() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString(), 22);
        {
            torch::NoGradGuard guard;
            internals(*model).net->blocks[2]->mlp->down->weight.add_(1e-3);
        }
        const auto ids = test::randomIds(30, model->config().vocab_size, 5);
        QJsonArray cases{expectedCase(*model, ids, 0.5, RoutingMode::TopK)};
        QTemporaryDir tmp;
        const auto path = QDir(tmp.path()).filePath("expected.json");
        QFile f(path);
        QVERIFY(f.open(QIODevice::WriteOnly));
        f.write(QJsonDocument(QJsonObject{{"cases", cases}}).toJson());
        f.close();
        QProcess p;
        p.start("/usr/bin/python3", {QStringLiteral(MODSCOPE_SOURCE_DIR "/tests/reference/mod_reference.py"),
                                     dir.path(), "--compare", path});
        QVERIFY(p.waitForFinished(120000));
        QCOMPARE(p.exitCode(), 1);
        QVERIFY(p.readAllStandardOutput().contains("logit difference"));
    }
};

MODSCOPE_ENGINE_TEST_MAIN(ReferenceTest)
#include "reference_test.moc"
