// modscope-train, modscope-trace and modscope-bench parse their command lines one way (app/cli): --help and
// --version exit 0, --flag=value means --flag value, a bad command line exits 2 with one line naming the
// option, and a failure once the tool runs exits 1 with one line.
#include <QDir>
#include <QTemporaryDir>
#include <QTest>

#include "tool_run.h"

namespace {

const QString kBinDir = QStringLiteral(MODSCOPE_BIN_DIR);
const QStringList kTools = {"modscope-train", "modscope-trace", "modscope-bench"};

modscope::test::ToolRun run(const QString& tool, const QStringList& args) {
    return modscope::test::runTool(kBinDir + "/" + tool, args, 120000);
}

// Exit `code`, nothing on stdout, and one line on stderr that starts with the tool's name and holds every one
// of `expected`. A run that got under way (`progress`: modscope-bench's "[bench] ..." lines) may print
// progress first; the error is then the last line.
void expectOneLine(const QString& tool, const QStringList& args, int code, const QStringList& expected,
                   bool progress = false) {
    const auto r = run(tool, args);
    const auto what = tool + " " + args.join(' ') + " -> exit " + QString::number(r.code) + ": " + r.err;
    QVERIFY2(r.code == code, qPrintable(what));
    QVERIFY2(r.out.isEmpty(), qPrintable(what + " / stdout: " + r.out));
    QVERIFY2(r.err.endsWith('\n'), qPrintable(what));
    const auto lines = r.err.chopped(1).split('\n');
    QVERIFY2(progress || lines.size() == 1, qPrintable(what));
    const auto& line = lines.back();
    QVERIFY2(line.startsWith(tool + ": error: "), qPrintable(what));
    for (const auto& e : expected) QVERIFY2(line.contains(e), qPrintable(what + " (expected '" + e + "')"));
    if (code == 2) QVERIFY2(line.contains("(see " + tool + " --help)"), qPrintable(what));
}

}  // namespace

class ToolCommandLineTest : public QObject {
    Q_OBJECT
private:
    QTemporaryDir tmp_;

private Q_SLOTS:
    void helpListsTheOptionsAndExitsZero() {
        const QMap<QString, QStringList> options = {
            {"modscope-train", {"--corpus", "--resume", "--evaluate", "--calibrate-causal", "--d-model"}},
            {"modscope-trace", {"--prompt", "--batch", "--capacity", "--generate", "--check"}},
            {"modscope-bench", {"--model", "--json", "--quick", "--sections"}},
        };
        for (const auto& tool : kTools) {
            for (const QString flag : {"--help", "-h"}) {
                if (flag == "-h" && tool != kTools.front()) continue;  // one tool is enough for the short form
                const auto r = run(tool, {flag});
                QVERIFY2(r.code == 0 && r.err.isEmpty(), qPrintable(tool + ": " + r.err));
                QVERIFY2(r.out.contains("usage:") && r.out.contains("--version") && r.out.contains("Exit status"),
                         qPrintable(r.out));
                for (const auto& o : options[tool]) QVERIFY2(r.out.contains(o), qPrintable(tool + " " + o));
            }
        }
    }

    void versionIsTheProjectVersion() {
        for (const auto& tool : kTools) {
            const auto r = run(tool, {"--version"});
            QVERIFY2(r.code == 0 && r.err.isEmpty(), qPrintable(r.err));
            QVERIFY2(r.out.startsWith(tool + " " MODSCOPE_PROJECT_VERSION) && r.out.count('\n') == 1,
                     qPrintable(r.out));
        }
    }

    // --flag=value reaches the tool as --flag value does: each run fails on the value it was given, which
    // the message names.
    void flagEqualsValueIsTheSameAsTwoArguments() {
        QVERIFY(tmp_.isValid());
        const QString missing = tmp_.filePath("missing.txt"), out = tmp_.filePath("out");
        for (const bool joined : {false, true}) {
            const auto arg = [joined](const QString& flag, const QString& value) {
                return joined ? QStringList{flag + "=" + value} : QStringList{flag, value};
            };
            expectOneLine("modscope-train", arg("--corpus", missing) + arg("--out", out), 1,
                          {"missing.txt: no such corpus file"});
            expectOneLine("modscope-trace", arg("--check", tmp_.filePath("missing.json")), 1, {"missing.json"});
            expectOneLine("modscope-bench", arg("--model", tmp_.filePath("nowhere")) + arg("--sections", "forward"),
                          1, {"nowhere: not a model directory"}, true);
            expectOneLine("modscope-trace", arg("--capacity", "0.5x"), 2, {"--capacity", "'0.5x'"});
        }
    }

    void badCommandLinesExitTwoNamingTheOption() {
        for (const auto& tool : kTools) {
            expectOneLine(tool, {"--bogus"}, 2, {"unknown argument '--bogus'"});
            expectOneLine(tool, {"stray"}, 2, {"unexpected argument 'stray'"});
        }
        expectOneLine("modscope-bench", {"--bogus=3"}, 2, {"--bogus"});
        expectOneLine("modscope-train", {"--corpus"}, 2, {"--corpus needs a value"});
        expectOneLine("modscope-train", {"--steps", "many"}, 2, {"--steps: 'many' is not a whole number"});
        expectOneLine("modscope-train", {"--steps", "0"}, 2, {"--steps: '0'"});
        expectOneLine("modscope-train", {"--lr", "1e999"}, 2, {"--lr: '1e999' is not a number"});
        expectOneLine("modscope-train", {"--seq-lens", "64,x"}, 2, {"--seq-lens: 'x'"});
        expectOneLine("modscope-train", {"--routed", ","}, 2, {"--routed: ',' is an empty list"});
        expectOneLine("modscope-train", {"--out", tmp_.filePath("m")}, 2, {"no --corpus given"});
        expectOneLine("modscope-trace", {"--capacity", "1.5"}, 2, {"--capacity: '1.5' is not a number from 0 to 1"});
        expectOneLine("modscope-trace", {"--mode", "sideways"}, 2, {"--mode: 'sideways' is not one of topk|causal"});
        expectOneLine("modscope-trace", {"--seed", "-1"}, 2, {"--seed: '-1'"});
        expectOneLine("modscope-trace", {"--generate", "1e3"}, 2, {"--generate: '1e3'"});
        expectOneLine("modscope-trace", {"--prompt", "hi"}, 2, {"--out FILE is required"});
        expectOneLine("modscope-bench", {"--sections", "forward,nope"}, 2, {"--sections: unknown section 'nope'"});
        expectOneLine("modscope-bench", {"--json"}, 2, {"--json needs a value"});
    }

    // A flag given twice keeps its last value, as before the shared parser.
    void aRepeatedFlagKeepsItsLastValue() {
        expectOneLine("modscope-trace", {"--prompt", "hi", "--capacity", "2", "--capacity", "0.5"}, 2,
                      {"--out FILE is required"});
        expectOneLine("modscope-trace", {"--check", tmp_.filePath("first.json"), "--check", tmp_.filePath("second.json")},
                      1, {"second.json"});
    }
};

QTEST_GUILESS_MAIN(ToolCommandLineTest)
#include "tool_command_line_test.moc"
