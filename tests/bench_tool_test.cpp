// modscope-bench must not rot: a --quick run of its cheap sections on a tiny fixture model exits 0 and
// writes JSON with every required field, positive times, and ideal speed-ups that follow the engine's
// FLOP count (recomputed here from forwardFlops). This checks the tool, not the machine's speed.
#include <QFile>
#include <QMap>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>
#include <QThread>
#include <algorithm>
#include <cmath>

#include "app_fixture.h"
#include "modscope/engine.h"

using namespace modscope;

namespace {

constexpr int kTimeoutMs = 240000;
const QString kBench = QStringLiteral(MODSCOPE_BIN_DIR "/modscope-bench");

}  // namespace

class BenchToolTest : public QObject {
    Q_OBJECT
private:
    QTemporaryDir tmp_;
    QString model_dir_;
    ModelConfig config_;

    int runBench(const QStringList& args, QByteArray* err = nullptr) {
        QProcess p;
        p.start(kBench, args);
        if (!p.waitForFinished(kTimeoutMs)) {
            p.kill();
            p.waitForFinished();
            return -1;
        }
        if (err) *err = p.readAllStandardError();
        return p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
    }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(tmp_.isValid());
        model_dir_ = tmp_.filePath(QStringLiteral("model"));
        apptest::FixtureOptions o;
        o.max_seq_len = 128;  // so the T = 128 rows of the forward, MoD and routing sections run
        apptest::writeFixtureModel(model_dir_.toStdString(), o);
        QFile f(model_dir_ + QStringLiteral("/config.json"));
        QVERIFY(f.open(QIODevice::ReadOnly));
        config_ = ModelConfig::fromJson(f.readAll().toStdString());
    }

    void quickRunWritesRequiredFields() {
        const QString json_path = tmp_.filePath(QStringLiteral("bench.json"));
        const QString md_path = tmp_.filePath(QStringLiteral("bench.md"));
        QByteArray err;
        const int code = runBench(
            {QStringLiteral("--model"), model_dir_, QStringLiteral("--quick"), QStringLiteral("--sections"),
             QStringLiteral("forward,mod,mixtures,interventions,stats,layers,generation,peak,routing,reference"), QStringLiteral("--json"),
             json_path, QStringLiteral("--markdown"), md_path},
            &err);
        QVERIFY2(code == 0, err.constData());

        QFile f(json_path);
        QVERIFY(f.open(QIODevice::ReadOnly));
        QJsonParseError perr;
        const QJsonObject j = QJsonDocument::fromJson(f.readAll(), &perr).object();
        QCOMPARE(perr.error, QJsonParseError::NoError);

        const QJsonObject m = j[QStringLiteral("machine")].toObject();
        QVERIFY(!m[QStringLiteral("cpu")].toString().isEmpty());
        QVERIFY(m[QStringLiteral("cores")].toInt() > 0);
        QVERIFY(!m[QStringLiteral("libtorch")].toString().isEmpty());
        QVERIFY(!m[QStringLiteral("blas")].toString().isEmpty());
        QVERIFY(m[QStringLiteral("torch_threads")].toInt() > 0);

        const QJsonArray forward = j[QStringLiteral("forward")].toArray();
        QVERIFY(!forward.isEmpty());
        for (const auto& v : forward)
            QVERIFY(v.toObject()[QStringLiteral("ms")].toObject()[QStringLiteral("median")].toDouble() > 0);

        // The mixtures section: five variants and staged MoDE against the plain mixture, at T = 128; FLOPs
        // fall from dense to MoE (overflow only) to integrated MoDE (no-ops) and from MoE to staged MoDE.
        const QJsonArray mixtures = j[QStringLiteral("mixtures")].toArray();
        QCOMPARE(mixtures.size(), 6);
        QMap<QString, double> ratio;
        for (const auto& v : mixtures) {
            const QJsonObject r = v.toObject();
            QCOMPARE(r[QStringLiteral("seq_len")].toInt(), 128);
            // Each variant row was timed (its repetitions counted); the staged-over-moe row is a ratio.
            if (r[QStringLiteral("variant")].toString() != QStringLiteral("mode-staged over moe"))
                QVERIFY(r[QStringLiteral("ms")].toObject()[QStringLiteral("n")].toInt() > 0);
            ratio[r[QStringLiteral("variant")].toString()] = r[QStringLiteral("flops_ratio_to_dense")].toDouble();
        }
        QCOMPARE(ratio[QStringLiteral("dense")], 1.0);
        QVERIFY(ratio[QStringLiteral("moe")] < 1.05);  // the expert router costs a little, overflow saves some
        QVERIFY(ratio[QStringLiteral("mode-integrated")] < ratio[QStringLiteral("moe")]);
        QVERIFY(ratio[QStringLiteral("mode-staged")] < ratio[QStringLiteral("mod")] + 0.05);
        QVERIFY(ratio[QStringLiteral("mod")] < 0.8);

        // The interventions section: both modes at T = 128 (512 is beyond this model), each map timed and
        // covering every routed cell.
        const QJsonArray interventions = j[QStringLiteral("interventions")].toArray();
        QCOMPARE(interventions.size(), 2);
        for (const auto& v : interventions) {
            const QJsonObject r = v.toObject();
            QCOMPARE(r[QStringLiteral("cells")].toInt(), int(config_.routed_layers.size()) * 128);
            QVERIFY(r[QStringLiteral("decision_value_map_ms")].toObject()[QStringLiteral("n")].toInt() > 0);
            QVERIFY(r[QStringLiteral("token_loss_run_ms")].toObject()[QStringLiteral("n")].toInt() > 0);
        }

        // The stats section: both modes counted tokens at some rate.
        const QJsonArray stats = j[QStringLiteral("stats")].toArray();
        QCOMPARE(stats.size(), 2);
        for (const auto& v : stats) {
            QVERIFY(v.toObject()[QStringLiteral("tokens")].toInt() > 0);
            QVERIFY(v.toObject()[QStringLiteral("tokens_per_second")].toDouble() > 0);
        }

        const QJsonArray mod = j[QStringLiteral("mod_vs_dense")].toArray();
        QCOMPARE(mod.size(), 4);  // T = 128 (512 is beyond this model) × four capacities
        for (const auto& v : mod) {
            const QJsonObject r = v.toObject();
            const int T = r[QStringLiteral("seq_len")].toInt();
            const double capacity = r[QStringLiteral("capacity")].toDouble();
            const double dense_ms = r[QStringLiteral("dense_ms")].toDouble(),
                         mod_ms = r[QStringLiteral("mod_ms")].toDouble();
            QCOMPARE(T, 128);
            QVERIFY(capacity > 0 && capacity <= 1);
            QVERIFY(dense_ms > 0 && mod_ms > 0);
            // The speed-up is the median of the repetitions' paired ratios; the ratio of medians beside it.
            const double speedup = r[QStringLiteral("speedup")].toDouble();
            const QJsonObject paired = r[QStringLiteral("speedup_paired")].toObject();
            QCOMPARE(speedup, paired[QStringLiteral("median")].toDouble());
            QVERIFY(paired[QStringLiteral("min")].toDouble() <= speedup &&
                    speedup <= paired[QStringLiteral("max")].toDouble());
            QCOMPARE(paired[QStringLiteral("n")].toInt(),
                     r[QStringLiteral("mod")].toObject()[QStringLiteral("n")].toInt());
            QVERIFY(std::abs(r[QStringLiteral("speedup_of_medians")].toDouble() - dense_ms / mod_ms) <
                    1e-9 * dense_ms / mod_ms);
            QCOMPARE(r[QStringLiteral("mod_spread_ms")].toArray().size(), 2);
            // Each forward timed twice a repetition: right after the other one ran, and again.
            const auto median = [&](const char* key) {
                return r[QLatin1String(key)].toObject()[QStringLiteral("median")].toDouble();
            };
            QCOMPARE(median("mod"), mod_ms);
            QCOMPARE(r[QStringLiteral("mod")].toObject()[QStringLiteral("n")].toInt(),
                     r[QStringLiteral("mod_after_switch")].toObject()[QStringLiteral("n")].toInt());
            QVERIFY(median("dense_after_switch") > 0 && median("mod_after_switch") > 0);
            // Paired as well: within what any pair of those samples can give.
            const auto bound = [&](const char* key, const char* end) {
                return r[QLatin1String(key)].toObject()[QLatin1String(end)].toDouble();
            };
            const double switched = r[QStringLiteral("speedup_after_switch")].toDouble();
            QVERIFY(switched >= bound("dense_after_switch", "min") / bound("mod_after_switch", "max") &&
                    switched <= bound("dense_after_switch", "max") / bound("mod_after_switch", "min"));
            // The ideal is the engine's FLOP ratio for this capacity: routed layers process k tokens, and a
            // forward without the per-token trace in top-k mode computes no predictor logit.
            std::vector<int> processed, predictor_rows;
            for (int l = 0; l < config_.n_layers; ++l) {
                processed.push_back(config_.isRouted(l) ? capacityToK(capacity, T) : T);
                predictor_rows.push_back(0);
            }
            const double ideal =
                denseForwardFlops(config_, T, 1) / forwardFlops(config_, T, processed, 1, predictor_rows);
            QVERIFY2(std::abs(r[QStringLiteral("ideal_speedup")].toDouble() - ideal) < 1e-9 * ideal,
                     qPrintable(QStringLiteral("capacity %1: ideal %2, expected %3")
                                    .arg(capacity)
                                    .arg(r[QStringLiteral("ideal_speedup")].toDouble())
                                    .arg(ideal)));
        }

        const double peak = j[QStringLiteral("matmul_peak_gflops")].toDouble();
        const double engine = j[QStringLiteral("engine_gflops")].toDouble();
        QVERIFY(peak > 0);
        QVERIFY(engine > 0 && engine < 2 * peak);

        const QJsonObject ref = j[QStringLiteral("reference_forward_ms")].toObject();
        for (const char* T : {"128", "512", "2048"}) QVERIFY2(ref[QLatin1String(T)].toDouble() > 0, T);

        // Each length's cores probe: its figures, and the verdict they give (no particular state: the VM's
        // vCPUs move, and tests run beside this one).
        const bool two_cpus = QThread::idealThreadCount() >= 2;
        const auto checkCores = [&](const QJsonObject& row) {
            for (const char* key : {"cores_before", "cores_after"}) {
                const QJsonObject c = row[QLatin1String(key)].toObject();
                const double one = c[QStringLiteral("fma_gflops_one_thread")].toDouble();
                const double each = c[QStringLiteral("fma_gflops_each_of_two")].toDouble();
                const double handover = c[QStringLiteral("handover_ns")].toDouble();
                const QString verdict = c[QStringLiteral("verdict")].toString();
                QVERIFY2(one > 0, key);
                if (!two_cpus) {
                    QCOMPARE(verdict, QStringLiteral("single"));
                    continue;
                }
                QVERIFY2(each > 0 && handover > 0, key);
                const QString want = each < 0.7 * one ? "shared" : handover > 150 ? "far" : "near";
                QCOMPARE(verdict, want);
            }
        };
        for (const auto& v : mod) checkCores(v.toObject());
        const QJsonArray reference = j[QStringLiteral("reference")].toArray();
        QCOMPARE(reference.size(), 3);
        for (const auto& v : reference) checkCores(v.toObject());

        // Each layer of both models at T = 128: the tokens each layer's block took, and a time for each.
        const QJsonArray layers = j[QStringLiteral("layers")].toArray();
        QCOMPARE(layers.size(), 1);
        for (const auto& v : layers) {
            const QJsonObject r = v.toObject();
            const int T = r[QStringLiteral("seq_len")].toInt();
            QCOMPARE(T, 128);
            const QJsonArray tokens = r[QStringLiteral("tokens")].toArray();
            const QJsonArray mod_ms = r[QStringLiteral("mod_layer_ms")].toArray();
            const QJsonArray dense_ms = r[QStringLiteral("dense_layer_ms")].toArray();
            QCOMPARE(tokens.size(), config_.n_layers);
            QCOMPARE(mod_ms.size(), config_.n_layers);
            QCOMPARE(dense_ms.size(), config_.n_layers);
            for (int l = 0; l < config_.n_layers; ++l) {
                QCOMPARE(tokens[l].toInt(), config_.isRouted(l) ? capacityToK(config_.capacity, T) : T);
                QVERIFY(mod_ms[l].toDouble() > 0 && dense_ms[l].toDouble() > 0);
            }
            QVERIFY(r[QStringLiteral("mod_forward_ms")].toDouble() > 0 &&
                    r[QStringLiteral("dense_forward_ms")].toDouble() > 0);
            // The embedding and final norm, each forward less its own layers: inside the call, never below 0.
            for (const char* model : {"mod", "dense"}) {
                const double outside =
                    r[QLatin1String(model) + QStringLiteral("_outside_layers_ms")].toDouble();
                QVERIFY2(outside > 0 &&
                             outside < r[QLatin1String(model) + QStringLiteral("_forward_ms")].toDouble(),
                         model);
            }
            checkCores(r);
        }

        // Generation: both models generate every token asked for; the speed-up is the median of the
        // repetitions' own MoD / dense ratios, and MoD's routed layers keep a smaller KV cache.
        const QJsonObject gen = j[QStringLiteral("generation")].toObject();
        const int new_tokens = gen[QStringLiteral("new_tokens")].toInt();
        QCOMPARE(new_tokens,
                 std::min(32, config_.max_seq_len - gen[QStringLiteral("prompt_tokens")].toInt()));
        const QJsonObject gmod = gen[QStringLiteral("mod")].toObject();
        const QJsonObject gdense = gen[QStringLiteral("dense")].toObject();
        for (const QJsonObject& g : {gmod, gdense}) {
            QCOMPARE(g[QStringLiteral("generated")].toInt(), new_tokens);
            QVERIFY(g[QStringLiteral("tokens_per_second")].toDouble() > 0);
        }
        QCOMPARE(gdense[QStringLiteral("kv_cache_share")].toDouble(), 1.0);
        QVERIFY(gmod[QStringLiteral("kv_cache_share")].toDouble() < 1.0);
        const QJsonObject gpaired = gen[QStringLiteral("speedup_paired")].toObject();
        const double gspeedup = gen[QStringLiteral("speedup")].toDouble();
        QCOMPARE(gspeedup, gpaired[QStringLiteral("median")].toDouble());
        QCOMPARE(gpaired[QStringLiteral("n")].toInt(),
                 gmod[QStringLiteral("tokens_per_second_summary")].toObject()[QStringLiteral("n")].toInt());
        QVERIFY(gpaired[QStringLiteral("n")].toInt() >= 5);
        QVERIFY(gpaired[QStringLiteral("min")].toDouble() <= gspeedup &&
                gspeedup <= gpaired[QStringLiteral("max")].toDouble());
        QVERIFY(std::abs(gen[QStringLiteral("speedup_of_medians")].toDouble() -
                         gmod[QStringLiteral("tokens_per_second")].toDouble() /
                             gdense[QStringLiteral("tokens_per_second")].toDouble()) < 1e-9);

        const QJsonArray routing = j[QStringLiteral("routing_cost")].toArray();
        QVERIFY(!routing.isEmpty());
        for (const auto& v : routing) {
            const double share = v.toObject()[QStringLiteral("routing_share")].toDouble();
            QVERIFY(share > 0 && share < 1);
        }

        QFile md(md_path);
        QVERIFY(md.open(QIODevice::ReadOnly));
        const QByteArray text = md.readAll();
        QVERIFY(text.contains("### MoD against dense"));
        QVERIFY(text.contains("### Reference shape"));
    }

    void badCommandLineExitsTwo() {
        QCOMPARE(runBench({QStringLiteral("--sections"), QStringLiteral("nonsense")}), 2);
        QCOMPARE(runBench({QStringLiteral("--bogus")}), 2);
    }
};

QTEST_GUILESS_MAIN(BenchToolTest)
#include "bench_tool_test.moc"
