// Checkpoints: bit-exact save/load, interchange with Python's torch.load/torch.save, refusal of bad files,
// and the tokenizer and LibTorch working in one process.
#include <QDir>
#include <QFile>
#include <QTemporaryDir>
#include <QTest>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bad_files.h"
#include "checkpoint/checkpoint.h"
#include "file_size_limit.h"
#include "../fuzz/fuzz_checkpoint_config.h"
#include "process_memory.h"
#include "test_support.h"

using namespace modscope;

namespace {

std::string pathIn(const QTemporaryDir& dir, const char* name) { return QDir(dir.path()).filePath(name).toStdString(); }

// Opening dir must fail with a message containing every one of the given fragments.
void expectRefused(const std::string& dir, const QStringList& fragments) {
    try {
        Model::open(dir, "cpu");
        QFAIL("a bad checkpoint was accepted");
    } catch (const Error& e) {
        const QString message = QString::fromUtf8(e.what());
        for (const auto& f : fragments)
            QVERIFY2(message.contains(f), qPrintable("message '" + message + "' does not name '" + f + "'"));
    }
}

// Rewrites weights.pt of dir through Python: the script sees the loaded dict as `d`.
void editWeightsInPython(const std::string& dir, const QString& edit) {
    test::runPython(
        "import sys, torch\n"
        "p = sys.argv[1] + '/weights.pt'\n"
        "d = torch.load(p)\n" +
            edit +
            "\n"
            "torch.save(d, p)\n",
        {QString::fromStdString(dir)});
}

}  // namespace

class CheckpointTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void saveLoadIsBitExact() {
        QTemporaryDir dir;
        auto saved = test::makeCheckpoint(dir.path().toStdString());
        auto loaded = Model::open(dir.path().toStdString(), "cpu");
        QCOMPARE(loaded->config().toJson(), saved->config().toJson());
        auto a = internals(*saved).net->named_parameters();
        auto b = internals(*loaded).net->named_parameters();
        QCOMPARE(a.size(), b.size());
        for (const auto& p : a) QVERIFY2(torch::equal(p.value(), b[p.key()]), p.key().c_str());
        const auto ids = test::randomIds(40, saved->config().vocab_size, 2);
        RunOptions opt;
        opt.logits = RunOptions::Logits::All;
        QCOMPARE(loaded->run(ids, opt).logits, saved->run(ids, opt).logits);
        QCOMPARE(loaded->weightsSha256().size(), std::size_t(64));
        QCOMPARE(loaded->weightsSha256(), saved->weightsSha256());
    }

    void pythonReadsWeights() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString());
        const auto out = test::runPython(
            "import sys, torch\n"
            "d = torch.load(sys.argv[1] + '/weights.pt')\n"
            "assert isinstance(d, dict)\n"
            "for k in sorted(d): print(k, tuple(d[k].shape), str(d[k].dtype), repr(float(d[k].double().sum())))\n",
            {dir.path()});
        const auto lines = out.trimmed().split('\n');
        auto params = internals(*model).net->named_parameters();
        QCOMPARE(lines.size(), qsizetype(params.size()));
        for (const auto& line : lines) {
            const auto name = line.section(' ', 0, 0).toStdString();
            const auto* p = params.find(name);
            QVERIFY2(p != nullptr, name.c_str());
            QVERIFY(line.contains("torch.float32"));
            const double pySum = line.section(' ', -1).toDouble();
            const double cppSum = p->to(torch::kFloat64).sum().item<double>();
            QVERIFY2(std::abs(pySum - cppSum) <= 1e-9 * std::max(1.0, std::abs(cppSum)), name.c_str());
        }
    }

    void loadsADictSavedByPython() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString());
        // torch.save writes the zip format by default: that must load too, with the values Python wrote.
        editWeightsInPython(dir.path().toStdString(), "d['layers.1.router.weight'] = torch.full((1, 32), 0.25)");
        auto loaded = Model::open(dir.path().toStdString(), "cpu");
        QVERIFY(torch::equal(internals(*loaded).net->blocks[1]->router->weight, torch::full({1, 32}, 0.25f)));
        QVERIFY(torch::equal(internals(*loaded).net->tok_emb->weight, internals(*model).net->tok_emb->weight));
    }

    void refusesMissingTensor() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        editWeightsInPython(dir.path().toStdString(), "del d['layers.2.mlp.down.weight']");
        expectRefused(dir.path().toStdString(), {"missing", "layers.2.mlp.down.weight", "weights.pt"});
    }

    void refusesWrongShape() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        editWeightsInPython(dir.path().toStdString(), "d['layers.0.attn.qkv.weight'] = torch.zeros(96, 31)");
        expectRefused(dir.path().toStdString(), {"layers.0.attn.qkv.weight", "[96, 31]", "[96, 32]"});
    }

    void refusesWrongDtypeUnexpectedNamesAndNaN() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        const auto d = dir.path().toStdString();
        editWeightsInPython(d, "d['norm_f.weight'] = d['norm_f.weight'].double()");
        expectRefused(d, {"norm_f.weight", "float32"});
        editWeightsInPython(d, "d['norm_f.weight'] = d['norm_f.weight'].float()\nd['extra.bias'] = torch.zeros(3)");
        expectRefused(d, {"unexpected", "extra.bias"});
        editWeightsInPython(d, "del d['extra.bias']\nd['tok_emb.weight'][3, 4] = float('nan')");
        expectRefused(d, {"tok_emb.weight", "NaN"});
        editWeightsInPython(d, "d['tok_emb.weight'][3, 4] = 0.0");
        QVERIFY(Model::open(d, "cpu") != nullptr);  // and repaired, it opens again
    }

    void refusesBrokenFiles() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        const auto d = dir.path().toStdString();
        const auto weights = pathIn(dir, "weights.pt");
        std::string good;
        {
            std::ifstream in(weights, std::ios::binary);
            good.assign(std::istreambuf_iterator<char>(in), {});
        }
        // A third: too small even for float16 weights; a half is refused by the zip check instead.
        std::ofstream(weights, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 3);
        expectRefused(d, {"weights.pt", "too small"});
        std::ofstream(weights, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 2);
        expectRefused(d, {"weights.pt", "not a readable weights file"});
        std::ofstream(weights, std::ios::binary | std::ios::trunc);
        expectRefused(d, {"weights.pt", "empty"});
        std::ofstream(weights, std::ios::binary | std::ios::trunc) << std::string(5000, '\x37');
        expectRefused(d, {"weights.pt"});
        std::ofstream(weights, std::ios::binary | std::ios::trunc) << good;

        const auto config = pathIn(dir, "config.json");
        std::string cfg;
        {
            std::ifstream in(config);
            cfg.assign(std::istreambuf_iterator<char>(in), {});
        }
        std::ofstream(config, std::ios::trunc) << "{ not json";
        expectRefused(d, {"config.json", "JSON"});
        auto bad = cfg;
        bad.replace(bad.find("\"n_heads\": 2"), 12, "\"n_heads\": -3");
        std::ofstream(config, std::ios::trunc) << bad;
        expectRefused(d, {"config.json", "n_heads"});
        bad = cfg;
        bad.replace(bad.find("\"n_layers\": 4"), 13, "\"n_layers\": 1000000000");
        std::ofstream(config, std::ios::trunc) << bad;
        expectRefused(d, {"n_layers"});
        bad = cfg;
        bad.replace(bad.find("\"vocab_size\": "), 14, "\"vocab_size\": 1");
        std::ofstream(config, std::ios::trunc) << bad;
        expectRefused(d, {"vocab"});
        std::ofstream(config, std::ios::trunc) << cfg;

        std::ofstream(pathIn(dir, "tokenizer.model"), std::ios::trunc) << "this is not a sentencepiece model";
        expectRefused(d, {"tokenizer.model"});
        QFile::remove(QDir(dir.path()).filePath("tokenizer.model"));
        expectRefused(d, {"missing tokenizer.model"});
        expectRefused(pathIn(dir, "no-such-dir"), {"no-such-dir"});
    }

    // Every defect of tests/bad_files.cpp's list: refused with a message that names the file and
    // the problem, and without allocating what a broken config asks for.
    void refusesEveryBadCheckpointInBoundedMemory() {
        QTemporaryDir dir;
        const auto good = pathIn(dir, "good");
        test::makeCheckpoint(good);
        const auto bad = badfiles::makeBadCheckpoints(good, dir.path().toStdString());
        QVERIFY(bad.size() >= 15);
        for (const auto& b : bad) {
            const double rss0 = test::residentMb();
            try {
                Model::open(b.path, "cpu");
                QFAIL(qPrintable(QString::fromStdString(b.name + " was accepted")));
            } catch (const Error& e) {
                const std::string message = e.what();
                QVERIFY2(message.find(b.expected) != std::string::npos,
                         qPrintable(QString::fromStdString(b.name + ": '" + message + "' lacks '" + b.expected + "'")));
                QVERIFY2(message.find(b.path) != std::string::npos, qPrintable(QString::fromStdString(message)));
            }
            const double grown = test::residentMb() - rss0;
            // The huge-model config asks for 8.6 GB of tensors: nothing of the sort may be allocated.
            QVERIFY2(grown < 64.0, qPrintable(QString::fromStdString(b.name) + QString(": +%1 MB").arg(grown)));
        }
        QVERIFY(Model::open(good, "cpu") != nullptr);
    }

    // Each of config.json's fields with an absurd value is refused by the config parser alone.
    void refusesAbsurdConfigs_data() {
        QTest::addColumn<QString>("json");
        QTest::addColumn<QString>("expected");
        const auto base = nlohmann::json::parse(test::tinyConfig().toJson());
        const auto with = [&](nlohmann::json edit) {
            auto j = base;
            j.update(edit);
            return QString::fromStdString(j.dump(2));
        };
        using J = nlohmann::json;
        QTest::newRow("billion layers") << with({{"n_layers", 1000000000}}) << "'n_layers' is 1e+09";
        QTest::newRow("layers as a float") << with({{"n_layers", 1e9}}) << "'n_layers' has the wrong type";
        QTest::newRow("layers beyond int") << with({{"n_layers", 99999999999999LL}}) << "'n_layers' has the wrong type";
        QTest::newRow("negative heads") << with({{"n_heads", -3}}) << "'n_heads' is -3";
        QTest::newRow("zero heads") << with({{"n_heads", 0}}) << "'n_heads' is 0";
        QTest::newRow("heads do not divide") << with({{"n_heads", 3}}) << "d_model (32) is not divisible by n_heads (3)";
        QTest::newRow("odd head dim") << with({{"n_heads", 32}}) << "must be even";
        QTest::newRow("huge vocab") << with({{"vocab_size", 2000000000}}) << "'vocab_size' is 2e+09";
        QTest::newRow("huge context") << with({{"max_seq_len", 1073741824}}) << "'max_seq_len'";
        QTest::newRow("huge model") << with({{"vocab_size", 1000000}, {"d_model", 16384}})
                                    << "parameters is beyond what ModScope opens";
        QTest::newRow("capacity above 1") << with({{"capacity", 1.5}}) << "'capacity' is 1.5";
        QTest::newRow("negative d_ff") << with({{"d_ff", -1}}) << "'d_ff' is -1";
        QTest::newRow("routed layer past the end") << with({{"routed_layers", {1, 9}}}) << "routed layer 9 does not exist";
        QTest::newRow("routed layer twice") << with({{"routed_layers", {1, 1}}}) << "listed twice";
        QTest::newRow("routed layers not an array") << with({{"routed_layers", 3}}) << "must be an array";
        QTest::newRow("name not a string") << with({{"name", J::array()}}) << "'name' has the wrong type";
        QTest::newRow("missing heads") << QString::fromStdString([&] { auto j = base; j.erase("n_heads"); return j.dump(); }())
                                       << "missing field 'n_heads'";
        QTest::newRow("other architecture") << with({{"architecture", "llama"}}) << "'architecture' is \"llama\"";
        QTest::newRow("not an object") << QStringLiteral("[4, 32]") << "expected a JSON object";
        QTest::newRow("deeply nested") << QString(100000, QLatin1Char('[')) << "not valid JSON";
    }

    void refusesAbsurdConfigs() {
        QFETCH(QString, json);
        QFETCH(QString, expected);
        try {
            ModelConfig::fromJson(json.toStdString());
            QFAIL("accepted");
        } catch (const Error& e) {
            QVERIFY2(QString::fromUtf8(e.what()).contains(expected), e.what());
        }
    }

    // A full disk while saving (simulated with RLIMIT_FSIZE, which also binds root): the save fails with a
    // message, the checkpoint saved before is intact, and no temporary file is left.
    void saveOnAFullDiskKeepsTheEarlierCheckpoint() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString());
        const auto before = badfiles::readFile(pathIn(dir, "weights.pt"));
        auto other = Model::create(test::tinyConfig(), 99, "cpu");
        {
            test::FileSizeLimit full(4096);
            try {
                other->save(dir.path().toStdString());
                QFAIL("a save onto a full disk succeeded");
            } catch (const Error& e) {
                QVERIFY2(QString::fromUtf8(e.what()).contains(QStringLiteral("left as it was")), e.what());
            }
        }
        QCOMPARE(badfiles::readFile(pathIn(dir, "weights.pt")), before);
        QCOMPARE(QDir(dir.path()).entryList(QDir::Files | QDir::Hidden).size(), qsizetype(3));
        QCOMPARE(Model::open(dir.path().toStdString(), "cpu")->weightsSha256(), model->weightsSha256());
    }

    // fuzz_checkpoint's first finding: LibTorch's own reader copied past the end of a truncated zip (a heap
    // overflow AddressSanitizer reports; silent garbage otherwise). Every cut of a real weights.pt, and the
    // fuzzer's input itself, must now end in an Error.
    void truncatedZipsAreRefusedWithoutReadingPastTheEnd() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        const auto good = badfiles::readFile(pathIn(dir, "weights.pt"));
        auto model = Model::create(test::tinyConfig(), 1, "cpu");
        for (std::size_t cut : {good.size() - 1, good.size() - 22, good.size() - 100, good.size() - 4096,
                                good.size() * 3 / 4, std::size_t(30), std::size_t(4)}) {
            const auto msg = [&]() -> std::string {
                try {
                    loadWeights(*internals(*model).net, good.substr(0, cut), "weights.pt");
                } catch (const Error& e) {
                    return e.what();
                }
                return {};
            }();
            QVERIFY2(msg.find("not a readable weights file") != std::string::npos,
                     qPrintable(QString("cut at %1: '%2'").arg(cut).arg(msg.c_str())));
        }
        // The fuzzer's config and inputs (fuzz/fuzz_checkpoint.cpp, fuzz/corpus/checkpoint).
        auto fuzz_model = Model::create(fuzz::checkpointSeedConfig(), 1, "cpu");
        const QString corpus = QStringLiteral(MODSCOPE_SOURCE_DIR "/fuzz/corpus/checkpoint/");
        const auto load = [&](const char* name) -> std::string {
            try {
                loadWeights(*internals(*fuzz_model).net, badfiles::readFile((corpus + name).toStdString()), name);
            } catch (const Error& e) {
                return e.what();
            }
            return {};
        };
        QVERIFY(load("truncated.pt").find("not a readable weights file") != std::string::npos);
        // fuzz_checkpoint's second finding, kept as tests/data/fuzz_regressions/: a record whose CRC-32 does
        // not match made LibTorch's reader throw from its constructor, leaking its zip state (and the buffer
        // of any record it had read). The container is now checked first; a compressed record (a zip bomb
        // could claim gigabytes) is refused there too.
        const auto regression = [&](const char* name) -> std::string {
            try {
                loadWeights(*internals(*fuzz_model).net,
                            badfiles::readFile(std::string(MODSCOPE_TEST_DATA_DIR "/fuzz_regressions/") + name), name);
            } catch (const Error& e) {
                return e.what();
            }
            return {};
        };
        const auto crc = regression("checkpoint-crc-mismatch-leak.pt");
        QVERIFY2(crc.find("the CRC-32 of 'archive/data.pkl' does not match") != std::string::npos, crc.c_str());
        // The third: the version record marked as a directory, which the zip reader "extracts" without
        // reading, so LibTorch parsed uninitialised memory (and leaked its reader when that failed).
        const auto dir_record = regression("checkpoint-version-is-a-directory.pt");
        QVERIFY2(dir_record.find("'archive/version' is a directory") != std::string::npos, dir_record.c_str());
        const auto deflated = regression("checkpoint-deflated.pt");
        QVERIFY2(deflated.find("is compressed") != std::string::npos, deflated.c_str());
        // The fourth, found in CI: the version record flagged as patch data (bit 5), which the zip reader refuses
        // only when LibTorch asks for the record's size, inside its constructor.
        const auto patch = regression("checkpoint-version-patch-flag-leak.pt");
        QVERIFY2(patch.find("'archive/version' is patch data") != std::string::npos, patch.c_str());
        // LibTorch reads the format version from .data/version before version (Python's torch.load agrees:
        // it refuses the first file below for its version 99 although its version record says 3).
        const auto dot_data = regression("checkpoint-dot-data-version-bad.pt");
        QVERIFY2(dot_data.find("format version '99'") != std::string::npos, dot_data.c_str());
        QCOMPARE(regression("checkpoint-dot-data-version-ok.pt"), std::string());
        QCOMPARE(load("valid.pt"), std::string());  // what Python's torch.save writes still loads
        QCOMPARE(load("transposed.pt"), std::string());  // a strided tensor too
        QVERIFY(load("nan.pt").find("NaN") != std::string::npos);
        QVERIFY(load("list.pt").find("expected a dict") != std::string::npos);
        QVERIFY(load("legacy_format.pt").find("it does not start like a zip file") != std::string::npos);
    }

    // libsentencepiece and LibTorch bring two protobuf versions; both must work in one process.
    void tokenizesAndRunsInOneProcess() {
        QTemporaryDir dir;
        test::makeCheckpoint(dir.path().toStdString());
        auto model = Model::open(dir.path().toStdString(), "cpu");
        QVERIFY(model->tokenizer() != nullptr);
        const std::string text = "The routing token said unto them: 42 layers of depth.";
        const auto ids = model->tokenizer()->encodeIds(text);
        QVERIFY(ids.size() > 5);
        QCOMPARE(model->tokenizer()->decode(ids), text);
        const auto trace = model->run(ids);
        QCOMPARE(trace.token_ids, ids);
        QCOMPARE(int(trace.logits.size()), model->config().vocab_size);
    }

    void saveFailureLeavesNothingBehind() {
        QTemporaryDir dir;
        auto model = test::makeCheckpoint(dir.path().toStdString());
        QFile::setPermissions(dir.path(), QFileDevice::ReadOwner | QFileDevice::ExeOwner);
        if (QFileInfo(dir.path()).isWritable() && ::geteuid() == 0) {
            // root writes anyway: use a path whose parent is a file instead
            QVERIFY_THROWS_EXCEPTION(Error, model->save(pathIn(dir, "weights.pt") + "/sub"));
        } else {
            QVERIFY_THROWS_EXCEPTION(Error, model->save(dir.path().toStdString()));
        }
        QFile::setPermissions(dir.path(), QFileDevice::ReadOwner | QFileDevice::WriteOwner | QFileDevice::ExeOwner);
        QCOMPARE(QDir(dir.path()).entryList(QDir::Files | QDir::Hidden).size(), qsizetype(3));
        QVERIFY(Model::open(dir.path().toStdString(), "cpu") != nullptr);
    }
};

MODSCOPE_ENGINE_TEST_MAIN(CheckpointTest)
#include "checkpoint_test.moc"
