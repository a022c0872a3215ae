// Corpus statistics (docs/STATS_FORMAT.md): modscope-stats' counts against a brute-force count over the traced
// runs of the same windows, shards merged against the whole run byte for byte, a stopped run marked partial,
// tables that each sum to their tokens, checkpoints compared, and bad input refused with one line.
#include <QDir>
#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>

#include <csignal>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "modscope/corpus_run.h"
#include "modscope/corpus_stats.h"
#include "test_support.h"
#include "tool_run.h"

using namespace modscope;

namespace {

const QString kStats = QStringLiteral(MODSCOPE_BIN_DIR "/modscope-stats");

std::string readBytes(const QString& path) {
    QFile f(path);
    if (!f.open(QIODevice::ReadOnly)) return {};
    return f.readAll().toStdString();
}

void writeText(const QString& path, const std::string& text) {
    std::ofstream(path.toStdString(), std::ios::binary) << text;
}

}  // namespace

class StatsTest : public QObject {
    Q_OBJECT

    QTemporaryDir tmp_;
    QString model_, model2_, corpus_;
    std::unique_ptr<Model> model_obj_;

    QString path(const QString& name) const { return QDir(tmp_.path()).filePath(name); }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(tmp_.isValid());
        model_ = path("model");
        model2_ = path("model2");
        model_obj_ = test::makeCheckpoint(model_.toStdString(), 7);
        test::balancePredictors(*model_obj_, test::randomIds(64, model_obj_->config().vocab_size, 3));
        model_obj_->save(model_.toStdString());
        test::makeCheckpoint(model2_.toStdString(), 8);
        // A corpus of a folder (two text files, one JSON Lines file) and a file beside it.
        corpus_ = path("corpus");
        QDir().mkpath(corpus_ + "/sub");
        writeText(corpus_ + "/a.txt", test::syntheticCorpus(6000, 1));
        writeText(corpus_ + "/sub/b.md", test::syntheticCorpus(3000, 2));
        writeText(corpus_ + "/c.jsonl", nlohmann::json{{"text", "The first record. 42 of them!"}}.dump() + "\n\n" +
                                            nlohmann::json{{"text", test::syntheticCorpus(800, 3)}}.dump() + "\n");
        writeText(corpus_ + "/ignored.bin", "\xff\xfe");
        writeText(path("d.txt"), test::syntheticCorpus(2000, 4));
    }

    // Every count equals one made by hand from the traced runs of the same windows.
    void countsEqualABruteForceCount() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const auto run = test::runTool(kStats, {"--model", model_, "--window", "40", "--out", path("all.json"), "--quiet",
                                                corpus_, path("d.txt")});
        QVERIFY2(run.code == 0, qPrintable(run.err));
        const auto stats = loadStats(path("all.json").toStdString());
        QVERIFY(!stats.partial);

        const auto& cfg = model_obj_->config();
        std::map<std::pair<int, int>, std::int64_t> id_tokens, id_processed;  // (layer, id)
        std::map<std::pair<int, int>, std::int64_t> class_processed, position_processed;
        std::map<std::pair<int, int>, std::int64_t> both;
        std::vector<std::int64_t> paths(std::size_t(1) << cfg.routed_layers.size(), 0);
        std::int64_t tokens = 0, windows = 0, agree = 0;
        std::int64_t next = 0;
        for (const auto& file : corpusFiles({corpus_.toStdString(), path("d.txt").toStdString()}))
            for (const auto& doc : corpusDocuments(file))
                for (const auto& w : documentWindows(*model_obj_->tokenizer(), doc, 40, next)) {
                    const auto trace = model_obj_->run(w.ids);
                    ++windows;
                    for (std::size_t t = 0; t < w.ids.size(); ++t) {
                        ++tokens;
                        unsigned mask = 0;
                        for (std::size_t r = 0; r < cfg.routed_layers.size(); ++r) {
                            const auto& l = trace.layers[std::size_t(cfg.routed_layers[r])];
                            const int cls = int(classifyPiece(model_obj_->tokenizer()->piece(w.ids[t])));
                            ++id_tokens[{l.index, w.ids[t]}];
                            agree += l.predictor_selected[t] == l.topk_selected[t] ? 1 : 0;
                            if (!l.selected[t]) continue;
                            mask |= 1u << r;
                            ++id_processed[{l.index, w.ids[t]}];
                            ++class_processed[{l.index, cls}];
                            ++position_processed[{l.index, int(t)}];
                        }
                        ++paths[mask];
                        for (std::size_t i = 0; i < cfg.routed_layers.size(); ++i)
                            for (std::size_t j = 0; j < cfg.routed_layers.size(); ++j)
                                both[{int(i), int(j)}] += (mask >> i & 1u) && (mask >> j & 1u) ? 1 : 0;
                    }
                }
        QCOMPARE(stats.windows, windows);
        QCOMPARE(stats.tokens, tokens);
        QVERIFY(windows > 10);
        std::int64_t agree_stats = 0;
        for (const auto& l : stats.layers) {
            agree_stats += l.predictor.tp + l.predictor.tn;
            for (int id = 0; id < cfg.vocab_size; ++id) {
                QCOMPARE(l.id_tokens[std::size_t(id)], (id_tokens.count({l.index, id}) ? id_tokens[{l.index, id}] : 0));
                QCOMPARE(l.id_processed[std::size_t(id)], (id_processed.count({l.index, id}) ? id_processed[{l.index, id}] : 0));
            }
            for (int c = 0; c < kTokenClasses; ++c)
                QCOMPARE(l.class_processed[std::size_t(c)], (class_processed.count({l.index, c}) ? class_processed[{l.index, c}] : 0));
            for (int p = 0; p < 40; ++p)
                QCOMPARE(l.position_processed[std::size_t(p)],
                         (position_processed.count({l.index, p}) ? position_processed[{l.index, p}] : 0));
        }
        QCOMPARE(agree_stats, agree);
        QCOMPARE(stats.depth_paths, paths);
        for (std::size_t i = 0; i < stats.co_selected.size(); ++i)
            for (std::size_t j = 0; j < stats.co_selected.size(); ++j)
                QCOMPARE(stats.co_selected[i][j], (both[{int(i), int(j)}]));
        // The ignored .bin file is not part of the corpus; the JSON Lines records are two documents.
        QCOMPARE(int(corpusFiles({corpus_.toStdString()}).size()), 3);
        QCOMPARE(int(corpusDocuments((corpus_ + "/c.jsonl").toStdString()).size()), 2);
        // An example context marks its token.
        int contexts = 0;
        for (const auto& list : stats.examples)
            for (const auto& e : list) contexts += e.context.find("\xe2\x9f\xa6") != std::string::npos ? 1 : 0;
        QVERIFY(contexts > 50);
    }

    // Three shards merged are the whole run, byte for byte; a missing shard is refused.
    void shardsMergeIntoTheWholeRun() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const QStringList common = {"--model", model_, "--window", "32", "--mode", "causal", "--quiet", corpus_};
        QCOMPARE(test::runTool(kStats, common + QStringList{"--out", path("whole.json"), "--csv", path("whole-csv")}).code, 0);
        QStringList parts;
        for (int i = 1; i <= 3; ++i) {
            const QString out = path(QStringLiteral("part%1.json").arg(i));
            const auto r = test::runTool(kStats, common + QStringList{"--shard", QStringLiteral("%1/3").arg(i), "--out", out});
            QVERIFY2(r.code == 0, qPrintable(r.err));
            parts << out;
        }
        QVERIFY(readBytes(parts[0]) != readBytes(path("whole.json")));
        const auto merged = test::runTool(kStats, QStringList{"--merge"} + parts + QStringList{"--out", path("merged.json"), "--quiet"});
        QVERIFY2(merged.code == 0, qPrintable(merged.err));
        QCOMPARE(readBytes(path("merged.json")), readBytes(path("whole.json")));
        const auto missing = test::runTool(kStats, {"--merge", parts[0], parts[2], "--out", path("bad.json")});
        QCOMPARE(missing.code, 1);
        QVERIFY2(missing.err.contains("shards 2 of 3 are missing"), qPrintable(missing.err));
        // The CSV tables read as plain tables: a header and rows.
        for (const char* name : {"pieces.csv", "classes.csv", "positions.csv", "co_selection.csv", "depth_paths.csv", "histograms.csv"}) {
            const auto text = readBytes(path("whole-csv") + "/" + name);
            QVERIFY2(text.find('\n') != std::string::npos && text.find('\n') + 1 < text.size(), name);
        }
    }

    // Every table of a file sums to the tokens it claims; a count changed by hand is refused.
    void tablesSumToTheirTokens() {
        auto stats = CorpusStats::forModel(model_obj_->config(), std::vector<std::string>(std::size_t(model_obj_->config().vocab_size), "x"),
                                           RoutingMode::TopK, 0.25, 16);
        std::int64_t next = 0;
        for (const auto& w : documentWindows(*model_obj_->tokenizer(), test::syntheticCorpus(1500, 9), 16, next))
            countWindow(*model_obj_, w, RunOptions{}, stats);
        const auto json = statsToJson(stats);
        const auto back = statsFromJson(json);
        QCOMPARE(statsToJson(back), json);
        auto edited = nlohmann::json::parse(json);
        edited["layers"][0]["by_class"]["tokens"][0] = edited["layers"][0]["by_class"]["tokens"][0].get<int>() + 1;
        try {
            statsFromJson(edited.dump());
            QFAIL("a changed count was read");
        } catch (const Error& e) {
            QVERIFY2(QString(e.what()).contains("do not each count"), e.what());
        }
        // Partial parts merge into a partial whole.
        auto other = back;
        other.partial = true;
        auto merged = back;
        merged.merge(other);
        QVERIFY(merged.partial);
        QCOMPARE(merged.tokens, 2 * back.tokens);
    }

    // Ctrl-C stops after the current window and writes what was counted, marked partial.
    void interruptWritesAPartialFile() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const QString big = path("big");
        QDir().mkpath(big);
        for (int i = 0; i < 120; ++i) writeText(big + QStringLiteral("/%1.txt").arg(i, 3, 10, QLatin1Char('0')), test::syntheticCorpus(40000, 100 + i));
        QProcess p;
        p.start(kStats, {"--model", model_, "--window", "64", "--out", path("partial.json"), big});
        QVERIFY(p.waitForStarted());
        // The first progress line (after the first window) says it counts.
        p.setReadChannel(QProcess::StandardError);
        QString err;
        QVERIFY(QTest::qWaitFor(
            [&] {
                p.waitForReadyRead(20);
                err += QString::fromUtf8(p.readAllStandardError());
                return err.contains(QStringLiteral("modscope-stats:"));
            },
            60000));
        ::kill(static_cast<pid_t>(p.processId()), SIGINT);
        QVERIFY(p.waitForFinished(60000));
        QCOMPARE(p.exitCode(), 0);
        const auto stats = loadStats(path("partial.json").toStdString());
        QVERIFY(stats.partial);
        QVERIFY(stats.tokens > 0);
    }

    // Checkpoints of one tokenizer: each one's decisions against the last's; the last matches itself.
    void checkpointsAreComparedWithTheLast() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        const auto r = test::runTool(kStats, {"--window", "32", "--out", path("ckpt.json"), "--quiet", path("d.txt"),
                                              "--checkpoints", model2_, model_});
        QVERIFY2(r.code == 0, qPrintable(r.err));
        const auto stats = loadStats(path("ckpt.json").toStdString());
        QCOMPARE(int(stats.checkpoints.size()), 2);
        for (std::size_t l = 0; l < stats.routed_layers.size(); ++l) {
            QCOMPARE(stats.checkpoints[1].matching[l], stats.checkpoints[1].decisions[l]);
            QCOMPARE(stats.checkpoints[0].decisions[l], stats.tokens);
            QVERIFY(stats.checkpoints[0].matching[l] < stats.checkpoints[0].decisions[l]);  // another seed
        }
    }

    // Bad input: one clear line and exit 1 (2 for the command line).
    void badInputIsRefused() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        writeText(path("latin1.txt"), "caf\xe9\n");
        writeText(path("empty.txt"), "");
        writeText(path("bad.jsonl"), "{\"text\": \"fine\"}\n{\"body\": 3}\n");
        const auto expect = [&](const QStringList& args, int code, const QString& words) {
            const auto r = test::runTool(kStats, args);
            QVERIFY2(r.code == code && r.err.contains(words) && r.err.trimmed().count('\n') == 0,
                     qPrintable(QString::number(r.code) + ": " + r.err));
        };
        const QStringList m = {"--model", model_, "--out", path("x.json")};
        expect(m + QStringList{path("nowhere.txt")}, 1, "no such file or folder");
        expect(m + QStringList{path("latin1.txt")}, 1, "not UTF-8 text (invalid byte at offset 3)");
        expect(m + QStringList{path("empty.txt")}, 1, "the corpus is empty");
        expect(m + QStringList{path("bad.jsonl")}, 1, "line 2: expected an object with a string field \"text\"");
        const QString bundled = QStringLiteral(MODSCOPE_SOURCE_DIR "/resources/models/default");
        expect(m + QStringList{path("d.txt"), "--checkpoints", bundled}, 1, "its tokenizer differs");
        expect({"--model", model_, path("d.txt")}, 2, "--out FILE is required");
        expect(m + QStringList{"--shard", "4/3", path("d.txt")}, 2, "--shard");
    }
};

MODSCOPE_ENGINE_TEST_MAIN(StatsTest)
#include "stats_test.moc"
