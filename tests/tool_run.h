// A run of one of the command-line tools for the tests that drive them: exit status, stdout, stderr.
#pragma once

#include <QProcess>
#include <QProcessEnvironment>
#include <QString>
#include <QStringList>

namespace modscope::test {

struct ToolRun {
    int code = -1;  // -1: crashed or did not finish
    QString out, err;
};

// Runs program with args and waits; one that has not finished after timeout_ms is killed ("did not finish").
inline ToolRun runTool(const QString& program, const QStringList& args, int timeout_ms = 180000,
                       const QProcessEnvironment& env = QProcessEnvironment::systemEnvironment()) {
    QProcess p;
    p.setProcessEnvironment(env);
    p.start(program, args);
    ToolRun r;
    if (!p.waitForFinished(timeout_ms)) {
        p.kill();
        p.waitForFinished();
        r.err = QStringLiteral("did not finish");
        return r;
    }
    r.code = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
    r.out = QString::fromUtf8(p.readAllStandardOutput());
    r.err = QString::fromUtf8(p.readAllStandardError());
    return r;
}

}  // namespace modscope::test
