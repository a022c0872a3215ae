#include "test_support.h"
#include "synthetic_corpus.h"

#include <QDir>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>

namespace modscope::test {

std::string device() {
    const char* env = std::getenv("MODSCOPE_TEST_DEVICE");
    return env != nullptr && *env != '\0' ? env : "cpu";
}

bool float64() {
    const char* env = std::getenv("MODSCOPE_TEST_DTYPE");
    return env != nullptr && std::string(env) == "float64";
}

std::unique_ptr<Model> createModel(const ModelConfig& config, std::uint64_t seed) {
    if (!float64()) return Model::create(config, seed, device());
    auto model = Model::create(config, seed, device(), "ops");
    internals(*model).net->to(torch::kFloat64);
    return model;
}

ModelConfig tinyConfig(int vocab_size) {
    ModelConfig c;
    c.name = "tiny-test";
    c.vocab_size = vocab_size;
    c.d_model = 32;
    c.n_layers = 4;
    c.n_heads = 2;
    c.d_ff = 64;
    c.max_seq_len = 160;
    c.capacity = 0.25;
    c.routed_layers = {1, 3};
    c.predictor_hidden = 16;
    return c;
}

ModelConfig tinyMixtureConfig(bool routed, int noop, int vocab_size) {
    auto c = tinyConfig(vocab_size);
    if (!routed) c.routed_layers.clear();
    c.moe_layers = {1, 3};
    c.n_experts = 3;
    c.noop_experts = noop;
    c.expert_capacity_factor = 0.75;
    return c;
}

void spreadExpertRouters(Model& model) {
    torch::NoGradGuard guard;
    for (auto& block : internals(model).net->blocks)
        if (block->moe) block->mixture->router->weight.mul_(10.0);
}

nn::ForwardOptions causalPrefill(const ModelConfig& config, std::vector<nn::LayerKV>& kv) {
    nn::ForwardOptions fo;
    fo.mode = RoutingMode::Causal;
    fo.capacity = config.capacity;
    fo.setCausalRule(config);
    fo.kv = &kv;
    return fo;
}

double maxStepLogitGap(const std::vector<torch::Tensor>& step_logits, const RunTrace& full, std::size_t prompt_size,
                       int vocab) {
    double worst = 0.0;
    for (std::size_t i = 0; i < step_logits.size(); ++i) {
        const auto pos = static_cast<std::int64_t>(prompt_size + i) - 1;
        const auto ref = torch::from_blob(const_cast<float*>(full.logits.data()) + pos * vocab, {vocab}, torch::kFloat32);
        worst = std::max(worst, (step_logits[i].to(torch::kCPU, torch::kFloat32) - ref).abs().max().item<double>());
    }
    return worst;
}

std::vector<int> randomIds(int count, int vocab, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> dist(0, vocab - 1);
    std::vector<int> ids(count);
    for (auto& id : ids) id = dist(rng);
    return ids;
}

torch::Tensor idsTensor(const std::vector<int>& ids) {
    return torch::tensor(std::vector<std::int64_t>(ids.begin(), ids.end()), torch::kLong).view({1, -1}).to(device());
}

void balancePredictors(Model& model, const std::vector<int>& ids) {
    auto& net = *internals(model).net;
    torch::NoGradGuard guard;
    for (auto& block : net.blocks) {
        if (!block->routed) continue;
        std::vector<nn::LayerRouting> routing;
        nn::ForwardOptions fo;
        fo.mode = RoutingMode::Causal;
        fo.collect = true;
        net.hidden(idsTensor(ids), fo, &routing);
        // The threshold midway between the two middle logits, not on the median itself: a token whose logit
        // sat exactly on it would be decided by rounding, which differs between a full pass and generation
        // steps (kernels for different shapes).
        const auto sorted = std::get<0>(routing[block->index].predictor_logits.flatten().sort());
        const auto n = sorted.size(0);
        const auto center = n < 2 ? sorted[0] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
        block->predictor->fc2->bias.sub_(center);
    }
}

std::string syntheticCorpus(std::size_t bytes, std::uint64_t seed) { return testdata::syntheticCorpus(bytes, seed, testdata::kEngineWords); }

std::string tinyTokenizerPath() {
    static std::once_flag once;
    static std::string path;
    static QTemporaryDir dir;
    std::call_once(once, [] {
        const auto corpus = QDir(dir.path()).filePath("corpus.txt").toStdString();
        std::ofstream(corpus) << syntheticCorpus(200000, 11);
        Tokenizer::TrainOptions opt;
        opt.input_files = {corpus};
        opt.model_prefix = QDir(dir.path()).filePath("tok").toStdString();
        opt.vocab_size = 300;
        Tokenizer::train(opt);
        path = opt.model_prefix + ".model";
    });
    return path;
}

std::unique_ptr<Model> makeCheckpoint(const std::string& dir, std::uint64_t seed) {
    auto tok = Tokenizer::load(tinyTokenizerPath());
    auto model = Model::create(tinyConfig(tok->vocabSize()), seed, "cpu");
    model->attachTokenizer(std::move(tok));
    model->save(dir);
    return model;
}

QString runPython(const QString& script, const QStringList& args) {
    QProcess p;
    p.setProgram("/usr/bin/python3");
    p.setArguments(QStringList{"-c", script} + args);
    p.start();
    if (!p.waitForFinished(120000)) {
        QTest::qFail("python3 did not finish", __FILE__, __LINE__);
        return {};
    }
    const auto err = QString::fromUtf8(p.readAllStandardError());
    if (p.exitStatus() != QProcess::NormalExit || p.exitCode() != 0) {
        const auto how = p.exitStatus() != QProcess::NormalExit ? QString("crashed") : QString("exit code %1").arg(p.exitCode());
        QTest::qFail(qPrintable("python3 failed (" + how + "): " + err + QString::fromUtf8(p.readAllStandardOutput()).left(2000)),
                     __FILE__, __LINE__);
        return {};
    }
    return QString::fromUtf8(p.readAllStandardOutput());
}

}  // namespace modscope::test
