// Mixture layers (docs/MODEL.md "Mixture layers"): a plain mixture of experts, staged MoDE (a routed layer
// whose MLP is a mixture) and integrated MoDE (no-op choices beside the experts). Capacity, causality, the
// KV cache, checkpoints, FLOPs and the training signals.
#include <QTemporaryDir>
#include <QTest>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>

#include "checkpoint/checkpoint.h"
#include "test_support.h"

using namespace modscope;

namespace {

struct Variant {
    const char* name;
    bool routed;
    int noop;
};
constexpr Variant kVariants[] = {{"mixture of experts", false, 0}, {"staged MoDE", true, 0}, {"integrated MoDE", false, 2}};

void addVariantRows() {
    QTest::addColumn<bool>("routed");
    QTest::addColumn<int>("noop");
    for (const auto& v : kVariants) QTest::newRow(v.name) << v.routed << v.noop;
}

std::unique_ptr<Model> mixtureModel(bool routed, int noop, std::uint64_t seed = 31) {
    auto model = test::createModel(test::tinyMixtureConfig(routed, noop), seed);
    test::spreadExpertRouters(*model);
    if (routed) test::balancePredictors(*model, test::randomIds(64, model->config().vocab_size, 3));
    return model;
}

RunTrace runIds(const Model& model, const std::vector<int>& ids, RoutingMode mode,
                RunOptions::Logits logits = RunOptions::Logits::Last) {
    RunOptions opt;
    opt.mode = mode;
    opt.logits = logits;
    return model.run(ids, opt);
}

}  // namespace

class EngineMixtureTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    // Token j of those reaching a mixture goes to its top choice exactly when that is an expert holding fewer
    // than expertCapacity(j + 1) earlier tokens; no expert ever holds more than the layer's capacity.
    void capacityIsNeverExceededAndFillsInOrder_data() { addVariantRows(); }
    void capacityIsNeverExceededAndFillsInOrder() {
        QFETCH(bool, routed);
        QFETCH(int, noop);
        auto model = mixtureModel(routed, noop);
        const auto& cfg = model->config();
        int overflowed = 0, ran = 0, noops = 0;
        for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            for (const int T : {1, 9, 64, 160}) {
                const auto trace = runIds(*model, test::randomIds(T, cfg.vocab_size, T), mode);
                for (const auto& l : trace.layers) {
                    QCOMPARE(l.moe, cfg.isMoe(l.index));
                    if (!l.moe) {
                        QVERIFY(l.expert.empty());
                        continue;
                    }
                    QCOMPARE(int(l.expert.size()), T);
                    std::vector<int> taken(cfg.n_experts, 0);
                    int j = 0, overflow = 0;
                    for (int t = 0; t < T; ++t) {
                        const int choice = l.expert_choice[t];
                        if (choice < 0) {  // kept out by the MoD router
                            QVERIFY(routed && !l.selected[t]);
                            QCOMPARE(l.expert[t], -1);
                            QVERIFY(std::isnan(l.expert_prob[t]));
                            continue;
                        }
                        QVERIFY(choice < cfg.routerChoices());
                        QVERIFY(l.expert_prob[t] > 0.0f && l.expert_prob[t] <= 1.0f);
                        if (l.expert_runner_up[t] >= 0) QVERIFY(l.expert_runner_up_prob[t] <= l.expert_prob[t]);
                        const int cap = expertCapacity(cfg.expert_capacity_factor, cfg.n_experts, j + 1);
                        const bool expected_run = choice < cfg.n_experts && taken[choice] < cap;
                        QCOMPARE(l.expert[t], expected_run ? choice : -1);
                        if (expected_run) ++taken[choice], ++ran;
                        if (choice >= cfg.n_experts) ++noops;
                        if (choice < cfg.n_experts && !expected_run) ++overflow;
                        ++j;
                    }
                    QCOMPARE(l.expert_overflow, overflow);
                    overflowed += overflow;
                    QCOMPARE(l.expert_capacity, expertCapacity(cfg.expert_capacity_factor, cfg.n_experts, j));
                    for (int e = 0; e < cfg.n_experts; ++e) {
                        QCOMPARE(l.expert_load[e], taken[e]);
                        QVERIFY(l.expert_load[e] <= l.expert_capacity);
                    }
                }
            }
        }
        // The cases exercised every fate.
        QVERIFY(overflowed > 0);
        QVERIFY(ran > 0);
        QCOMPARE(noops > 0, noop > 0);
    }

    // A token whose MLP did not run (a no-op or a full expert) leaves the block with x + a: the MLP adds
    // nothing, not even a rounding.
    void aSkippedMlpPassesTheTokenBitForBit() {
        auto model = mixtureModel(false, 2);
        auto& net = *internals(*model).net;
        torch::InferenceMode guard;
        backend::Use use(*internals(*model).backend);
        auto& block = *net.blocks[1];
        QVERIFY(block.moe);
        const int T = 48;
        const auto& w = net.tok_emb->weight;
        const auto x = torch::randn({1, T, model->config().d_model}, w.options());
        const auto pos = torch::arange(T, w.options().dtype(torch::kLong)).unsqueeze(0);
        nn::MixtureRouting report;
        const auto delta = block.delta(x, pos, net.positions, nullptr, &report);
        const auto a = block.attn(block.attn_norm(x), pos, net.positions);
        int skipped = 0;
        for (int t = 0; t < T; ++t) {
            if (report.expert[0][t].item<std::int64_t>() >= 0) continue;
            ++skipped;
            QVERIFY2(torch::equal(delta[0][t], a[0][t]), qPrintable(QString("token %1").arg(t)));
        }
        QVERIFY(skipped > 0);
    }

    // Staged MoDE: exactly the k tokens MoD's router selects enter the block, and only they reach the experts.
    void stagedMixtureSeesOnlyTheSelectedTokens() {
        auto model = mixtureModel(true, 0);
        for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            const auto trace = runIds(*model, test::randomIds(96, model->config().vocab_size, 5), mode);
            for (const auto& l : trace.layers) {
                if (!l.moe) continue;
                QVERIFY(l.routed);
                int reached = 0;
                for (std::size_t t = 0; t < l.selected.size(); ++t) {
                    QCOMPARE(l.expert_choice[t] >= 0, bool(l.selected[t]));
                    if (l.expert[t] >= 0) QVERIFY(l.selected[t]);
                    reached += l.expert_choice[t] >= 0;
                }
                QCOMPARE(reached, l.processed);
                if (mode == RoutingMode::TopK) QCOMPARE(reached, l.k);
            }
        }
    }

    // Integrated MoDE: attention runs for every token (each full layer's cache holds them all), whatever its
    // MLP did.
    void integratedMixtureAttendsEveryToken() {
        auto model = mixtureModel(false, 2);
        const auto ids = test::randomIds(40, model->config().vocab_size, 8);
        const auto trace = runIds(*model, ids, RoutingMode::Causal);
        auto& net = *internals(*model).net;
        torch::InferenceMode guard;
        backend::Use use(*internals(*model).backend);
        std::vector<nn::LayerKV> kv;
        net.hidden(test::idsTensor(ids), test::causalPrefill(model->config(), kv));
        int noops = 0;
        for (const auto& l : trace.layers) {
            QCOMPARE(l.processed, int(ids.size()));
            QCOMPARE(kv[l.index].length(), std::int64_t(ids.size()));
            for (int t = 0; l.moe && t < int(ids.size()); ++t) {
                QVERIFY(l.expert_choice[t] >= 0);
                noops += l.expertFate(t) == LayerTrace::ExpertFate::NoOp;
            }
        }
        QVERIFY(noops > 0);
    }

    // A later token changes no earlier token's expert, choice or fate (causal mode; a plain or integrated
    // mixture in either mode, since their layers are all full).
    void laterTokensChangeNoEarlierExpert_data() { addVariantRows(); }
    void laterTokensChangeNoEarlierExpert() {
        QFETCH(bool, routed);
        QFETCH(int, noop);
        auto model = mixtureModel(routed, noop);
        const int V = model->config().vocab_size;
        const auto ids = test::randomIds(80, V, 12);
        auto changed = ids;
        const auto tail = test::randomIds(30, V, 13);
        std::copy(tail.begin(), tail.end(), changed.begin() + 50);
        std::vector<int> prefix(ids.begin(), ids.begin() + 50);
        for (const auto mode : {RoutingMode::Causal, RoutingMode::TopK}) {
            if (routed && mode == RoutingMode::TopK) continue;  // top-k itself is not causal
            const auto a = runIds(*model, ids, mode), b = runIds(*model, changed, mode), c = runIds(*model, prefix, mode);
            for (std::size_t li = 0; li < a.layers.size(); ++li) {
                if (!a.layers[li].moe) continue;
                for (int t = 0; t < 50; ++t) {
                    for (const auto* other : {&b, &c}) {
                        const auto& lo = other->layers[li];
                        QCOMPARE(lo.expert[t], a.layers[li].expert[t]);
                        QCOMPARE(lo.expert_choice[t], a.layers[li].expert_choice[t]);
                        if (a.layers[li].expert_choice[t] >= 0)
                            QVERIFY(std::abs(lo.expert_prob[t] - a.layers[li].expert_prob[t]) < 1e-5f);
                    }
                }
            }
        }
    }

    // Generation with the KV cache continues each mixture's count of taken tokens, so its experts and logits
    // are those of a causal forward over the whole sequence (1e-4 on logits, as engine_generation_test).
    void kvCacheMatchesFullRecompute_data() { addVariantRows(); }
    void kvCacheMatchesFullRecompute() {
        QFETCH(bool, routed);
        QFETCH(int, noop);
        auto model = mixtureModel(routed, noop);
        auto& net = *internals(*model).net;
        const int V = model->config().vocab_size;
        const auto prompt = test::randomIds(12, V, 4);
        torch::InferenceMode guard;
        backend::Use use(*internals(*model).backend);
        std::vector<nn::LayerKV> kv;
        const auto fo = test::causalPrefill(model->config(), kv);
        auto logits = net.logits(net.hidden(test::idsTensor(prompt), fo)[0][-1]);
        std::vector<int> seq = prompt;
        std::vector<torch::Tensor> step_logits{logits};
        std::vector<std::vector<nn::MixtureRouting>> step_mixture;
        for (int next : test::randomIds(60, V, 99)) {
            std::vector<std::uint8_t> processed;
            std::vector<float> prob;
            step_mixture.emplace_back();
            logits = net.step(next, static_cast<std::int64_t>(seq.size()), kv, fo.causalRule(), &processed, &prob,
                              &step_mixture.back());
            seq.push_back(next);
            step_logits.push_back(logits);
        }
        const auto full = runIds(*model, seq, RoutingMode::Causal, RunOptions::Logits::All);
        const double worst = test::maxStepLogitGap(step_logits, full, prompt.size(), V);
        QVERIFY2(worst < 1e-4, qPrintable(QString("max |cached - recomputed| = %1").arg(worst)));
        int ran = 0;
        for (std::size_t i = 0; i < step_mixture.size(); ++i) {
            const auto pos = prompt.size() + i;
            for (const auto& l : full.layers) {
                if (!l.moe) continue;
                const auto& m = step_mixture[i][l.index];
                const int expert = m.expert.defined() ? static_cast<int>(m.expert.item<std::int64_t>()) : -1;
                QCOMPARE(expert, l.expert[pos]);
                ran += expert >= 0;
            }
        }
        QVERIFY(ran > 0);

        // Model::generate reports the same experts for its own tokens.
        GenerationOptions g;
        g.max_new_tokens = 20;
        g.temperature = 1.0f;
        g.seed = 3;
        const auto result = model->generate(prompt, g);
        auto all = prompt;
        all.insert(all.end(), result.generated_ids.begin(), result.generated_ids.end());
        const auto again = runIds(*model, all, RoutingMode::Causal);
        for (const auto& step : result.steps)
            for (const auto& l : again.layers)
                QCOMPARE(step.expert[l.index], l.moe ? l.expert[step.position] : -1);
    }

    // A mixture model saves and opens unchanged; as float16 its weights come back as their float16 values.
    void checkpointsRoundTrip_data() {
        QTest::addColumn<bool>("half");
        QTest::newRow("float32") << false;
        QTest::newRow("float16") << true;
    }
    void checkpointsRoundTrip() {
        QFETCH(bool, half);
        QTemporaryDir dir;
        auto tok = Tokenizer::load(test::tinyTokenizerPath());
        auto model = Model::create(test::tinyMixtureConfig(true, 1, tok->vocabSize()), 41, "cpu");
        model->attachTokenizer(std::move(tok));
        test::spreadExpertRouters(*model);
        model->save(dir.path().toStdString(), half);
        auto copy = Model::open(dir.path().toStdString(), "cpu");
        QCOMPARE(copy->config().toJson(), model->config().toJson());
        QCOMPARE(copy->parameterCount(), model->parameterCount());
        const auto theirs = internals(*copy).net->named_parameters();
        for (const auto& p : internals(*model).net->named_parameters()) {
            const auto expected = half ? p.value().to(torch::kFloat16).to(torch::kFloat32) : p.value();
            QVERIFY2(torch::equal(theirs[p.key()], expected), p.key().c_str());
        }
        QVERIFY(internals(*copy).net->blocks[1]->moe);
        QCOMPARE(internals(*copy).net->blocks[1]->mixture->gate_up.size(0), std::int64_t(3));
        if (!half) {
            const auto ids = test::randomIds(50, model->config().vocab_size, 2);
            const auto a = runIds(*model, ids, RoutingMode::TopK), b = runIds(*copy, ids, RoutingMode::TopK);
            QVERIFY(a.logits == b.logits);
            for (std::size_t li = 0; li < a.layers.size(); ++li) QVERIFY(a.layers[li].expert == b.layers[li].expert);
        }
    }

    // The FLOPs count the experts that ran (docs/MODEL.md "FLOPs"): fewer than every token through one.
    void flopsCountOnlyTheExpertsThatRan() {
        auto model = mixtureModel(false, 2);
        const auto& cfg = model->config();
        const int T = 64;
        const auto trace = runIds(*model, test::randomIds(T, cfg.vocab_size, 6), RoutingMode::TopK);
        std::vector<int> processed(cfg.n_layers, T), expert_rows(cfg.n_layers, 0), all_rows(cfg.n_layers, T);
        int ran = 0;
        for (const auto& l : trace.layers)
            for (int load : l.expert_load) expert_rows[l.index] += load, ran += load;
        QVERIFY(ran < 2 * T);
        QCOMPARE(trace.flops, forwardFlops(cfg, T, processed, 1, {}, expert_rows));
        const double skipped_mlp = 2.0 * (2 * T - ran) * 3 * cfg.d_model * cfg.d_ff;
        QCOMPARE(forwardFlops(cfg, T, processed, 1, {}, all_rows) - trace.flops, skipped_mlp);
    }

    // The expert's output is scaled by its router probability, so the language-model loss reaches the
    // router; every expert that ran gets a gradient too.
    void gradientsReachTheExpertRouter_data() { addVariantRows(); }
    void gradientsReachTheExpertRouter() {
        QFETCH(bool, routed);
        QFETCH(int, noop);
        auto model = mixtureModel(routed, noop);
        auto& net = *internals(*model).net;
        backend::Use use(*internals(*model).backend);
        net.train();
        const auto ids = test::idsTensor(test::randomIds(65, model->config().vocab_size, 7));
        nn::ForwardOptions fo;
        fo.capacity = model->config().capacity;
        fo.collect = true;
        std::vector<nn::LayerRouting> routing;
        const auto logits = net.logits(net.hidden(ids.narrow(1, 0, 64), fo, &routing));
        auto loss = torch::nn::functional::cross_entropy(logits.reshape({64, -1}), ids.narrow(1, 1, 64).reshape(-1));
        for (auto& block : net.blocks)
            if (block->moe) loss = loss + 0.01 * routing[block->index].mixture.balance_loss;
        loss.backward();
        for (auto& block : net.blocks) {
            if (!block->moe) continue;
            const auto& g = block->mixture->router->weight.grad();
            QVERIFY(g.defined() && torch::isfinite(g).all().item<bool>());
            QVERIFY(g.abs().sum().item<double>() > 0.0);
            const auto& ge = block->mixture->gate_up.grad();
            QVERIFY(ge.defined());
            for (int e = 0; e < model->config().n_experts; ++e) {
                const bool ran = (routing[block->index].mixture.expert == e).any().item<bool>();
                QCOMPARE(ge[e].abs().sum().item<double>() > 0.0, ran);
            }
        }
    }

    // Switch Transformer's load-balancing loss is `choices` for a perfectly balanced router and larger for a
    // lopsided one; trained alone on a router that favours one choice, it falls towards the balance.
    void balanceLossFallsOnAToyProblem() {
        auto config = test::tinyMixtureConfig(false, 1);
        config.n_experts = 3;
        nn::MixtureMlp mixture(config);
        torch::manual_seed(5);
        {
            torch::NoGradGuard guard;
            mixture->router->weight.normal_(0.0, 0.02);
            mixture->router->weight[0].add_(0.5);  // favours expert 0
        }
        const auto x = torch::randn({4, 32, config.d_model}) + 1.0;  // a shared direction the bias aligns with
        torch::optim::Adam opt({mixture->router->weight}, torch::optim::AdamOptions(0.05));
        const auto balanceLoss = [&] {
            nn::MixtureRouting report;
            mixture->forward(x, nullptr, &report);
            return report.balance_loss;
        };
        const double first = balanceLoss().item<double>();
        QVERIFY2(first > 2.0, qPrintable(QString::number(first)));  // 4 choices: 4 lopsided, 1 balanced
        for (int i = 0; i < 60; ++i) {
            opt.zero_grad();
            auto loss = balanceLoss();
            loss.backward();
            opt.step();
        }
        const double last = balanceLoss().item<double>();
        QVERIFY2(last < 1.3, qPrintable(QString("%1 -> %2").arg(first).arg(last)));
    }

    // What config.json says about mixtures, and what it refuses.
    void configNamesItsMixtures() {
        const auto config = test::tinyMixtureConfig(true, 2);
        const auto json = config.toJson();
        const auto back = ModelConfig::fromJson(json);
        QVERIFY(back.moe_layers == config.moe_layers);
        QCOMPARE(back.n_experts, 3);
        QCOMPARE(back.noop_experts, 2);
        QCOMPARE(back.expert_capacity_factor, 0.75);
        QVERIFY(back.isMoe(3) && !back.isMoe(2));
        // A model without mixtures writes none of the fields: today's checkpoints keep their config.json.
        QVERIFY(test::tinyConfig().toJson().find("moe_layers") == std::string::npos);
        auto bad = config;
        bad.moe_layers = {1, 9};
        QVERIFY_THROWS_EXCEPTION(Error, bad.validate());
        bad = config;
        bad.n_experts = 0;
        QVERIFY_THROWS_EXCEPTION(Error, bad.validate());
        bad = test::tinyConfig();
        bad.n_experts = 4;  // experts without mixture layers
        QVERIFY_THROWS_EXCEPTION(Error, bad.validate());
        // Parameters: each mixture adds (E - 1) MLPs and a router row per choice.
        const auto dense_mlp = std::int64_t{3} * config.d_ff * config.d_model;
        QCOMPARE(config.parameterCount() - test::tinyConfig().parameterCount(),
                 2 * (2 * dense_mlp + 5 * std::int64_t{config.d_model}));
    }
};

QTEST_GUILESS_MAIN(EngineMixtureTest)
#include "engine_mixture_test.moc"
