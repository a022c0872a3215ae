// modscope --screenshot: runs the prompt, writes the whole window as a PNG of the window's size, exits 0;
// and the command line's errors exit 2 with a message.
#include <QImage>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>

#include "app_fixture.h"

class AppScreenshotTest : public QObject {
    Q_OBJECT

private:
    QTemporaryDir dir_;
    QString model_dir_;

    struct Result {
        int exit_code = -1;
        QString out, err;
    };
    Result runApp(const QStringList& args) {
        QProcess p;
        QProcessEnvironment env = QProcessEnvironment::systemEnvironment();
        env.insert(QStringLiteral("QT_QPA_PLATFORM"), QStringLiteral("offscreen"));
        env.insert(QStringLiteral("XDG_CONFIG_HOME"), dir_.filePath(QStringLiteral("config")));
        p.setProcessEnvironment(env);
        p.start(QStringLiteral(MODSCOPE_APP_PATH), args);
        if (!p.waitForFinished(120000)) {
            p.kill();
            p.waitForFinished();
            return {};
        }
        return {p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1, QString::fromUtf8(p.readAllStandardOutput()),
                QString::fromUtf8(p.readAllStandardError())};
    }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(dir_.isValid());
        model_dir_ = dir_.filePath(QStringLiteral("model"));
        modscope::apptest::writeFixtureModel(model_dir_.toStdString());
    }

    void screenshotWritesAPngOfTheWindowSize() {
        const QString png = dir_.filePath(QStringLiteral("shot.png"));
        const auto r = runApp({QStringLiteral("--model"), model_dir_, QStringLiteral("--prompt"),
                               QStringLiteral("the quick brown fox jumps over the lazy dog"), QStringLiteral("--capacity"),
                               QStringLiteral("0.5"), QStringLiteral("--mode"), QStringLiteral("causal"),
                               QStringLiteral("--screenshot"), png});
        QVERIFY2(r.exit_code == 0, qPrintable(r.err));
        const QImage image(png);
        QVERIFY(!image.isNull());
        QCOMPARE(image.size(), QSize(1600, 1000));
        // Not a blank window: the heatmap's colours are in it.
        QSet<QRgb> colours;
        for (int y = 0; y < image.height(); y += 7)
            for (int x = 0; x < image.width(); x += 7) colours.insert(image.pixel(x, y));
        QVERIFY(colours.size() > 50);
    }

    // With --generate the picture is the generation's view, taken when the generation ends (no run follows it).
    void screenshotAfterGeneratingWaitsForTheGenerationOnly() {
        const QString png = dir_.filePath(QStringLiteral("generated.png"));
        const auto r = runApp({QStringLiteral("--model"), model_dir_, QStringLiteral("--prompt"), QStringLiteral("fire"),
                               QStringLiteral("--generate"), QStringLiteral("4"), QStringLiteral("--screenshot"), png});
        QVERIFY2(r.exit_code == 0, qPrintable(r.err));
        QVERIFY2(!r.err.contains(QStringLiteral("timed out")), qPrintable(r.err));
        QVERIFY(!QImage(png).isNull());
    }

    void screenshotSizeAndThemeCanBeChosen() {
        const QString png = dir_.filePath(QStringLiteral("dark.png"));
        const auto r = runApp({QStringLiteral("--model"), model_dir_, QStringLiteral("--prompt"), QStringLiteral("fire"),
                               QStringLiteral("--theme"), QStringLiteral("dark"), QStringLiteral("--size"),
                               QStringLiteral("1280x800"), QStringLiteral("--screenshot"), png});
        QVERIFY2(r.exit_code == 0, qPrintable(r.err));
        const QImage image(png);
        QCOMPARE(image.size(), QSize(1280, 800));
        QVERIFY(qGray(image.pixel(image.width() / 2, image.height() - 5)) < 128);  // dark status bar
    }

    void aBrokenModelStillGivesAScreenshotButFails() {
        const QString png = dir_.filePath(QStringLiteral("broken.png"));
        const auto r = runApp({QStringLiteral("--model"), dir_.filePath(QStringLiteral("nowhere")),
                               QStringLiteral("--screenshot"), png});
        QCOMPARE(r.exit_code, 1);
        QVERIFY(r.err.contains(QStringLiteral("nowhere")));
        QVERIFY(!QImage(png).isNull());  // the window with its error message
    }

    void badArgumentsExitWithUsage() {
        for (const QStringList& args : {QStringList{QStringLiteral("--capacity"), QStringLiteral("1.5")},
                                        QStringList{QStringLiteral("--mode"), QStringLiteral("sideways")},
                                        QStringList{QStringLiteral("--bogus")}}) {
            const auto r = runApp(args);
            QCOMPARE(r.exit_code, 2);
            QVERIFY(r.err.contains(QStringLiteral("modscope:")));
        }
        const auto help = runApp({QStringLiteral("--help")});
        QCOMPARE(help.exit_code, 0);
        QVERIFY(help.out.contains(QStringLiteral("--screenshot")));
    }
};

QTEST_MAIN(AppScreenshotTest)
#include "app_screenshot_test.moc"
