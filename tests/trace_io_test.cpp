// Trace files (docs/TRACE_FORMAT.md): JSON and CSV round trips, awkward pieces, hostile input, and the
// modscope-trace CLI against the in-process export.
#include "modscope/trace_io.h"

#include <QDir>
#include <QElapsedTimer>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>
#include <cfloat>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <clocale>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "modscope/paths.h"
#include "bad_files.h"
#include "file_size_limit.h"
#include "test_support.h"
#include "tool_run.h"

using namespace modscope;

namespace {

const QString kCli = QStringLiteral(MODSCOPE_BIN_DIR "/modscope-trace");

const char* kPrompt =
    "The router decides, token by token, which ones a block processes; the rest skip it.\n"
    "Capacity 0.25 means a quarter: \"k\" of them, whatever the length, 1234 times.";

bool sameFloat(float a, float b) {
    if (std::isnan(a) && std::isnan(b)) return true;
    return std::memcmp(&a, &b, sizeof(float)) == 0;
}

bool sameFloats(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (!sameFloat(a[i], b[i])) return false;
    return true;
}

bool sameBits(double a, double b) {
    return std::memcmp(&a, &b, sizeof(double)) == 0;
}

// Field by field, floats bit for bit. Fails the current test (callers check QTest::currentTestFailed).
void compareDocuments(const TraceDocument& a, const TraceDocument& b) {
    QCOMPARE(a.schema, b.schema);
    QCOMPARE(a.model.name, b.model.name);
    QCOMPARE(a.model.config.toJson(), b.model.config.toJson());
    QCOMPARE(a.model.weights_sha256, b.model.weights_sha256);
    QCOMPARE(a.model.directory, b.model.directory);
    QCOMPARE(a.prompt, b.prompt);
    QCOMPARE(a.original_tokens, b.original_tokens);
    QCOMPARE(a.original_bytes, b.original_bytes);
    QCOMPARE(a.prompt_index, b.prompt_index);
    QCOMPARE(a.prompt_id, b.prompt_id);
    QCOMPARE(a.prompt_id_integer, b.prompt_id_integer);
    QCOMPARE(a.tokens.size(), b.tokens.size());
    for (std::size_t i = 0; i < a.tokens.size(); ++i) {
        QCOMPARE(a.tokens[i].id, b.tokens[i].id);
        QCOMPARE(a.tokens[i].piece, b.tokens[i].piece);
        QCOMPARE(a.tokens[i].byte_begin, b.tokens[i].byte_begin);
        QCOMPARE(a.tokens[i].byte_end, b.tokens[i].byte_end);
    }
    const auto &ra = a.run, &rb = b.run;
    QCOMPARE(int(ra.mode), int(rb.mode));
    QVERIFY(sameBits(ra.capacity, rb.capacity));
    QCOMPARE(ra.device, rb.device);
    QCOMPARE(ra.token_ids, rb.token_ids);
    QVERIFY(sameBits(ra.flops, rb.flops));
    QVERIFY(sameBits(ra.dense_flops, rb.dense_flops));
    QVERIFY(sameBits(ra.elapsed_ms, rb.elapsed_ms));
    QCOMPARE(ra.logits.size(), rb.logits.size());
    QCOMPARE(ra.layers.size(), rb.layers.size());
    for (std::size_t li = 0; li < ra.layers.size(); ++li) {
        const auto &x = ra.layers[li], &y = rb.layers[li];
        QCOMPARE(x.index, y.index);
        QCOMPARE(x.routed, y.routed);
        QCOMPARE(x.k, y.k);
        QCOMPARE(x.processed, y.processed);
        QVERIFY2(sameFloats(x.router_logits, y.router_logits),
                 qPrintable(QString("layer %1 router_logits").arg(li)));
        QCOMPARE(x.selected, y.selected);
        QCOMPARE(x.topk_selected, y.topk_selected);
        QVERIFY2(sameFloats(x.predictor_prob, y.predictor_prob),
                 qPrintable(QString("layer %1 predictor_prob").arg(li)));
        QCOMPARE(x.predictor_selected, y.predictor_selected);
        QCOMPARE(x.rank, y.rank);
        QVERIFY(sameFloat(x.topk_threshold, y.topk_threshold));
        QVERIFY2(sameFloats(x.update_ratio, y.update_ratio), qPrintable(QString("layer %1 update_ratio").arg(li)));
        if (x.routed) {  // what the layer ran at: its own capacity, else the run's
            QVERIFY(sameBits(layerCapacity(ra, x), layerCapacity(rb, y)));
        }
    }
    QCOMPARE(a.generation.has_value(), b.generation.has_value());
    if (!a.generation) return;
    const auto &ga = *a.generation, &gb = *b.generation;
    QCOMPARE(ga.max_new_tokens, gb.max_new_tokens);
    QVERIFY(sameFloat(ga.temperature, gb.temperature));
    QVERIFY(sameFloat(ga.top_p, gb.top_p));
    QCOMPARE(ga.seed, gb.seed);
    QCOMPARE(ga.eos_id, gb.eos_id);
    QCOMPARE(ga.pieces, gb.pieces);
    QCOMPARE(ga.text, gb.text);
    QVERIFY(sameBits(ga.elapsed_ms, gb.elapsed_ms));
    QCOMPARE(ga.result.prompt_ids, gb.result.prompt_ids);
    QCOMPARE(ga.result.generated_ids, gb.result.generated_ids);
    QCOMPARE(ga.result.kv_cache_bytes, gb.result.kv_cache_bytes);
    QCOMPARE(ga.result.dense_kv_cache_bytes, gb.result.dense_kv_cache_bytes);
    QVERIFY(sameBits(ga.result.tokens_per_second, gb.result.tokens_per_second));
    QCOMPARE(ga.result.cancelled, gb.result.cancelled);
    QCOMPARE(ga.result.steps.size(), gb.result.steps.size());
    for (std::size_t i = 0; i < ga.result.steps.size(); ++i) {
        const auto &s = ga.result.steps[i], &t = gb.result.steps[i];
        QCOMPARE(s.index, t.index);
        QCOMPARE(s.position, t.position);
        QCOMPARE(s.token_id, t.token_id);
        QCOMPARE(s.processed, t.processed);
        QVERIFY(sameFloats(s.predictor_prob, t.predictor_prob));
        QCOMPARE(s.kv_cache_bytes, t.kv_cache_bytes);
        QCOMPARE(s.dense_kv_cache_bytes, t.dense_kv_cache_bytes);
        QVERIFY(sameBits(s.step_ms, t.step_ms));
    }
}

// Timing and device are the only fields two runs of the same input may differ in.
TraceDocument withoutTiming(TraceDocument d) {
    d.run.elapsed_ms = 0;
    d.run.device.clear();
    if (d.generation) {
        d.generation->elapsed_ms = 0;
        d.generation->result.tokens_per_second = 0;
        for (auto& s : d.generation->result.steps) s.step_ms = 0;
    }
    return d;
}

// A consistent document built by hand: the tiny config (context widened to fit), pieces as given, the
// prompt their concatenation, top-k routing from the given (or seeded) router logits.
TraceDocument craftDocument(const std::vector<std::string>& pieces,
                            const std::vector<float>& layer1_logits = {}) {
    const int T = static_cast<int>(pieces.size());
    TraceDocument d;
    ModelConfig c = test::tinyConfig();
    c.name = "crafted, \"awkward\"";
    c.max_seq_len = std::max(160, T);
    d.model = {c.name, c, std::string(64, 'a'), "/nowhere/model"};
    for (int i = 0; i < T; ++i) {
        Token t;
        t.id = (i * 7) % c.vocab_size;
        t.piece = pieces[i];
        t.byte_begin = d.prompt.size();
        d.prompt += pieces[i];
        t.byte_end = d.prompt.size();
        d.tokens.push_back(t);
        d.run.token_ids.push_back(t.id);
    }
    d.original_tokens = d.tokens.size();
    d.original_bytes = d.prompt.size();
    d.run.mode = RoutingMode::TopK;
    d.run.capacity = 0.25;
    d.run.device = "cpu";
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<int> processed;
    for (int li = 0; li < c.n_layers; ++li) {
        LayerTrace l;
        l.index = li;
        l.routed = c.isRouted(li);
        if (!l.routed) {
            l.k = T;
            l.selected.assign(T, 1);
            l.topk_selected = l.selected;
        } else {
            l.k = capacityToK(d.run.capacity, T);
            if (li == 1 && !layer1_logits.empty())
                l.router_logits = layer1_logits;
            else
                for (int t = 0; t < T; ++t) l.router_logits.push_back(normal(rng));
            std::vector<int> order(T);
            for (int t = 0; t < T; ++t) order[t] = t;
            std::stable_sort(order.begin(), order.end(),
                             [&](int a, int b) { return l.router_logits[a] > l.router_logits[b]; });
            l.rank.assign(T, 0);
            for (int i = 0; i < T; ++i) l.rank[order[i]] = i;
            l.topk_threshold = l.router_logits[order[l.k - 1]];
            for (int t = 0; t < T; ++t) {
                l.topk_selected.push_back(l.rank[t] < l.k ? 1 : 0);
                const float p = static_cast<float>((t * 37 + li) % 101) / 100.0f;
                l.predictor_prob.push_back(p);
                l.predictor_selected.push_back(p > c.predictor_threshold ? 1 : 0);
            }
            l.selected = l.topk_selected;
        }
        l.processed = static_cast<int>(std::count(l.selected.begin(), l.selected.end(), 1));
        for (int t = 0; t < T && l.routed; ++t)  // routed layers only, as the engine measures
            l.update_ratio.push_back(l.selected[t] ? static_cast<float>((t * 13 + li) % 17 + 1) / 7.0f : 0.0f);
        processed.push_back(l.processed);
        d.run.layers.push_back(l);
    }
    d.run.flops = forwardFlops(c, T, processed, 1);
    d.run.dense_flops = denseForwardFlops(c, T, 1);
    d.run.elapsed_ms = 1.25;
    return d;
}

std::vector<std::string> awkwardPieces() {
    return {"plain",
            "a,b",
            "say \"hi\"",
            "line\nbreak",
            "cr\r\nlf",
            "lone\rcr",
            "\xF0\x9F\x99\x82",  // 🙂
            "=SUM(A1:A9)",
            "+1",
            "-2",
            "@x",
            " lead",
            "trail ",
            "\t",
            "\"",
            ",",
            "\"\"",
            ",\"\n",
            "\xE2\x96\x81the",
            "<0x0A>",
            "caf\xC3\xA9",
            "\\",
            "x"};
}


test::ToolRun runCli(const QStringList& args,
                     const QProcessEnvironment& env = QProcessEnvironment::systemEnvironment()) {
    return test::runTool(kCli, args, 180000, env);
}

std::string readAll(const QString& path) {
    std::ifstream in(path.toStdString(), std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

void writeAll(const QString& path, const std::string& data) {
    std::ofstream(path.toStdString(), std::ios::binary) << data;
}

// The message of the Error f throws ("" when it throws none).
template <typename F>
std::string errorOf(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return {};
}

// Edits of a valid trace, each with a text its refusal must hold.
using TraceEdits = std::vector<std::pair<std::function<void(nlohmann::ordered_json&)>, std::string>>;

// Each edit of base, read back, is refused by the reader with an "invalid trace" (or "unsupported") message
// that holds the edit's text.
void expectEditsRefused(const nlohmann::ordered_json& base, const TraceEdits& edits) {
    for (const auto& [edit, expected] : edits) {
        auto j = base;
        edit(j);
        const auto msg = errorOf([&] { traceFromJson(j.dump()); });
        QVERIFY2(msg.find(expected) != std::string::npos,
                 qPrintable(QString("expected '%1' in '%2'").arg(expected.c_str(), msg.c_str())));
        QVERIFY2(msg.rfind("invalid trace: ", 0) == 0 || msg.rfind("unsupported", 0) == 0, msg.c_str());
    }
}

}  // namespace

class TraceIoTest : public QObject {
    Q_OBJECT

    QTemporaryDir tmp_;
    QString ckpt_;
    std::unique_ptr<Model> model_;  // opened from ckpt_, as the CLI opens it

    QString path(const QString& name) const { return QDir(tmp_.path()).filePath(name); }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(tmp_.isValid());
        ckpt_ = path("ckpt");
        test::makeCheckpoint(ckpt_.toStdString(), 7);
        model_ = Model::open(ckpt_.toStdString(), "cpu");
    }

    // A real trace (both modes, with a generation) survives JSON exactly, and writing it again gives the
    // same bytes.
    void jsonRoundTripIsExact() {
        for (const auto mode : {RoutingMode::TopK, RoutingMode::Causal}) {
            TraceRequest req;
            req.mode = mode;
            req.capacity = 0.3;
            req.generate_tokens = 6;
            req.generation.seed = 3;
            const auto doc = traceModel(*model_, kPrompt, req);
            QCOMPARE(doc.tokens.size(), doc.run.layers[0].selected.size());
            QVERIFY(doc.generation && doc.generation->result.steps.size() == 6);
            const auto text = traceToJson(doc);
            const auto back = traceFromJson(text);
            compareDocuments(doc, back);
            if (QTest::currentTestFailed()) return;
            QCOMPARE(traceToJson(back), text);
            // The one-line form reads back the same.
            const auto line = traceToJsonLine(doc);
            QVERIFY(line.find('\n') == std::string::npos);
            compareDocuments(doc, traceFromJson(line));
            if (QTest::currentTestFailed()) return;
        }
    }

    // Every kind of float32 (extremes, subnormals, -0, the two values where the shortest float32 decimal
    // does not survive a float64 parse, random bit patterns) comes back bit for bit, in C++ and in Python.
    void floatsRoundTripBitExact() {
        std::vector<float> values = {0.0f,          -0.0f,          0.1f,           -0.1f,    1.0f / 3.0f,
                                     FLT_MAX,       -FLT_MAX,       FLT_MIN,        -FLT_MIN, FLT_TRUE_MIN,
                                     -FLT_TRUE_MIN, 7.038531e-26f,  -7.038531e-26f, 1e-45f,   16777217.0f,
                                     3.4028235e38f, 1.17549435e-38f};
        std::mt19937 rng(1);
        while (values.size() < 4000) {
            const std::uint32_t bits = static_cast<std::uint32_t>(rng());
            float f;
            std::memcpy(&f, &bits, 4);
            if (std::isfinite(f)) values.push_back(f);
        }
        std::vector<std::string> pieces(values.size(), "p");
        const auto doc = craftDocument(pieces, values);
        const auto file = path("floats.json");
        saveTrace(file.toStdString(), doc);
        const auto back = loadTrace(file.toStdString());
        QVERIFY(sameFloats(back.run.layers[1].router_logits, values));
        compareDocuments(doc, back);
        if (QTest::currentTestFailed()) return;

        // Python reads float64 and rounds to float32: the same bits.
        const auto out = test::runPython(
            "import json, struct, sys\n"
            "d = json.load(open(sys.argv[1], encoding='utf-8'))\n"
            "print(struct.pack('<%df' % len(d['layers'][1]['router_logits']), "
            "*d['layers'][1]['router_logits']).hex())\n",
            {file});
        QByteArray expected(reinterpret_cast<const char*>(values.data()), int(values.size() * sizeof(float)));
        QCOMPARE(out.trimmed(), QString::fromLatin1(expected.toHex()));
    }

    // CSV: every layer and token once, values as in the document; read back by the strict parser and by
    // Python's csv module alike.
    void csvRoundTrip() {
        TraceRequest req;
        req.mode = RoutingMode::Causal;
        req.generate_tokens = 4;
        const auto doc = traceModel(*model_, kPrompt, req);
        const auto csv = traceToCsv(doc);
        const auto rows = traceRowsFromCsv(csv);
        const std::size_t T = doc.tokens.size(), L = doc.run.layers.size(), G = 4;
        QCOMPARE(rows.size(), L * (T + G));
        std::size_t r = 0;
        for (std::size_t li = 0; li < L; ++li) {
            const auto& l = doc.run.layers[li];
            for (std::size_t t = 0; t < T; ++t, ++r) {
                const auto& row = rows[r];
                QCOMPARE(row.prompt_index, -1);
                QCOMPARE(row.layer, int(li));
                QCOMPARE(row.position, int(t));
                QCOMPARE(row.token_id, doc.tokens[t].id);
                QCOMPARE(row.piece, doc.tokens[t].piece);
                QCOMPARE(row.routed, l.routed);
                QCOMPARE(row.selected, l.selected[t] != 0);
                QCOMPARE(row.phase, std::string("prompt"));
                if (l.routed) {
                    QVERIFY(row.router_logit && sameFloat(*row.router_logit, l.router_logits[t]));
                    QVERIFY(row.predictor_prob && sameFloat(*row.predictor_prob, l.predictor_prob[t]));
                    QCOMPARE(*row.rank, l.rank[t]);
                    QCOMPARE(*row.predictor_selected, l.predictor_selected[t] != 0);
                    QCOMPARE(*row.topk_selected, l.topk_selected[t] != 0);
                } else {
                    QVERIFY(!row.router_logit && !row.rank && !row.predictor_prob && !row.predictor_selected);
                    QCOMPARE(*row.topk_selected, true);
                }
            }
            for (std::size_t i = 0; i < G; ++i, ++r) {
                const auto& row = rows[r];
                const auto& step = doc.generation->result.steps[i];
                QCOMPARE(row.phase, std::string("generate"));
                QCOMPARE(row.position, step.position);
                QCOMPARE(row.token_id, step.token_id);
                QCOMPARE(row.piece, doc.generation->pieces[i]);
                QCOMPARE(row.selected, step.processed[li] != 0);
                QVERIFY(!row.router_logit && !row.rank && !row.topk_selected);
                QCOMPARE(row.predictor_prob.has_value(), l.routed);
                if (l.routed) QVERIFY(sameFloat(*row.predictor_prob, step.predictor_prob[li]));
            }
        }

        const auto file = path("trace.csv");
        saveTrace(file.toStdString(), doc);
        QCOMPARE(readAll(file), csv);
        const auto py = test::runPython(
            "import csv, json, sys\n"
            "with open(sys.argv[1], newline='', encoding='utf-8') as f:\n"
            "    rows = list(csv.DictReader(f))\n"
            "print(json.dumps({'n': len(rows), 'columns': list(rows[0].keys()),\n"
            "  'pieces': [r['piece'] for r in rows], 'sum_selected': sum(int(r['selected']) for r in "
            "rows)}))\n",
            {file});
        const auto j = QJsonDocument::fromJson(py.toUtf8()).object();
        QCOMPARE(j["n"].toInt(), int(rows.size()));
        QStringList columns;
        for (const char* c : kTraceCsvColumns) columns << c;
        QCOMPARE(j["columns"].toVariant().toStringList(), columns);
        int selected = 0;
        for (std::size_t i = 0; i < rows.size(); ++i) {
            QCOMPARE(j["pieces"].toArray()[int(i)].toString().toStdString(), rows[i].piece);
            selected += rows[i].selected;
        }
        QCOMPARE(j["sum_selected"].toInt(), selected);
    }

    // Pieces holding commas, quotes, CR/LF, emoji, leading '=' and spaces: quoted per RFC 4180, read back
    // exactly by the strict parser and by Python's csv module; the JSON form keeps them too.
    void csvAwkwardPieces() {
        const auto pieces = awkwardPieces();
        const auto doc = craftDocument(pieces);
        const auto csv = traceToCsv(doc);
        const auto rows = traceRowsFromCsv(csv);
        QCOMPARE(rows.size(), pieces.size() * doc.run.layers.size());
        for (std::size_t i = 0; i < rows.size(); ++i) QCOMPARE(rows[i].piece, pieces[i % pieces.size()]);
        // A bare field never holds a quote, comma or line break.
        const auto table = parseCsv(csv);
        QCOMPARE(table.size(), rows.size() + 1);

        const auto file = path("awkward.csv");
        saveTrace(file.toStdString(), doc);
        const auto py = test::runPython(
            "import csv, json, sys\n"
            "with open(sys.argv[1], newline='', encoding='utf-8') as f:\n"
            "    print(json.dumps([r['piece'] for r in csv.DictReader(f, strict=True)]))\n",
            {file});
        const auto arr = QJsonDocument::fromJson(py.toUtf8()).array();
        QCOMPARE(std::size_t(arr.size()), rows.size());
        for (int i = 0; i < arr.size(); ++i)
            QCOMPARE(arr[i].toString().toStdString(), pieces[std::size_t(i) % pieces.size()]);

        compareDocuments(doc, traceFromJson(traceToJson(doc)));
    }

    // Hand-written CSV that breaks RFC 4180 is refused with the row or line named.
    void strictCsvParser() {
        QCOMPARE(parseCsv("a,b\r\n1,\"x,\"\"y\"\"\"\r\n").at(1).at(1), std::string("x,\"y\""));
        QCOMPARE(parseCsv("a,b\n1,2").size(), std::size_t(2));
        const std::vector<std::pair<std::string, std::string>> cases = {
            {"a,b\r\n1,\"open\r\n", "not closed"},
            {"a,b\r\n1,x\"y\r\n", "quote inside an unquoted field"},
            {"a,b\r\n1,\"x\"y\r\n", "after a closing quote"},
            {"a,b\r\n1,2,3\r\n", "3 fields, the header has 2"},
            {"a,b\r\n1\r2\r\n", "carriage return"},
            {"a,b\r\n\xff,1\r\n", "not UTF-8"},
        };
        for (const auto& [text, expected] : cases) {
            const auto msg = errorOf([&] { parseCsv(text); });
            QVERIFY2(msg.find(expected) != std::string::npos, msg.c_str());
        }
        const auto header = errorOf([] { traceRowsFromCsv("x,y\r\n1,2\r\n"); });
        QVERIFY2(header.find("header should be") != std::string::npos, header.c_str());
        auto csv = traceToCsv(craftDocument({"a", "b", "c", "d"}));
        csv.replace(csv.find(",prompt,"), 8, ",later,");
        const auto phase = errorOf([&] { traceRowsFromCsv(csv); });
        QVERIFY2(phase.find("CSV row 2, phase") != std::string::npos, phase.c_str());
    }

    // JSON objects are unordered: a trace whose members come in another order (Python's json.dump with
    // sort_keys puts "layers" before "model" and "tokens", whose sizes bound it) reads to the same document,
    // and its arrays are still held to those sizes.
    void membersMayComeInAnyOrder() {
        TraceRequest req;
        req.generate_tokens = 3;
        req.generation.temperature = 0.0f;
        const auto doc = traceModel(*model_, kPrompt, req);
        QVERIFY(doc.generation && !doc.generation->result.steps.empty());
        const auto text = traceToJson(doc);
        using Ordered = nlohmann::ordered_json;
        std::function<Ordered(const Ordered&)> reversed = [&](const Ordered& j) {
            if (j.is_object()) {
                Ordered out = Ordered::object();
                std::vector<std::pair<std::string, Ordered>> members;
                for (const auto& item : j.items()) members.emplace_back(item.key(), item.value());
                for (auto it = members.rbegin(); it != members.rend(); ++it) out[it->first] = reversed(it->second);
                return out;
            }
            if (j.is_array()) {
                Ordered out = Ordered::array();
                for (const auto& e : j) out.push_back(reversed(e));
                return out;
            }
            return j;
        };
        const std::string sorted = nlohmann::json::parse(text).dump();
        const std::string backwards = reversed(Ordered::parse(text)).dump();
        QVERIFY(sorted.find("\"layers\"") < sorted.find("\"tokens\""));
        QVERIFY(backwards.find("\"timing\"") < backwards.find("\"schema\""));
        for (const auto& t : {sorted, backwards}) {
            const auto msg = errorOf([&] { QCOMPARE(traceToJson(traceFromJson(t)), text); });
            QVERIFY2(msg.empty(), msg.c_str());
        }
        const auto batch = tracesFromJson("[" + sorted + "," + backwards + "]");
        QCOMPARE(batch.size(), std::size_t(2));
        QCOMPARE(traceToJson(batch[1]), text);

        // Bounds hold though the sizes come later in the text.
        auto longer = nlohmann::json::parse(text);
        longer["layers"][1]["router_logits"].push_back(0.5);
        longer["generation"]["steps"][0]["processed"].push_back(true);
        auto msg = errorOf([&] { traceFromJson(longer.dump()); });
        QVERIFY2(msg.find("has more than") != std::string::npos, msg.c_str());
        auto wrong_k = nlohmann::json::parse(text);
        wrong_k["layers"][1]["k"] = wrong_k["layers"][1]["k"].get<int>() + 1;
        msg = errorOf([&] { traceFromJson(wrong_k.dump()); });
        QVERIFY2(msg.find("layers[1].k: ") != std::string::npos && msg.find(" tokens gives ") != std::string::npos,
                 msg.c_str());
        auto outside = nlohmann::json::parse(text);
        outside["tokens"][0]["byte_end"] = doc.prompt.size() + 1;
        msg = errorOf([&] { traceFromJson(outside.dump()); });
        QVERIFY2(msg.find("tokens[0].byte_end: " + std::to_string(doc.prompt.size() + 1) + " is out of range") !=
                     std::string::npos,
                 msg.c_str());
    }

    // A Qt program runs in the user's locale (QCoreApplication calls setlocale), where the decimal separator
    // may be a comma; JSON's is always a point. Traces read the same there.
    void tracesReadTheSameUnderACommaDecimalLocale() {
        const auto doc = traceModel(*model_, kPrompt, {});
        const auto text = traceToJson(doc);
        QTemporaryDir locales;
        QProcess make;
        make.start(QStringLiteral("localedef"), {"-i", "de_DE", "-f", "UTF-8", locales.filePath("de_DE.UTF-8")});
        if (!make.waitForFinished(60000) || make.exitCode() > 1)  // 1: warnings only
            QSKIP("localedef cannot make a de_DE locale here (Debian's locales package)");
        qputenv("LOCPATH", locales.path().toLocal8Bit());
        const std::string before = std::setlocale(LC_NUMERIC, nullptr);
        if (!std::setlocale(LC_NUMERIC, "de_DE.UTF-8")) QSKIP("the de_DE locale made here does not load");
        QCOMPARE(QString(std::localeconv()->decimal_point), QStringLiteral(","));
        std::string msg, again;
        try {
            again = traceToJson(traceFromJson(text));
        } catch (const Error& e) {
            msg = e.what();
        }
        std::setlocale(LC_NUMERIC, before.c_str());
        qunsetenv("LOCPATH");
        QVERIFY2(msg.empty(), msg.c_str());
        QCOMPARE(again, text);
    }

    // What the survey reads first (schema, model, its config, tokens) is refused twice as any member is, and a
    // JSON Lines line that is an array is a line that is no trace, not a batch to point to.
    void refusalsOfTheFirstPassReadAsTheOthers() {
        const auto valid = traceToJson(craftDocument({"alpha", "beta", "gamma", "delta"}));
        const auto replaced = [&](const std::string& from, const std::string& to) {
            std::string t = valid;
            return t.replace(t.find(from), from.size(), to);
        };
        const std::vector<std::pair<std::string, std::string>> cases = {
            {replaced("\"schema\": ", "\"schema\": \"x\", \"schema\": "), "trace: 'schema' appears twice"},
            {replaced("\"mode\": ", "\"model\": 1, \"mode\": "), "trace: 'model' appears twice"},
            {replaced("\"mode\": ", "\"tokens\": [], \"mode\": "), "trace: 'tokens' appears twice"},
            {replaced("\"capacity\": 0.25", "\"capacity\": 1e-400"), "capacity: 1e-400 is not a finite number"},
        };
        for (const auto& [text, expected] : cases) {
            const auto msg = errorOf([&] { traceFromJson(text); });
            QVERIFY2(msg.find(expected) != std::string::npos && msg.rfind("invalid trace: ", 0) == 0,
                     qPrintable(QString("expected '%1' in '%2'").arg(expected.c_str(), msg.c_str())));
        }
        const auto line = errorOf([] { tracesFromJsonLines("[{}]\n"); });
        QVERIFY2(line == "line 1: invalid trace: trace: expected an object, found an array", line.c_str());
    }

    // A trace of the first version (no update_ratio, gate or per-layer capacity; prompt_id always a string)
    // still reads, and is written back in this version with update_ratio null.
    void firstVersionStillReads() {
        auto doc = craftDocument({"a", "b", "c", "d"});
        doc.prompt_index = 4;
        doc.prompt_id = "17";
        auto j = nlohmann::json::parse(traceToJson(doc));
        j["schema"] = "modscope.trace/1";
        for (auto& l : j["layers"]) {
            l.erase("update_ratio");
            l.erase("gate");
            l.erase("capacity");
        }
        const auto v1 = traceFromJson(j.dump());
        QCOMPARE(v1.schema, std::string("modscope.trace/1"));
        QCOMPARE(v1.prompt_id, std::string("17"));
        QVERIFY(!v1.prompt_id_integer);
        for (const auto& l : v1.run.layers) {
            QVERIFY(l.update_ratio.empty());
            if (l.routed) QCOMPARE(l.capacity, 0.25);
        }
        const auto again = nlohmann::json::parse(traceToJson(v1));
        QCOMPARE(again["schema"].get<std::string>(), std::string(kTraceSchema));
        QVERIFY(again["layers"][1]["update_ratio"].is_null());
        QVERIFY(traceFromJson(again.dump()).run.layers[1].update_ratio.empty());
        // Members of the second version mean nothing in the first: a layer there runs at the document's capacity.
        auto stray = j;
        stray["layers"][1]["capacity"] = 0.75;
        QCOMPARE(traceFromJson(stray.dump()).run.layers[1].capacity, 0.25);
        // A CSV of the first version's columns reads, alone or in a batch; mixed headers do not.
        const auto csv = traceToCsv(doc);
        // Each CRLF line of a CSV through edit.
        const auto editLines = [](const std::string& text, const std::function<void(std::string&)>& edit) {
            std::string out;
            for (std::size_t start = 0; start < text.size();) {
                const auto end = text.find("\r\n", start);
                auto line = text.substr(start, end - start);
                edit(line);
                out += line + "\r\n";
                start = end + 2;
            }
            return out;
        };
        // A version's CSV: the columns after its first `keep` dropped.
        const auto keepColumns = [](int keep) {
            return [keep](std::string& line) {
                for (int i = keep; i < int(std::size(kTraceCsvColumns)); ++i) line.erase(line.rfind(','));
            };
        };
        const auto dropGateAndUpdate = keepColumns(kTraceCsvColumnsV1);
        const auto dropExperts = keepColumns(kTraceCsvColumnsV2);
        const auto v3_rows = traceRowsFromCsv(editLines(csv, keepColumns(kTraceCsvColumnsV3)));
        QCOMPARE(v3_rows.size(), traceRowsFromCsv(csv).size());
        QVERIFY(v3_rows.back().gate && !v3_rows.back().token_loss && v3_rows.back().forced.empty());
        const auto v2_rows = traceRowsFromCsv(editLines(csv, dropExperts));
        QCOMPARE(v2_rows.size(), traceRowsFromCsv(csv).size());
        QVERIFY(v2_rows.back().gate && !v2_rows.back().expert && !v2_rows.back().expert_choice);
        const auto dropPromptId = [](std::string& line) {  // the second column
            const auto first = line.find(',');
            line.erase(first, line.find(',', first + 1) - first);
        };
        const auto v1_rows = traceRowsFromCsv(editLines(csv, dropGateAndUpdate));
        QCOMPARE(v1_rows.size(), traceRowsFromCsv(csv).size());
        QVERIFY(!v1_rows.front().update_ratio && !v1_rows.back().gate);
        const auto v1_batch = editLines(tracesToCsv({doc, doc}), dropGateAndUpdate);
        const auto no_id = editLines(v1_batch, dropPromptId);  // the first version's batch: prompt_index alone
        QCOMPARE(traceRowsFromCsv(no_id).front().prompt_index, 4);
        const auto mixed = errorOf([&] { traceRowsFromCsv(v1_batch); });
        QVERIFY2(mixed.find("header should be prompt_index,prompt_id,layer") != std::string::npos, mixed.c_str());
        // The first version wrote ids as strings only: a number there is refused.
        j["prompt_id"] = 17;
        const auto msg = errorOf([&] { traceFromJson(j.dump()); });
        QVERIFY2(msg.find("prompt_id: expected a string") != std::string::npos, msg.c_str());
    }

    // A batch's integer id stays an integer, in JSON and back; CSV gives it a column.
    void batchIdsKeepTheirType() {
        auto doc = craftDocument({"x", "y"});
        doc.prompt_index = 2;
        doc.prompt_id = "-12";
        doc.prompt_id_integer = true;
        const auto text = traceToJson(doc);
        QVERIFY2(text.find("\"prompt_id\": -12,") != std::string::npos, text.c_str());
        const auto back = traceFromJson(text);
        QVERIFY(back.prompt_id_integer);
        QCOMPARE(back.prompt_id, std::string("-12"));
        auto named = doc;
        named.prompt_id = "-12";
        named.prompt_id_integer = false;
        QVERIFY(traceToJson(named).find("\"prompt_id\": \"-12\",") != std::string::npos);
        QVERIFY(!traceFromJson(traceToJson(named)).prompt_id_integer);
        const auto rows = traceRowsFromCsv(tracesToCsv({doc, named}));
        QVERIFY(!rows.empty());
        for (const auto& r : rows) QCOMPARE(r.prompt_id, std::string("-12"));
        QCOMPARE(rows.front().prompt_index, 2);
    }

    // A routed layer that ran at its own capacity says so, and its k is checked against that capacity.
    void layerCapacityIsRecordedAndChecked() {
        auto doc = craftDocument({"a", "b", "c", "d", "e", "f", "g", "h"});
        auto& l1 = doc.run.layers[1];
        QVERIFY(l1.routed);
        l1.capacity = 0.5;
        l1.k = capacityToK(0.5, 8);
        l1.topk_selected.assign(8, 0);
        for (int t = 0; t < 8; ++t) l1.topk_selected[t] = l1.rank[t] < l1.k ? 1 : 0;
        l1.selected = l1.topk_selected;
        l1.processed = l1.k;
        l1.topk_threshold = 0.0f;
        for (int t = 0; t < 8; ++t)
            if (l1.rank[t] == l1.k - 1) l1.topk_threshold = l1.router_logits[t];
        const auto back = traceFromJson(traceToJson(doc));
        QCOMPARE(back.run.layers[1].capacity, 0.5);
        QCOMPARE(back.run.layers[1].k, 4);
        QCOMPARE(back.run.layers[3].capacity, 0.25);  // the run's
        auto j = nlohmann::json::parse(traceToJson(doc));
        j["layers"][1]["capacity"] = 0.75;
        const auto msg = errorOf([&] { traceFromJson(j.dump()); });
        QVERIFY2(msg.find("layers[1].k: 4, but the layer's capacity 0.75 of 8 tokens gives 6") != std::string::npos,
                 msg.c_str());
        // The layers before the document's capacity (members in any order): the layer's own still counts.
        auto late = nlohmann::ordered_json::parse(traceToJson(doc));
        const auto capacity = late["capacity"];
        late.erase("capacity");
        late["capacity"] = capacity;
        const auto reordered = traceFromJson(late.dump());
        QCOMPARE(reordered.run.layers[1].capacity, 0.5);
        QCOMPARE(reordered.run.layers[3].capacity, 0.25);
        late["layers"][1]["capacity"] = 0.75;
        const auto late_msg = errorOf([&] { traceFromJson(late.dump()); });
        QVERIFY2(late_msg.find("layers[1].k: 4, but the layer's capacity 0.75") != std::string::npos, late_msg.c_str());
    }

    void unknownSchemaIsRefused() {
        auto text = traceToJson(craftDocument({"a", "b"}));
        const std::string v4 = "\"modscope.trace/4\"";
        text.replace(text.find(v4), v4.size(), "\"modscope.trace/5\"");
        const auto msg = errorOf([&] { traceFromJson(text); });
        QVERIFY2(msg.find("unsupported trace schema \"modscope.trace/5\"") != std::string::npos, msg.c_str());
        QVERIFY2(msg.find("reads \"modscope.trace/4\", \"modscope.trace/3\", \"modscope.trace/2\" and \"modscope.trace/1\"") !=
                     std::string::npos,
                 msg.c_str());
        const auto file = path("v5.json");
        writeAll(file, text);
        const auto from_file = errorOf([&] { loadTrace(file.toStdString()); });
        QVERIFY2(from_file.find(file.toStdString() + ": unsupported trace schema") == 0, from_file.c_str());

        const auto none = errorOf([] { traceFromJson("{\"layers\": []}"); });
        QVERIFY2(none.find("no 'schema' field") != std::string::npos, none.c_str());
        const auto typed = errorOf([] { traceFromJson("{\"schema\": 1}"); });
        QVERIFY2(typed.find("'schema' is a number") != std::string::npos, typed.c_str());
    }

    // Untrusted bytes: each defect is refused with a message that names it.
    void hostileTracesAreRefused() {
        const auto doc = craftDocument({"alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"});
        const auto valid = traceToJson(doc);
        QVERIFY(errorOf([&] { traceFromJson(valid); }).empty());
        using J = nlohmann::ordered_json;
        const J base = J::parse(valid);
        const TraceEdits edits = {
            {[](J& j) { j["layers"][1]["router_logits"].erase(0); },
             "layers[1].router_logits has 7 values, expected 8"},
            {[](J& j) { j["layers"][1]["router_logits"].push_back(0.5); },
             "layers[1].router_logits has more than 8"},
            {[](J& j) { j["layers"][3]["selected"].push_back(true); }, "layers[3].selected has more than 8"},
            {[](J& j) { j["layers"].erase(3); }, "3 layers, but the config has n_layers 4"},
            {[](J& j) { j["layers"].push_back(j["layers"][0]); }, "more than 4 layers"},
            {[](J& j) { j["tokens"].erase(7); }, "layers[0].k: 8 is out of range (1 to 7)"},
            {[](J& j) { j["layers"][1]["k"] = 99999999999LL; }, "layers[1].k: 99999999999 is out of range"},
            {[](J& j) { j["layers"][1]["k"] = 1e20; }, "layers[1].k: 1e+20 is not an integer"},
            {[](J& j) { j["layers"][1]["k"] = 3; }, "capacity 0.25 of 8 tokens gives 2"},
            {[](J& j) { j["capacity"] = 1e300; }, "capacity: 1e+300 is out of range (0 to 1)"},
            {[](J& j) { j["layers"][1]["router_logits"][2] = 1e39; },
             "router_logits[2]: 1e+39 is outside the float32 range"},
            {[](J& j) { j["layers"][1]["router_logits"][2] = nullptr; },
             "router_logits[2]: expected a finite number, found null"},
            {[](J& j) { j["layers"][3]["predictor_prob"][0] = 1.5; },
             "predictor_prob[0]: 1.5 is out of range (0 to 1)"},
            {[](J& j) { j["layers"][1]["selected"][0] = 1; },
             "selected[0]: expected true or false, found a number"},
            {[](J& j) { j["layers"][1]["rank"][0] = j["layers"][1]["rank"][1]; }, "appears twice"},
            {[](J& j) { j["layers"][0]["router_logits"] = J::array(); }, "a full layer has none"},
            {[](J& j) { j["layers"] = J::object(); }, "layers: expected an array, found an object"},
            {[](J& j) { j["tokens"][0]["id"] = 5000; }, "tokens[0].id: 5000 is out of range (0 to 299)"},
            {[](J& j) { j["tokens"][0]["byte_end"] = 1000; }, "tokens[0].byte_end: 1000 is out of range"},
            {[](J& j) { j["tokens"] = J::array(); }, "tokens: empty"},
            {[](J& j) { j["model"]["config"]["n_layers"] = 100000; }, "model.config: config: 'n_layers'"},
            {[](J& j) { j["model"]["weights_sha256"] = "xyz"; }, "not a SHA-256"},
            {[](J& j) { j.erase("layers"); }, "missing 'layers'"},
            {[](J& j) { j["mode"] = "sideways"; }, "mode: \"sideways\" is not topk or causal"},
            {[](J& j) { j["stats"]["flops"] = -1; }, "stats.flops: -1 is out of range"},
            {[](J& j) { j = J::array(); }, "an array of traces"},
            {[](J& j) { j = "text"; }, "trace: expected an object, found a string"},
        };
        expectEditsRefused(base, edits);

        // Textual defects nlohmann cannot produce.
        const auto replaced = [&](const std::string& from, const std::string& to) {
            std::string t = valid;
            const auto at = t.find(from);
            if (at == std::string::npos) qFatal("pattern not in the trace: %s", from.c_str());
            return t.replace(at, from.size(), to);
        };
        const std::vector<std::pair<std::string, std::string>> texts = {
            {replaced("\"capacity\": 0.25", "\"capacity\": 1e999"), "number overflow"},
            {replaced("\"capacity\": 0.25", "\"capacity\": NaN"), "not valid JSON"},
            {replaced("\"capacity\": 0.25", "\"capacity\": Infinity"), "not valid JSON"},
            {replaced("\"mode\": \"topk\"", "\"mode\": \"topk\", \"mode\": \"causal\""),
             "'mode' appears twice"},
            {valid.substr(0, valid.size() / 2), "unexpected end of input"},
            {valid + "{}", "not valid JSON"},
            {std::string(100000, '['), "nested deeper than 32"},
            {"", "not valid JSON"},
            {replaced("\"alpha\"", "\"al\xff\xfe\""), "not valid JSON"},
        };
        for (const auto& [text, expected] : texts) {
            const auto msg = errorOf([&] { traceFromJson(text); });
            QVERIFY2(msg.find(expected) != std::string::npos,
                     qPrintable(QString("expected '%1' in '%2'").arg(expected.c_str(), msg.c_str())));
        }

        // Random bytes and random corruption of a valid trace: an Error with a message, every time.
        std::mt19937_64 rng(42);
        for (int i = 0; i < 300; ++i) {
            std::string text;
            if (i % 3 == 0) {
                text.resize(1 + rng() % 5000);
                for (auto& c : text) c = static_cast<char>(rng());
            } else {
                text = valid;
                for (int f = 0; f < 1 + int(rng() % 4); ++f)
                    text[rng() % text.size()] = static_cast<char>(rng());
                if (i % 3 == 2) text.resize(rng() % text.size());
            }
            try {
                traceFromJson(text);
            } catch (const Error& e) {
                QVERIFY(std::strlen(e.what()) > 10);
                QVERIFY(std::string(e.what()).find('\n') == std::string::npos);
            }
        }

        // An oversized file is refused before it is read.
        const auto big = path("big.json");
        writeAll(big, "{");
        std::filesystem::resize_file(big.toStdString(), kMaxTraceFileBytes + 1);
        const auto msg = errorOf([&] { loadTrace(big.toStdString()); });
        QVERIFY2(msg.find("more than") != std::string::npos, msg.c_str());
    }

    void writerRefusesWhatJsonCannotHold() {
        auto doc = craftDocument({"a", "b", "c", "d"});
        doc.tokens[2].piece = "bad\xff";
        auto msg = errorOf([&] { traceToJson(doc); });
        QVERIFY2(msg.find("tokens[2].piece is not valid UTF-8") != std::string::npos, msg.c_str());
        doc = craftDocument({"a", "b", "c", "d"});
        doc.run.layers[1].router_logits[3] = std::nanf("");
        msg = errorOf([&] { traceToJson(doc); });
        QVERIFY2(msg.find("layers[1].router_logits[3] is not a finite number") != std::string::npos,
                 msg.c_str());
        msg = errorOf([&] { saveTrace(path("t.txt").toStdString(), craftDocument({"a"})); });
        QVERIFY2(msg.find("unknown trace format '.txt'") != std::string::npos, msg.c_str());
        QVERIFY(!QFile::exists(path("t.txt")));
        msg = errorOf([&] { loadTrace(path("x.csv").toStdString()); });
        QVERIFY2(msg.find("cannot be replayed") != std::string::npos, msg.c_str());
    }

    // Batches: a .json array, JSON Lines, and CSV with prompt_index all hold every document.
    void batchFiles() {
        std::vector<TraceDocument> docs;
        for (int i = 0; i < 3; ++i) {
            auto d = craftDocument(std::vector<std::string>(5 + i, "w,"));
            d.prompt_index = i;
            d.prompt_id = i == 1 ? "second" : "";
            docs.push_back(d);
        }
        for (const char* ext : {".json", ".jsonl"}) {
            const auto file = path(QString("batch") + ext).toStdString();
            saveTraces(file, docs);
            const auto back = loadTraces(file);
            QCOMPARE(back.size(), docs.size());
            for (std::size_t i = 0; i < docs.size(); ++i) {
                compareDocuments(docs[i], back[i]);
                if (QTest::currentTestFailed()) return;
            }
        }
        const auto rows = traceRowsFromCsv(tracesToCsv(docs));
        QCOMPARE(rows.size(), std::size_t((5 + 6 + 7) * 4));
        QCOMPARE(rows.front().prompt_index, 0);
        QCOMPARE(rows.back().prompt_index, 2);
    }

    void truncatesLongPrompts() {
        std::string longer;
        while (model_->tokenizer()->encode(longer).size() <= 200) longer += "the routing of every token, ";
        const auto p = tokenizePrompt(*model_, longer);
        QVERIFY(p.truncated());
        QCOMPARE(p.tokens.size(), std::size_t(model_->config().max_seq_len));
        QCOMPARE(p.original_bytes, longer.size());
        QVERIFY(p.text.size() < longer.size());
        QCOMPARE(longer.compare(0, p.text.size(), p.text), 0);
        const auto doc = traceModel(*model_, longer, {});
        QVERIFY(doc.truncated());
        compareDocuments(doc, traceFromJson(traceToJson(doc)));
    }

    // The CLI gives exactly the in-process export (all but timing and device), in JSON and CSV.
    void cliMatchesInProcessExport() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        struct Case {
            QStringList args;
            TraceRequest req;
        };
        TraceRequest causal;
        causal.mode = RoutingMode::Causal;
        causal.capacity = 0.5;
        TraceRequest gen;
        gen.generate_tokens = 5;
        gen.generation.seed = 9;
        gen.generation.temperature = 0.7f;
        TraceRequest layers;  // the tiny model routes layers 1 and 3
        layers.capacity = 0.5;
        layers.layer_capacity = {-1.0, 0.25, -1.0, 1.0};
        const std::vector<Case> cases = {
            {{}, TraceRequest{}},
            {{"--mode", "causal", "--capacity", "0.5"}, causal},
            {{"--capacity", "1:0.25,0.5,3:1"}, layers},
            {{"--generate", "5", "--seed", "9", "--temperature", "0.7"}, gen},
        };
        for (std::size_t c = 0; c < cases.size(); ++c) {
            const auto json = path(QString("cli%1.json").arg(c)), csv = path(QString("cli%1.csv").arg(c));
            const QStringList common = {"--model",  ckpt_, "--prompt", QString::fromUtf8(kPrompt),
                                        "--device", "cpu"};
            auto r = runCli(common + cases[c].args + QStringList{"--out", json});
            QVERIFY2(r.code == 0, qPrintable(r.err));
            QVERIFY2(r.out.contains("layer") && r.out.contains("processed"), qPrintable(r.out));
            const auto expected = traceModel(*model_, kPrompt, cases[c].req);
            const auto from_cli = loadTrace(json.toStdString());
            compareDocuments(withoutTiming(expected), withoutTiming(from_cli));
            if (QTest::currentTestFailed()) return;
            QCOMPARE(traceToJson(withoutTiming(from_cli)), traceToJson(withoutTiming(expected)));
            if (!cases[c].req.layer_capacity.empty()) {
                const int T = static_cast<int>(from_cli.tokens.size());
                QCOMPARE(from_cli.run.layers[1].k, capacityToK(0.25, T));
                QCOMPARE(from_cli.run.layers[3].k, T);
                QVERIFY2(r.out.contains("layer capacities 1: 0.25, 3: 1"), qPrintable(r.out));
            }
            r = runCli(common + cases[c].args + QStringList{"--out", csv, "--quiet"});
            QVERIFY2(r.code == 0, qPrintable(r.err));
            QVERIFY(r.out.isEmpty());
            QCOMPARE(readAll(csv), traceToCsv(expected));
        }

        // --input reads the prompt from a file; a long one is cut with a note on stderr.
        std::string longer;
        while (model_->tokenizer()->encode(longer).size() <= 200) longer += "fortune cookie, ";
        writeAll(path("long.txt"), longer);
        auto r = runCli({"--model", ckpt_, "--input", path("long.txt"), "--out", path("long.json")});
        QVERIFY2(r.code == 0, qPrintable(r.err));
        QVERIFY2(r.err.contains("note:") && r.err.contains("tracing the first 160"), qPrintable(r.err));
        compareDocuments(withoutTiming(traceModel(*model_, longer, {})),
                         withoutTiming(loadTrace(path("long.json").toStdString())));
        if (QTest::currentTestFailed()) return;

        // A batch: JSON Lines in, one document per prompt out, with index and id.
        const std::vector<std::string> prompts = {"first prompt, short",
                                                  "second \"quoted\" prompt\nwith a newline", "third"};
        writeAll(path("batch.jsonl"),
                 "{\"prompt\": \"first prompt, short\"}\n"
                 "\n"
                 "{\"id\": \"two\", \"prompt\": \"second \\\"quoted\\\" prompt\\nwith a newline\"}\n"
                 "{\"id\": 3, \"prompt\": \"third\"}\n");
        r = runCli({"--model", ckpt_, "--batch", path("batch.jsonl"), "--out", path("batch_out.jsonl")});
        QVERIFY2(r.code == 0, qPrintable(r.err));
        QVERIFY2(r.err.contains("3/3 prompts"), qPrintable(r.err));
        const auto batch = loadTraces(path("batch_out.jsonl").toStdString());
        QCOMPARE(batch.size(), prompts.size());
        const std::vector<std::string> ids = {"", "two", "3"};
        for (std::size_t i = 0; i < prompts.size(); ++i) {
            auto expected = traceModel(*model_, prompts[i], {});
            expected.prompt_index = int(i);
            expected.prompt_id = ids[i];
            expected.prompt_id_integer = i == 2;  // {"id": 3} in, "prompt_id": 3 out
            compareDocuments(withoutTiming(expected), withoutTiming(batch[i]));
            if (QTest::currentTestFailed()) return;
        }
        r = runCli(
            {"--model", ckpt_, "--batch", path("batch.jsonl"), "--out", path("batch_out.csv"), "--quiet"});
        QVERIFY2(r.code == 0, qPrintable(r.err));
        QCOMPARE(readAll(path("batch_out.csv")), tracesToCsv(batch));

        // Python's json and csv modules read what the CLI wrote.
        const auto py = test::runPython(
            "import csv, json, sys\n"
            "d = json.load(open(sys.argv[1], encoding='utf-8'))\n"
            "rows = list(csv.DictReader(open(sys.argv[2], newline='', encoding='utf-8')))\n"
            "assert d['schema'] == 'modscope.trace/4', d['schema']\n"
            "assert len(d['layers']) == d['model']['config']['n_layers']\n"
            "assert all(len(l['selected']) == len(d['tokens']) for l in d['layers'])\n"
            "assert all(l['router_logits'] is None for l in d['layers'] if not l['routed'])\n"
            "assert len(rows) == len(d['layers']) * len(d['tokens']), (len(rows), len(d['tokens']))\n"
            "assert [r['piece'] for r in rows[:len(d['tokens'])]] == [t['piece'] for t in d['tokens']]\n"
            "assert sum(r['selected'] == '1' for r in rows) == d['stats']['processed']\n"
            "b = [json.loads(line) for line in open(sys.argv[3], encoding='utf-8')]\n"
            "assert [x['prompt_id'] for x in b] == ['', 'two', 3], [x['prompt_id'] for x in b]\n"
            "brows = list(csv.DictReader(open(sys.argv[4], newline='', encoding='utf-8')))\n"
            "assert list(brows[0].keys())[:2] == ['prompt_index', 'prompt_id'], list(brows[0].keys())\n"
            "assert {(r['prompt_index'], r['prompt_id']) for r in brows} == {('0', ''), ('1', 'two'), ('2', '3')}\n"
            "routed = [r for r in rows if r['routed'] == '1' and r['phase'] == 'prompt']\n"
            "import math\n"
            "assert all(abs(float(r['gate']) - 1 / (1 + math.exp(-float(r['router_logit'])))) < 1e-6 for r in routed)\n"
            "assert all((float(r['update_ratio']) > 0) == (r['selected'] == '1') for r in routed)\n"
            "assert all(r['update_ratio'] == '' for r in rows if r['routed'] == '0')\n"
            "print('ok')\n",
            {path("cli0.json"), path("cli0.csv"), path("batch_out.jsonl"), path("batch_out.csv")});
        QCOMPARE(py.trimmed(), QString("ok"));
    }

    // Every failure: non-zero exit, one line on stderr that says what is wrong, and no output file.
    void cliFailuresAreClear() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        writeAll(path("prompt.txt"), "hello");
        const auto env = QProcessEnvironment::systemEnvironment();
        auto no_model = env;
        no_model.insert("MODSCOPE_MODEL", path("nowhere"));
        struct Case {
            QStringList args;
            QString expected;
            int code;
            QProcessEnvironment env;
        };
        const QString out = path("fail.json");
        const std::vector<Case> cases = {
            {{"--model", path("missing"), "--prompt", "hi", "--out", out}, "not a model directory", 1, env},
            {{"--model", ckpt_, "--prompt", "hi", "--out", path("fail.txt")},
             "unknown format '.txt'",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--capacity", "abc", "--out", out},
             "--capacity: 'abc' is not a number from 0 to 1",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--capacity", "1.5", "--out", out},
             "--capacity: '1.5'",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--capacity", "2:0.5", "--out", out},
             "--capacity: layer 2 is not a routed layer of",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--capacity", "1:0.5,1:0.25", "--out", out},
             "gives layer 1 twice",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--capacity", "1:x", "--out", out},
             "--capacity: 'x' is not a number from 0 to 1",
             2,
             env},
            {{"--model", ckpt_, "--input", path("nope.txt"), "--out", out}, "no such file", 1, env},
            {{"--model", ckpt_, "--input", tmp_.path(), "--out", out}, "not a regular file", 1, env},
            {{"--model", ckpt_, "--prompt", "hi", "--mode", "sideways", "--out", out},
             "--mode: 'sideways'",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi"}, "--out FILE is required", 2, env},
            {{"--model", ckpt_, "--prompt", "hi", "--input", path("prompt.txt"), "--out", out},
             "exactly one of",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--bogus", "--out", out},
             "unknown argument '--bogus'",
             2,
             env},
            {{"--model", ckpt_, "--prompt", "", "--out", out}, "the prompt is empty", 1, env},
            {{"--model", ckpt_, "--batch", path("prompt.txt"), "--out", out},
             "line 1: not a JSON object",
             1,
             env},
            {{"--model", ckpt_, "--prompt", "hi", "--out", path("no/such/dir/x.json")},
             "cannot write here",
             1,
             env},
            {{"--prompt", "hi", "--out", out}, "MODSCOPE_MODEL", 1, no_model},
        };
        for (const auto& c : cases) {
            const auto r = runCli(c.args, c.env);
            const auto what = c.args.join(' ') + " -> " + r.err;
            QVERIFY2(r.code == c.code, qPrintable(QString("exit %1: ").arg(r.code) + what));
            QVERIFY2(r.err.startsWith("modscope-trace: error: ") && r.err.contains(c.expected),
                     qPrintable(what));
            QVERIFY2(r.err.count('\n') == 1 && r.err.endsWith('\n'), qPrintable(what));
            QVERIFY2(!QFile::exists(out), qPrintable(what));
        }
    }

    // The bad checkpoints (tests/bad_files.cpp) through the command line: exit 1, exactly one line on
    // stderr naming the problem, and no output file.
    void cliRefusesEveryBadCheckpoint() {
        MODSCOPE_SKIP_IF_NO_TOOL_RUNS();
        QTemporaryDir parent;
        const auto bad = badfiles::makeBadCheckpoints(ckpt_.toStdString(), parent.path().toStdString());
        const QString out = path("never.json");
        for (const auto& b : bad) {
            const auto r = runCli({"--model", QString::fromStdString(b.path), "--prompt", "hi", "--out", out});
            const auto what = QString::fromStdString(b.name) + " -> " + r.err;
            QVERIFY2(r.code == 1, qPrintable(QString("exit %1: ").arg(r.code) + what));
            QVERIFY2(r.err.startsWith("modscope-trace: error: ") && r.err.contains(QString::fromStdString(b.expected)),
                     qPrintable(what));
            QVERIFY2(r.err.count('\n') == 1 && r.err.endsWith('\n'), qPrintable(what));
            QVERIFY(!QFile::exists(out));
        }
    }

    // The bad traces (tests/bad_files.cpp), through the readers and through `modscope-trace --check`.
    void badTracesAreRefusedByTheReadersAndTheCli() {
        const auto doc = traceModel(*model_, "the river said unto them, fire and water", {});
        const auto good_path = path("check-good.json");
        saveTrace(good_path.toStdString(), doc);
        saveTrace(path("check-good.csv").toStdString(), doc);
        saveTraces(path("check-good.jsonl").toStdString(), {doc, doc});
        const bool tool = !test::toolRunsSkipped();
        for (const char* name : {"check-good.json", "check-good.csv", "check-good.jsonl"}) {
            if (!tool) break;
            const auto r = runCli({"--check", path(name)});
            QVERIFY2(r.code == 0 && r.err.isEmpty() && r.out.contains(name), qPrintable(r.err));
        }
        if (tool) QVERIFY(runCli({"--check", path("check-good.jsonl")}).out.contains("2 modscope.trace/4 trace documents"));
        if (tool) {  // an empty JSON Lines file holds no documents
            writeAll(path("check-empty.jsonl"), "");
            const auto r = runCli({"--check", path("check-empty.jsonl")});
            QVERIFY2(r.code == 0 && r.out.contains("0 modscope.trace/4 trace documents"), qPrintable(r.out + r.err));
        }

        QTemporaryDir parent;
        const auto bad = badfiles::makeBadTraces(readAll(good_path), parent.path().toStdString());
        QVERIFY(bad.size() >= 10);
        for (const auto& b : bad) {
            const auto msg = errorOf([&] { loadTrace(b.path); });
            QVERIFY2(msg.find(b.expected) != std::string::npos && msg.find(b.path) == 0,
                     qPrintable(QString::fromStdString(b.name + ": " + msg)));
            if (!tool) continue;
            const auto r = runCli({"--check", QString::fromStdString(b.path)});
            const auto what = QString::fromStdString(b.name) + " -> " + r.err;
            QVERIFY2(r.code == 1, qPrintable(QString("exit %1: ").arg(r.code) + what));
            QVERIFY2(r.err.startsWith("modscope-trace: error: ") && r.err.contains(QString::fromStdString(b.expected)),
                     qPrintable(what));
            QVERIFY2(r.err.count('\n') == 1 && r.out.isEmpty(), qPrintable(what));
        }
        // A CSV with a row too many for its header, and a file of another kind.
        if (!tool) return;
        writeAll(path("ragged.csv"), "layer,position\r\n0,1,2\r\n");
        writeAll(path("prompt.txt"), "hello");
        auto r = runCli({"--check", path("ragged.csv")});
        QVERIFY2(r.code == 1 && r.err.contains("ragged.csv: ") && r.err.count('\n') == 1, qPrintable(r.err));
        r = runCli({"--check", path("prompt.txt")});
        QVERIFY2(r.code == 2 && r.err.contains("unknown format '.txt'"), qPrintable(r.err));
    }

    // An export onto a full disk (RLIMIT_FSIZE) or into a folder that cannot be written: an Error saying so,
    // the earlier file intact, and no temporary file left beside it.
    void failedSavesKeepTheEarlierFile() {
        const auto doc = traceModel(*model_, "the house of light", {});
        QTemporaryDir out;
        for (const char* name : {"t.json", "t.jsonl", "t.csv"}) {
            const auto file = QDir(out.path()).filePath(name).toStdString();
            writeAll(QString::fromStdString(file), "earlier");
            {
                test::FileSizeLimit full(64);
                const auto msg = errorOf([&] { saveTrace(file, doc); });
                QVERIFY2(msg.find("left as it was") != std::string::npos, msg.c_str());
            }
            QCOMPARE(readAll(QString::fromStdString(file)), std::string("earlier"));
        }
        QCOMPARE(QDir(out.path()).entryList(QDir::Files | QDir::Hidden).size(), qsizetype(3));
        // A folder that does not exist (and, unless root, one without write permission).
        QVERIFY(errorOf([&] { saveTrace(QDir(out.path()).filePath("no/such/t.json").toStdString(), doc); })
                    .find("cannot write here") != std::string::npos);
        if (::geteuid() != 0) {
            QFile::setPermissions(out.path(), QFileDevice::ReadOwner | QFileDevice::ExeOwner);
            const auto msg = errorOf([&] { saveTrace(QDir(out.path()).filePath("t.json").toStdString(), doc); });
            QFile::setPermissions(out.path(), QFileDevice::ReadOwner | QFileDevice::WriteOwner | QFileDevice::ExeOwner);
            QVERIFY2(msg.find("cannot write here") != std::string::npos, msg.c_str());
            QCOMPARE(readAll(QDir(out.path()).filePath("t.json")), std::string("earlier"));
        }
        QCOMPARE(QDir(out.path()).entryList(QDir::Files | QDir::Hidden).size(), qsizetype(3));
    }

    // Every trace names the backend that ran it; a trace written before the field existed still reads.
    void tracesNameTheirBackend() {
        const auto md = readAll(MODSCOPE_SOURCE_DIR "/docs/TRACE_FORMAT.md");
        const auto start = md.find("```json\n", md.find("### Example")) + 8;
        const auto json = md.substr(start, md.find("```\n", start) - start);
        QCOMPARE(QString::fromStdString(traceFromJson(json).run.backend), QString("cpu-kernels"));
        auto older = json;
        const auto field = older.find("  \"backend\": \"cpu-kernels\",\n");
        QVERIFY(field != std::string::npos);
        older.erase(field, std::string("  \"backend\": \"cpu-kernels\",\n").size());
        QVERIFY(traceFromJson(older).run.backend.empty());
        for (const char* backend : {"ops", "cpu-kernels"}) {
            if (std::string(backend) == "cpu-kernels" && !cpuKernelsEnabled()) continue;
            auto model = Model::open(ckpt_.toStdString(), "cpu", backend);
            const auto doc = traceFromJson(traceToJson(traceModel(*model, "a prompt", {})));
            QCOMPARE(QString::fromStdString(doc.run.backend), QString(backend));
        }
    }

    // A mixture model's trace (docs/TRACE_FORMAT.md, the third version): every expert field survives JSON bit
    // for bit and reaches the CSV; a second-version document with mixture members reads without them; arrays
    // that contradict each other are refused.
    void mixtureTracesRoundTrip() {
        auto tok = Tokenizer::load(test::tinyTokenizerPath());
        auto model = Model::create(test::tinyMixtureConfig(true, 1, tok->vocabSize()), 43, "cpu");
        model->attachTokenizer(std::move(tok));
        test::spreadExpertRouters(*model);
        TraceRequest request;
        request.capacity = 0.5;
        request.generate_tokens = 6;
        const auto doc = traceModel(*model, "the quick brown fox jumps over the lazy dog, again and again", request);
        const auto json = traceToJson(doc);
        const auto back = traceFromJson(json);
        QCOMPARE(traceToJson(back), json);
        int mixtures = 0, kept_out = 0, ran = 0;
        for (std::size_t li = 0; li < doc.run.layers.size(); ++li) {
            const auto& a = doc.run.layers[li];
            const auto& b = back.run.layers[li];
            QCOMPARE(b.moe, a.moe);
            if (!a.moe) continue;
            ++mixtures;
            QVERIFY(b.expert == a.expert && b.expert_choice == a.expert_choice && b.expert_load == a.expert_load);
            QCOMPARE(b.expert_overflow, a.expert_overflow);
            QCOMPARE(b.expert_capacity, a.expert_capacity);
            for (std::size_t t = 0; t < a.expert.size(); ++t) {
                kept_out += a.expertFate(static_cast<int>(t)) == LayerTrace::ExpertFate::KeptOut;
                ran += a.expert[t] >= 0;
                QCOMPARE(std::isnan(b.expert_prob[t]), a.expert_choice[t] < 0);
                if (a.expert_choice[t] >= 0) QCOMPARE(b.expert_prob[t], a.expert_prob[t]);
            }
        }
        QCOMPARE(mixtures, 2);
        QVERIFY(kept_out > 0 && ran > 0);
        QVERIFY(doc.generation && back.generation);
        for (std::size_t i = 0; i < doc.generation->result.steps.size(); ++i)
            QVERIFY(back.generation->result.steps[i].expert == doc.generation->result.steps[i].expert);

        // CSV: a row per layer and token with the expert columns, empty outside mixtures.
        const auto rows = traceRowsFromCsv(traceToCsv(doc));
        const std::size_t T = doc.tokens.size();
        for (const auto& row : rows) {
            const auto& l = doc.run.layers[static_cast<std::size_t>(row.layer)];
            if (!l.moe) {
                QVERIFY(!row.expert && !row.expert_choice && !row.expert_prob);
                continue;
            }
            if (row.phase == "generate") {
                QCOMPARE(*row.expert, doc.generation->result.steps[row.position - T].expert[row.layer]);
                continue;
            }
            QCOMPARE(*row.expert, l.expert[row.position]);
            QCOMPARE(*row.expert_choice, l.expert_choice[row.position]);
            QCOMPARE(bool(row.expert_prob), l.expert_choice[row.position] >= 0);
        }

        // The second version knew no mixtures: its documents' mixture members are ignored.
        using J = nlohmann::ordered_json;
        const J base = J::parse(json);
        J v2 = base;
        v2["schema"] = kTraceSchemaV2;
        v2["model"]["config"].erase("moe_layers");
        v2["model"]["config"].erase("n_experts");
        v2["model"]["config"].erase("noop_experts");
        v2["model"]["config"].erase("expert_capacity_factor");
        v2["generation"] = nullptr;
        v2["layers"][1]["expert"] = "anything";
        for (const auto& l : traceFromJson(v2.dump()).run.layers) QVERIFY(!l.moe && l.expert.empty());

        // Contradictions.
        int first_ran = -1, first_out = -1;
        for (std::size_t t = 0; t < T; ++t) {
            if (first_ran < 0 && doc.run.layers[1].expert[t] >= 0) first_ran = static_cast<int>(t);
            if (first_out < 0 && doc.run.layers[1].expert_choice[t] < 0) first_out = static_cast<int>(t);
        }
        QVERIFY(first_ran >= 0 && first_out >= 0);
        const TraceEdits edits = {
            {[](J& j) { j["layers"][0]["expert"] = J::array(); }, "a layer without a mixture has none"},
            {[](J& j) { j["layers"][1]["moe"] = false; }, "layers[1].moe: false, but the config's moe_layers say true"},
            {[](J& j) { j["layers"][1]["expert_load"][0] = 999; }, "expert_load"},
            {[](J& j) { j["layers"][1]["expert_overflow"] = 7; }, "expert_overflow: 7"},
            {[](J& j) { j["layers"][1]["expert_capacity"] = 1; }, "expert_capacity: 1, but the capacity factor gives"},
            {[&](J& j) { j["layers"][1]["expert"][first_ran] = 3; }, "expert[" + std::to_string(first_ran) + "]: 3 is out of range"},
            {[&](J& j) { j["layers"][1]["expert_prob"][first_out] = 0.5; }, "expert_prob must be null exactly where"},
            {[&](J& j) { j["layers"][1]["expert_choice"][first_out] = 0; }, "but the token was not processed"},
            {[](J& j) { j["layers"][1]["expert_choice"] = J::array(); }, "expert_choice has 0 values"},
            {[](J& j) { j["layers"][1].erase("expert_runner_up"); }, "missing 'expert_runner_up'"},
            {[](J& j) { j["generation"]["steps"][0]["expert"][0] = 1; }, "expected null (a layer without a mixture)"},
            {[](J& j) { j["generation"]["steps"][0].erase("expert"); }, "missing 'expert'"},
        };
        expectEditsRefused(base, edits);
    }

    // Interventions (modscope.trace/4): a run's overrides, token losses and decision values survive JSON and CSV,
    // a third-version document still reads, and contradictions are refused.
    void interventionsRoundTripAndRefusals() {
        TraceRequest request;
        request.overrides = {{1, 2, true}, {3, RoutingOverride::kAllPositions, false}, {3, 4, true}};
        request.decision_values = true;
        request.token_loss = true;
        const auto doc = traceModel(*model_, "Routing decisions, forced and valued.", request);
        const auto T = doc.tokens.size();
        QVERIFY(T > 5 && doc.run.decision_values);
        const auto back = traceFromJson(traceToJson(doc));
        QVERIFY(back.run.overrides == doc.run.overrides);
        QCOMPARE(back.run.keep_capacity, false);
        QVERIFY(back.run.decision_values);
        QCOMPARE(back.run.token_loss.size(), T);
        QVERIFY(std::isnan(back.run.token_loss.back()));
        for (std::size_t t = 0; t + 1 < T; ++t) QCOMPARE(back.run.token_loss[t], doc.run.token_loss[t]);
        for (int li : {1, 3}) QCOMPARE(back.run.layers[li].decision_value, doc.run.layers[li].decision_value);
        QVERIFY(back.run.layers[0].decision_value.empty());
        QCOMPARE(traceToJson(back), traceToJson(doc));

        const auto rows = traceRowsFromCsv(traceToCsv(doc));
        int forced_process = 0, forced_skip = 0, values = 0;
        for (const auto& r : rows) {
            QCOMPARE(bool(r.token_loss), std::size_t(r.position) + 1 < T);
            if (r.token_loss) QCOMPARE(*r.token_loss, doc.run.token_loss[r.position]);
            forced_process += r.forced == "process" ? 1 : 0;
            forced_skip += r.forced == "skip" ? 1 : 0;
            values += r.decision_value ? 1 : 0;
        }
        QCOMPARE(forced_process, 2);             // 1:2 and 3:4
        QCOMPARE(forced_skip, int(T) - 1);       // the rest of layer 3
        QCOMPARE(values, 2 * int(T));            // both routed layers

        using J = nlohmann::ordered_json;
        const J base = J::parse(traceToJson(doc));
        auto v3 = base;  // the third version knows none of this: its members are ignored there
        v3["schema"] = kTraceSchemaV3;
        const auto old = traceFromJson(v3.dump());
        QVERIFY(old.run.token_loss.empty() && old.run.overrides.empty() && !old.run.decision_values);
        QVERIFY(old.run.layers[1].decision_value.empty());
        const TraceEdits edits = {
            {[](J& j) { j["overrides"][0]["layer"] = 0; }, "overrides[0].layer: layer 0 is not a routed layer"},
            {[&](J& j) { j["overrides"][0]["position"] = int(T); }, "overrides[0].position"},
            {[](J& j) { j["overrides"][0].erase("process"); }, "missing 'process'"},
            {[&](J& j) { j["token_loss"][T - 1] = 1.0; }, "the last position has no next token"},
            {[](J& j) { j["token_loss"][0] = -1.0; }, "token_loss[0]"},
            {[](J& j) { j["layers"][1]["decision_value"] = nullptr; }, "come together"},
            {[](J& j) {
                 j["layers"][1]["decision_value"] = nullptr;
                 j["layers"][1]["decision_value_top_selected"] = nullptr;
             },
             "decision values in 1 of the 2 routed layers"},
            {[](J& j) { j["layers"][1]["decision_value_top_selected"] = 0; }, "but the values give"},
            {[](J& j) { j["layers"][0]["decision_value"] = J::array(); }, "a full layer has none"},
            {[](J& j) { j["token_loss"] = nullptr; }, "decision values without token_loss"},
        };
        expectEditsRefused(base, edits);
    }

    // docs/TRACE_FORMAT.md's example is exactly what the writer produces, in JSON and in CSV.
    void documentedExampleIsExact() {
        const auto md = readAll(MODSCOPE_SOURCE_DIR "/docs/TRACE_FORMAT.md");
        const auto block = [&](const std::string& after, const std::string& fence) {
            const auto start = md.find(fence + "\n", md.find(after));
            const auto end = md.find("```\n", start + fence.size() + 1);
            if (start == std::string::npos || end == std::string::npos) return std::string();
            return md.substr(start + fence.size() + 1, end - start - fence.size() - 1);
        };
        const auto json = block("### Example", "```json");
        QVERIFY(!json.empty());
        const auto doc = traceFromJson(json);
        QCOMPARE(traceToJson(doc), json);
        std::string csv = traceToCsv(doc);
        for (std::size_t at; (at = csv.find("\r\n")) != std::string::npos;) csv.replace(at, 2, "\n");
        QCOMPARE(block("The example above as CSV", "```"), csv);
    }

    void defaultModelLookup() {
        qputenv("MODSCOPE_MODEL", ckpt_.toUtf8());
        QCOMPARE(QString::fromStdString(defaultModelDirectory()), ckpt_);
        qputenv("MODSCOPE_MODEL", path("nowhere").toUtf8());
        const auto msg = errorOf([] { defaultModelDirectory(); });
        QVERIFY2(msg.find("MODSCOPE_MODEL") != std::string::npos, msg.c_str());
        qunsetenv("MODSCOPE_MODEL");
        const auto candidates = defaultModelCandidates();
        QVERIFY(candidates.size() >= 3);
        QVERIFY(std::find(candidates.begin(), candidates.end(),
                          MODSCOPE_SOURCE_DIR "/resources/models/default") != candidates.end());
        const auto none = errorOf([] { defaultModelDirectory(); });
        if (!none.empty()) QVERIFY2(none.find("Model zoo") != std::string::npos, none.c_str());
    }
};

MODSCOPE_ENGINE_TEST_MAIN(TraceIoTest)
#include "trace_io_test.moc"
