// The trainer: loss falls, interrupted runs resume to the same losses, tokenizer training, corpus errors,
// and modscope-train interrupted with SIGINT and resumed.
#include <QDir>
#include <QFile>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>
#include <csignal>
#include <fstream>

#include "modscope/trainer.h"
#include "bad_files.h"
#include "test_support.h"

using namespace modscope;

namespace {

std::string writeCorpus(const QTemporaryDir& dir, const char* name, const std::string& text) {
    const auto path = QDir(dir.path()).filePath(name).toStdString();
    std::ofstream(path, std::ios::binary) << text;
    return path;
}

TrainOptions tinyOptions(const std::string& corpus, const std::string& out) {
    TrainOptions o;
    o.corpus_files = {corpus};
    o.out_dir = out;
    o.config = test::tinyConfig();
    o.config.vocab_size = 300;
    o.config.max_seq_len = 64;
    o.steps = 40;
    o.batch_tokens = 512;
    o.seq_lens = {32, 64};
    o.lr = 3e-3;
    o.warmup_steps = 5;
    o.eval_every = 0;
    o.eval_windows = 8;
    o.checkpoint_every = 0;
    o.device = "cpu";
    return o;
}

// The (step, loss) pairs of a train_log.jsonl.
std::vector<std::pair<int, double>> losses(const std::string& out_dir) {
    QFile f(QDir(QString::fromStdString(out_dir)).filePath("train_log.jsonl"));
    if (!f.open(QIODevice::ReadOnly)) return {};
    std::vector<std::pair<int, double>> out;
    for (const auto& line : f.readAll().split('\n')) {
        const auto o = QJsonDocument::fromJson(line).object();
        if (o.contains("loss")) out.emplace_back(o["step"].toInt(), o["loss"].toDouble());
    }
    return out;
}

void expectCorpusError(const std::vector<std::string>& files, const QString& fragment) {
    try {
        Corpus::fromFiles(files, 0.05);
        QFAIL("a bad corpus was accepted");
    } catch (const Error& e) {
        QVERIFY2(QString(e.what()).contains(fragment), e.what());
    }
}

}  // namespace

class TrainerTest : public QObject {
    Q_OBJECT

    QTemporaryDir dir_;
    std::string corpus_;

private Q_SLOTS:
    void initTestCase() { corpus_ = writeCorpus(dir_, "corpus.txt", test::syntheticCorpus(300000, 3)); }

    void lossFallsAndTokenizerIsTrained() {
        const auto out = QDir(dir_.path()).filePath("run").toStdString();
        auto o = tinyOptions(corpus_, out);
        Trainer trainer(o);
        std::vector<double> seen;
        const auto last = trainer.run([&](const TrainProgress& p) {
            if (p.message.empty()) seen.push_back(p.loss);
        });
        QCOMPARE(int(seen.size()), 40);
        const double first = (seen[0] + seen[1] + seen[2]) / 3, end = (seen[37] + seen[38] + seen[39]) / 3;
        QVERIFY2(end < first - 1.0, qPrintable(QString("loss %1 -> %2").arg(first).arg(end)));
        QVERIFY(last.has_eval || last.message == "done");

        // The run left a complete model directory behind, with the tokenizer trained on the corpus.
        auto model = Model::open(out, "cpu");
        const std::string text = "the routing layer said unto them, 1999 rivers!\nand the house";
        QCOMPARE(model->tokenizer()->decode(model->tokenizer()->encodeIds(text)), text);
        QVERIFY(QFile::exists(QString::fromStdString(out + "/train_log.jsonl")));
        QCOMPARE(int(losses(out).size()), 40);
    }

    void resumeReproducesTheUninterruptedRun() {
        const auto whole = QDir(dir_.path()).filePath("whole").toStdString();
        const auto split = QDir(dir_.path()).filePath("split").toStdString();
        auto o = tinyOptions(corpus_, whole);
        o.steps = 24;
        o.calibrate_threshold = false;
        const auto whole_last = Trainer(o).run({});

        o.out_dir = split;
        std::atomic<bool> stop{false};
        Trainer(o).run([&](const TrainProgress& p) {
            if (p.step == 10) stop = true;
        }, &stop);
        QCOMPARE(int(losses(split).size()), 10);
        o.resume = true;
        const auto split_last = Trainer(o).run({});
        // The FLOPs spent carry over too (the budget of a --flops-budget run is counted in them).
        QVERIFY2(std::abs(split_last.train_flops - whole_last.train_flops) <= 1e-9 * whole_last.train_flops,
                 qPrintable(QString("%1 vs %2").arg(split_last.train_flops).arg(whole_last.train_flops)));

        const auto a = losses(whole), b = losses(split);
        QCOMPARE(a.size(), b.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
            QCOMPARE(b[i].first, a[i].first);
            QVERIFY2(std::abs(a[i].second - b[i].second) <= 1e-5 * std::abs(a[i].second),
                     qPrintable(QString("step %1: %2 vs %3").arg(a[i].first).arg(a[i].second).arg(b[i].second)));
        }
        auto ma = Model::open(whole, "cpu"), mb = Model::open(split, "cpu");
        const auto ids = test::randomIds(20, ma->config().vocab_size, 1);
        QCOMPARE(ma->run(ids).logits, mb->run(ids).logits);
    }

    void denseBaselineHasNoRoutedLayers() {
        const auto out = QDir(dir_.path()).filePath("dense").toStdString();
        auto o = tinyOptions(corpus_, out);
        o.steps = 3;
        o.dense = true;
        Trainer(o).run({});
        auto model = Model::open(out, "cpu");
        QVERIFY(model->config().routed_layers.empty());
        QCOMPARE(model->config().capacity, 1.0);
    }

    void flopsBudgetSetsTheSteps() {
        const auto out = QDir(dir_.path()).filePath("budget").toStdString();
        auto o = tinyOptions(corpus_, out);
        o.seq_lens = {64};
        o.dense = true;
        auto dense_cfg = o.config;
        dense_cfg.routed_layers.clear();
        dense_cfg.capacity = 1.0;
        o.flops_budget = 5.5 * trainStepFlops(dense_cfg, 64, o.batch_tokens);
        const auto last = Trainer(o).run({});
        QCOMPARE(last.step, std::int64_t(6));  // ceil(5.5)
    }

    // A mixture's steps cost what its experts ran: with a capacity factor that leaves tokens over, fewer FLOPs
    // than planned, so the run tops up at the final learning rate until it has spent the budget (and not a
    // step more); the load-balancing loss is logged.
    void mixtureRunSpendsItsWholeBudget() {
        const auto out = QDir(dir_.path()).filePath("mixture-budget").toStdString();
        auto o = tinyOptions(corpus_, out);
        o.seq_lens = {64};
        o.dense = true;
        o.config.moe_layers = {1, 3};
        o.config.n_experts = 4;
        o.config.expert_capacity_factor = 0.5;  // half the tokens at most: the plan expects all of them
        auto cfg = o.config;
        cfg.routed_layers.clear();
        cfg.capacity = 1.0;
        const double step_flops = trainStepFlops(cfg, 64, o.batch_tokens);
        o.flops_budget = 4.0 * step_flops;
        const auto last = Trainer(o).run({});
        QVERIFY2(last.train_flops >= o.flops_budget, qPrintable(QString::number(last.train_flops / o.flops_budget)));
        QVERIFY(last.step > 4);  // planned: 4
        // Not a step more than needed: one step fewer fell short.
        const auto log = losses(out);
        QCOMPARE(int(log.size()), int(last.step));
        QFile f(QDir(QString::fromStdString(out)).filePath("train_log.jsonl"));
        QVERIFY(f.open(QIODevice::ReadOnly));
        double before_last = 0.0;
        bool balance = false;
        for (const auto& line : f.readAll().split('\n')) {
            const auto j = QJsonDocument::fromJson(line).object();
            if (j.isEmpty() || j.contains("calibrated")) continue;
            balance = balance || j.contains("balance_loss");
            if (j["step"].toInt() == last.step - 1) before_last = j["train_flops"].toDouble();
        }
        QVERIFY(balance);
        QVERIFY2(before_last < o.flops_budget, qPrintable(QString::number(before_last / o.flops_budget)));
    }

    // --calibrate-causal: every candidate measured at every length, the best worst case written into the
    // checkpoint's config. A predictor that wants every token scores capacity-level accuracy alone; the
    // budget feedback and the prefix top-k are what rescue it, so the choice is not the default rule.
    void causalRuleCalibrationPicksTheBestWorstCase() {
        const auto trained = QDir(dir_.path()).filePath("calibrate-src").toStdString();
        auto o = tinyOptions(corpus_, trained);
        o.steps = 3;
        Trainer(o).run({});
        auto model = Model::open(trained, "cpu");
        {
            torch::NoGradGuard guard;
            for (auto& block : internals(*model).net->blocks)
                if (block->routed) block->predictor->fc2->bias.fill_(20.0f);
        }
        const auto out = QDir(dir_.path()).filePath("calibrate").toStdString();
        model->save(out);

        const auto c = calibrateCausalRule(out, {corpus_}, o.val_fraction, {16, 32, 4096}, {0.0, 2.0}, 8, "cpu");
        QCOMPARE(c.lengths, (std::vector<int>{16, 32}));  // 4096 is beyond max_seq_len
        QCOMPARE(int(c.trials.size()), 4);
        QVERIFY(c.chosen != nullptr);
        for (const auto& t : c.trials) {
            QCOMPARE(int(t.worst_accuracy.size()), 2);
            QVERIFY(t.worst() <= c.chosen->worst());
        }
        // Gain 0 without the prefix top-k processes everything: accuracy = capacity.
        QVERIFY2(std::abs(c.trials[0].worst() - o.config.capacity) < 0.02, qPrintable(QString::number(c.trials[0].worst())));
        QVERIFY(c.chosen->worst() > 0.6);
        const auto reopened = Model::open(out, "cpu");
        QCOMPARE(reopened->config().predictor_budget_gain, c.chosen->gain);
        QCOMPARE(reopened->config().predictor_prefix_topk, c.chosen->prefix_topk);

        // A dense model has nothing to tune.
        const auto dense = QDir(dir_.path()).filePath("dense-calibrate").toStdString();
        o.out_dir = dense;
        o.dense = true;
        Trainer(o).run({});
        try {
            calibrateCausalRule(dense, {corpus_}, o.val_fraction, {16}, {0.0}, 8, "cpu");
            QFAIL("a dense model was calibrated");
        } catch (const Error& e) {
            QVERIFY2(std::string(e.what()).find("dense model") != std::string::npos, e.what());
        }
    }

    // count_forced is a lower bound of the disagreements, reached when the predictor selects every token.
    void evaluationCountsTheForcedDisagreements() {
        auto model = Model::create(test::tinyConfig(), 4, "cpu");
        const auto ids = test::randomIds(4000, model->config().vocab_size, 9);
        const auto some = evaluate(*model, ids, 32, 16);
        QVERIFY(!some.layers.empty());
        for (const auto& l : some.layers) {
            QVERIFY(l.count_forced >= 0);
            QVERIFY(l.count_forced <= l.agreement.fp + l.agreement.fn);
        }
        {
            torch::NoGradGuard guard;
            for (auto& block : internals(*model).net->blocks)
                if (block->routed) block->predictor->fc2->bias.fill_(100.0f);
        }
        const auto all = evaluate(*model, ids, 32, 16);
        const int k = capacityToK(model->config().capacity, 32);
        for (const auto& l : all.layers) {
            QCOMPARE(l.agreement.fn, std::int64_t(0));
            QCOMPARE(l.count_forced, std::int64_t(16) * (32 - k));
            QCOMPARE(l.count_forced, l.agreement.fp);
            QCOMPARE(l.countForcedShare(), 1.0);
        }
    }

    void badCorporaAreRefused() {
        expectCorpusError({QDir(dir_.path()).filePath("nope.txt").toStdString()}, "no such corpus file");
        expectCorpusError({writeCorpus(dir_, "empty.txt", "")}, "empty");
        expectCorpusError({writeCorpus(dir_, "blank.txt", " \n\n\t")}, "empty");
        expectCorpusError({writeCorpus(dir_, "latin1.txt", "caf\xe9 au lait\n")}, "not UTF-8");
        expectCorpusError({writeCorpus(dir_, "latin1.txt", "caf\xe9 au lait\n")}, "byte offset 3");
        expectCorpusError({writeCorpus(dir_, "overlong.txt", "ab\xc0\xafz\n")}, "not UTF-8");
        expectCorpusError({writeCorpus(dir_, "surrogate.txt", "x\xed\xa0\x80y\n")}, "not UTF-8");
        expectCorpusError({}, "no corpus");
        // Valid UTF-8 of every width is accepted, and the held-out part is the file's tail.
        const auto ok = Corpus::fromFiles({writeCorpus(dir_, "ok.txt", "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\nline two\nthree\n")}, 0.3);
        QCOMPARE(ok.val_text, std::string("three\n"));
        QCOMPARE(ok.train_text + ok.val_text, std::string("a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\nline two\nthree\n"));
    }

    // The command line: SIGINT mid-run saves a checkpoint and exits 130; --resume finishes the run with the
    // losses of a run never stopped.
    // `modscope-train --evaluate` on each bad checkpoint of tests/bad_files.cpp: exit 1 and one line on
    // stderr that names the problem.
    void cliEvaluateRefusesBadCheckpoints() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const auto good = QDir(dir_.path()).filePath("eval-good").toStdString();
        test::makeCheckpoint(good);
        const auto parent = QDir(dir_.path()).filePath("eval-bad");
        QDir().mkpath(parent);
        const auto bad = badfiles::makeBadCheckpoints(good, parent.toStdString());
        const QString exe = QStringLiteral(MODSCOPE_BIN_DIR "/modscope-train");
        for (const auto& b : bad) {
            QProcess p;
            p.start(exe, {"--evaluate", QString::fromStdString(b.path), "--corpus", QString::fromStdString(corpus_),
                          "--device", "cpu"});
            QVERIFY(p.waitForFinished(60000));
            const QString err = QString::fromUtf8(p.readAllStandardError());
            const QString what = QString::fromStdString(b.name) + " -> " + err;
            QVERIFY2(p.exitStatus() == QProcess::NormalExit && p.exitCode() == 1, qPrintable(what));
            QVERIFY2(err.startsWith("modscope-train: ") && err.contains(QString::fromStdString(b.expected)), qPrintable(what));
            QVERIFY2(err.count('\n') == 1 && err.endsWith('\n'), qPrintable(what));
        }
    }

    void cliInterruptAndResume() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const QString exe = QStringLiteral(MODSCOPE_BIN_DIR "/modscope-train");
        const auto base = QStringList{"--corpus", QString::fromStdString(corpus_), "--vocab", "300", "--d-model", "32",
                                      "--layers", "4", "--heads", "2", "--d-ff", "64", "--max-seq-len", "64",
                                      "--seq-lens", "64", "--batch-tokens", "256", "--steps", "400",
                                      "--eval-every", "0", "--checkpoint-every", "0", "--no-calibrate",
                                      "--device", "cpu"};
        const auto whole = QDir(dir_.path()).filePath("cli-whole"), split = QDir(dir_.path()).filePath("cli-split");
        QProcess p;
        p.start(exe, base + QStringList{"--out", whole});
        QVERIFY(p.waitForFinished(300000));
        QCOMPARE(p.exitCode(), 0);

        p.start(exe, base + QStringList{"--out", split});
        QVERIFY(p.waitForStarted());
        // Interrupt once training is under way.
        for (int i = 0; i < 1200 && losses(split.toStdString()).size() < 20; ++i) QTest::qWait(25);
        ::kill(static_cast<pid_t>(p.processId()), SIGINT);
        QVERIFY(p.waitForFinished(120000));
        const QString stopped_err = QString::fromUtf8(p.readAllStandardError());
        // A crash reports the signal as exitCode(): say which, with what the program printed.
        QVERIFY2(p.exitStatus() == QProcess::NormalExit && p.exitCode() == 130,
                 qPrintable(QString("%1 %2: %3").arg(p.exitStatus() == QProcess::NormalExit ? "exit" : "signal")
                                .arg(p.exitCode()).arg(stopped_err.right(400))));
        QVERIFY(stopped_err.contains("resume with --resume"));
        const auto stopped_at = losses(split.toStdString()).size();
        QVERIFY(stopped_at >= 20 && stopped_at < 400);

        p.start(exe, base + QStringList{"--out", split, "--resume"});
        QVERIFY(p.waitForFinished(300000));
        QCOMPARE(p.exitCode(), 0);
        QVERIFY(QString::fromUtf8(p.readAllStandardError()).contains(QString("resumed at step %1").arg(stopped_at)));
        const auto a = losses(whole.toStdString()), b = losses(split.toStdString());
        QCOMPARE(a.size(), std::size_t(400));
        QCOMPARE(b.size(), a.size());
        for (std::size_t i = 0; i < a.size(); ++i)
            QVERIFY2(std::abs(a[i].second - b[i].second) <= 1e-5 * std::abs(a[i].second), qPrintable(QString::number(i)));

        p.start(exe, QStringList{"--out", split, "--corpus", QDir(dir_.path()).filePath("missing.txt")});
        QVERIFY(p.waitForFinished(60000));
        QCOMPARE(p.exitCode(), 1);
        QVERIFY(QString::fromUtf8(p.readAllStandardError()).contains("missing.txt: no such corpus file"));
    }
};

MODSCOPE_ENGINE_TEST_MAIN(TrainerTest)
#include "trainer_test.moc"
