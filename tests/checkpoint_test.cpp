// Checkpoints: bit-exact save/load, interchange with Python's torch.load/torch.save, refusal of bad files,
// and the tokenizer and LibTorch working in one process.
#include <QDir>
#include <QFile>
#include <QTemporaryDir>
#include <QTest>
#include <fstream>

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
        auto a = saved->impl().net->named_parameters();
        auto b = loaded->impl().net->named_parameters();
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
        auto params = model->impl().net->named_parameters();
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
        QVERIFY(torch::equal(loaded->impl().net->blocks[1]->router->weight, torch::full({1, 32}, 0.25f)));
        QVERIFY(torch::equal(loaded->impl().net->tok_emb->weight, model->impl().net->tok_emb->weight));
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
        std::ofstream(weights, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 2);
        expectRefused(d, {"weights.pt"});
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

QTEST_GUILESS_MAIN(CheckpointTest)
#include "checkpoint_test.moc"
