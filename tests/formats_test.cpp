// The formats library on its own (no LibTorch): SHA-256 against published known-answer vectors, and atomic
// writes.
#include <QCryptographicHash>
#include <QDir>
#include <QFile>
#include <QTemporaryDir>
#include <QTest>

#include "formats/file_io.h"
#include "formats/sha256.h"
#include "modscope/engine.h"

using namespace modscope;

class FormatsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    // FIPS 180-2's examples (appendix B) and the empty string.
    void sha256KnownAnswers() {
        QCOMPARE(QString::fromStdString(sha256Hex("")),
                 QString("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        QCOMPARE(QString::fromStdString(sha256Hex("abc")),
                 QString("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        QCOMPARE(QString::fromStdString(sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
                 QString("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
        QCOMPARE(QString::fromStdString(sha256Hex(std::string(1000000, 'a'))),
                 QString("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
        // Lengths around the 55/56/64-byte padding boundaries agree with Qt's implementation.
        for (int n : {55, 56, 57, 63, 64, 65, 119, 120, 128}) {
            const std::string s(static_cast<std::size_t>(n), 'x');
            const auto want = QCryptographicHash::hash(QByteArray::fromStdString(s), QCryptographicHash::Sha256).toHex();
            QCOMPARE(QString::fromStdString(sha256Hex(s)), QString::fromLatin1(want));
        }
    }

    void atomicWriteReplacesAndLeavesNoTemporary() {
        QTemporaryDir dir;
        const auto path = dir.filePath("file.json").toStdString();
        writeFileAtomic(path, "first");
        writeFileAtomic(path, "second");
        QCOMPARE(QString::fromStdString(readFileBounded(path, 100)), QString("second"));
        QCOMPARE(QDir(dir.path()).entryList(QDir::Files | QDir::Hidden).size(), qsizetype(1));
        QVERIFY_THROWS_EXCEPTION(Error, writeFileAtomic(dir.filePath("missing/file.json").toStdString(), "x"));
    }
};

QTEST_GUILESS_MAIN(FormatsTest)
#include "formats_test.moc"
