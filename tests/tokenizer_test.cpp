// modscope::Tokenizer: training, lossless round trips, byte offsets, and clear load errors.
//
// The corpus is generated deterministically here (no dependency on installed text), written to a
// temporary directory, and a small byte-fallback BPE model is trained on it.
#include "modscope/engine.h"

#include <QtCore/QByteArray>
#include <QtCore/QDir>
#include <QtCore/QFile>
#include <QtCore/QTemporaryDir>
#include <QtTest/QtTest>

#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

// Small deterministic generator (SplitMix64), independent of the standard library's engines.
struct Rng {
    std::uint64_t state;
    std::uint64_t next() {
        std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }
    template <size_t N>
    const char* pick(const char* const (&list)[N]) { return list[below(static_cast<int>(N))]; }
};

const char* const kSubjects[] = {"the model", "a router", "every token", "the old man", "my neighbour",
                                 "the committee", "a small dog", "our teacher", "the engineer", "she",
                                 "he", "they", "the river", "this report", "the first layer",
                                 "a quiet student", "the captain", "the weather", "nobody", "the city"};
const char* const kVerbs[] = {"reads", "writes", "skips", "processes", "remembers", "forgets", "follows",
                              "ignores", "measures", "builds", "watches", "carries", "explains", "finds",
                              "answers", "keeps", "opens", "closes", "counts", "changes"};
const char* const kObjects[] = {"the letter", "a long story", "the attention scores", "some bread",
                                "the evening news", "a difficult question", "the map", "every word",
                                "the garden gate", "a cup of tea", "the hidden state", "the last page",
                                "a bright window", "the mountain road", "the second chapter", "his keys",
                                "her notebook", "the budget", "an old song", "the train schedule"};
const char* const kTails[] = {"before dinner", "in the morning", "without a word", "at the station",
                              "for the third time", "again and again", "with great care", "after the storm",
                              "near the harbour", "during the meeting", "under the bridge", "by candlelight",
                              "on Tuesday", "in December", "at noon", "from memory"};
const char* const kJoiners[] = {", and then", "; however,", ", but", ", so", " because", " while",
                                ", although", " until"};
const char* const kEnds[] = {".", ".", ".", "!", "?", "...", ".", "."};

std::string capitalise(std::string s) {
    if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
    return s;
}

std::string sentence(Rng& rng) {
    std::string s = capitalise(rng.pick(kSubjects));
    s += std::string(" ") + rng.pick(kVerbs) + " " + rng.pick(kObjects);
    switch (rng.below(6)) {
    case 0: s += std::string(" ") + rng.pick(kTails); break;
    case 1: s += std::string(rng.pick(kJoiners)) + " " + rng.pick(kSubjects) + " " + rng.pick(kVerbs) + " " +
                 rng.pick(kObjects); break;
    case 2: s += " at " + std::to_string(1 + rng.below(12)) + ":" + std::to_string(10 + rng.below(50)); break;
    case 3: s += " in " + std::to_string(1800 + rng.below(225)); break;
    case 4: s += " for $" + std::to_string(rng.below(1000)) + "." + std::to_string(10 + rng.below(90)); break;
    default: s += " (" + std::to_string(rng.below(100000)) + " times)"; break;
    }
    s += rng.pick(kEnds);
    if (rng.below(10) == 0) s = "\"" + s + "\" said " + rng.pick(kSubjects) + ".";
    return s;
}

// About `bytes` of text: paragraphs of sentences, one paragraph per line, blank lines between.
std::string corpus(std::uint64_t seed, size_t bytes) {
    Rng rng{seed};
    std::string text;
    while (text.size() < bytes) {
        const int n = 1 + rng.below(6);
        for (int i = 0; i < n; ++i) {
            if (i) text += rng.below(15) == 0 ? "  " : " ";
            text += sentence(rng);
        }
        text += rng.below(4) == 0 ? "\n\n" : "\n";
    }
    return text;
}

bool writeFile(const QString& path, const std::string& bytes) {
    std::ofstream out(path.toStdString(), std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return static_cast<bool>(out);
}

std::string readFile(const QString& path) {
    std::ifstream in(path.toStdString(), std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// Every sentence the round trip must reproduce byte for byte.
std::vector<std::pair<const char*, std::string>> samples() {
    return {
        {"plain", "The model reads the letter before dinner."},
        {"punctuation", "Wait -- what?! (Yes; really.) \"Quoted\", 'single', [brackets] {braces} <angle> #hash @at & co."},
        {"digits", "In 1987 it cost $12.50; by 2024, 1,234,567 units at 3.14159 each."},
        {"multiple spaces", "two  spaces,   three,    four.     Five."},
        {"leading and trailing spaces", "   indented text   "},
        {"newlines", "line one\nline two\n\nafter a blank line\n"},
        {"tabs and CRLF", "col1\tcol2\tcol3\r\nnext\r\n"},
        {"emoji", "Routing is fun \xF0\x9F\x98\x80\xF0\x9F\x9A\x80 and \xE2\x9D\xA4\xEF\xB8\x8F done."},
        {"emoji family ZWJ", "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7"},
        {"cyrillic", "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, \xD0\xBC\xD0\xB8\xD1\x80!"},
        {"greek", "\xCE\x9A\xCE\xB1\xCE\xBB\xCE\xB7\xCE\xBC\xCE\xAD\xCF\x81\xCE\xB1 \xCE\xBA\xCF\x8C\xCF\x83\xCE\xBC\xCE\xB5"},
        {"cjk", "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C\xE3\x80\x82\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E"},
        {"arabic", "\xD9\x85\xD8\xB1\xD8\xAD\xD8\xA8\xD8\xA7 \xD8\xA8\xD8\xA7\xD9\x84\xD8\xB9\xD8\xA7\xD9\x84\xD9\x85"},
        {"devanagari", "\xE0\xA4\xA8\xE0\xA4\xAE\xE0\xA4\xB8\xE0\xA5\x8D\xE0\xA4\xA4\xE0\xA5\x87"},
        {"combining accents", "cafe\xCC\x81 na\xC3\xAFve r\xC3\xA9sum\xC3\xA9"},
        {"fullwidth and ligature", "\xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\xA3 \xEF\xAC\x81 \xE2\x84\xA2"},
        {"control characters", std::string("bell\x07 escape\x1B[0m and a NUL:") + std::string(1, '\0') + "end"},
        {"single character", "x"},
        {"only spaces", "     "},
        {"long line", std::string(5000, 'a') + " " + std::string(3000, '7')},
    };
}

}  // namespace

class TokenizerTest : public QObject {
    Q_OBJECT

private:
    QTemporaryDir dir_;
    std::unique_ptr<modscope::Tokenizer> tok_;
    QString modelPath_;
    // 259 ids are fixed (<unk> <s> </s> and 256 byte pieces) and every character the corpus needs
    // for coverage comes next; 384 leaves room for some real merges.
    static constexpr int kVocab = 384;

    modscope::Tokenizer::TrainOptions options(const QString& prefix) const {
        modscope::Tokenizer::TrainOptions o;
        o.input_files = {dir_.filePath("corpus_a.txt").toStdString(), dir_.filePath("corpus_b.txt").toStdString()};
        o.model_prefix = prefix.toStdString();
        o.vocab_size = kVocab;
        o.model_type = "bpe";
        o.seed = 7;
        o.num_threads = 2;
        return o;
    }

    // Ranges are contiguous, inside the text, and together they are the text.
    static void checkOffsets(const std::string& text, const std::vector<modscope::Token>& tokens, bool exact) {
        std::size_t cursor = 0;
        std::string joined;
        for (size_t i = 0; i < tokens.size(); ++i) {
            const auto& t = tokens[i];
            QVERIFY2(t.byte_begin <= t.byte_end, qPrintable(QString("token %1 has begin > end").arg(i)));
            QVERIFY2(t.byte_end <= text.size(), qPrintable(QString("token %1 ends past the text").arg(i)));
            QCOMPARE(t.byte_begin, cursor);
            if (exact)  // valid UTF-8: every token owns at least one byte, so offsets strictly increase
                QVERIFY2(t.byte_end > t.byte_begin, qPrintable(QString("token %1 (%2) is empty")
                                                                   .arg(i)
                                                                   .arg(QString::fromStdString(t.piece))));
            joined += text.substr(t.byte_begin, t.byte_end - t.byte_begin);
            cursor = t.byte_end;
        }
        QCOMPARE(cursor, text.size());
        QVERIFY(joined == text);
    }

    static void expectLoadError(const QString& path, const QString& mustMention) {
        try {
            modscope::Tokenizer::load(path.toStdString());
            QFAIL(qPrintable("loading " + path + " did not throw"));
        } catch (const modscope::Error& e) {
            const QString message = QString::fromUtf8(e.what());
            QVERIFY2(message.contains(mustMention), qPrintable("message without the file name: " + message));
            qDebug().noquote() << "  " << message;
        }
    }

private Q_SLOTS:
    void initTestCase() {
        QVERIFY(dir_.isValid());
        // Two files, ~300 KB together, so the trainer's multi-file input is exercised.
        QVERIFY(writeFile(dir_.filePath("corpus_a.txt"), corpus(1, 200 * 1024)));
        QVERIFY(writeFile(dir_.filePath("corpus_b.txt"), corpus(2, 100 * 1024)));
        const QString prefix = dir_.filePath("tok");
        modscope::Tokenizer::train(options(prefix));
        modelPath_ = prefix + ".model";
        QVERIFY(QFile::exists(modelPath_));
        QVERIFY(QFile::exists(prefix + ".vocab"));
        tok_ = modscope::Tokenizer::load(modelPath_.toStdString());
        QVERIFY(tok_);
    }

    void vocabulary() {
        QCOMPARE(tok_->vocabSize(), kVocab);
        QCOMPARE(tok_->modelPath(), modelPath_.toStdString());
        QCOMPARE(tok_->bosId(), 1);
        QCOMPARE(tok_->eosId(), 2);
        QCOMPARE(tok_->piece(0), std::string("<unk>"));
        QCOMPARE(tok_->piece(1), std::string("<s>"));
        QCOMPARE(tok_->piece(2), std::string("</s>"));
        QCOMPARE(tok_->piece(3), std::string("<0x00>"));
        QCOMPARE(tok_->piece(3 + 255), std::string("<0xFF>"));
        QVERIFY(!tok_->piece(kVocab - 1).empty());
        QVERIFY_THROWS_EXCEPTION(modscope::Error, tok_->piece(-1));
        QVERIFY_THROWS_EXCEPTION(modscope::Error, tok_->piece(kVocab));
        QVERIFY_THROWS_EXCEPTION(modscope::Error, tok_->decode({5, kVocab, 7}));
        QVERIFY_THROWS_EXCEPTION(modscope::Error, tok_->decode({-3}));
        // Learned merges: common corpus words need clearly fewer tokens than bytes.
        const std::string common = "the model reads the letter";
        QString shown;
        for (const auto& t : tok_->encode(common)) shown += "[" + QString::fromStdString(t.piece) + "]";
        qDebug().noquote() << "  " << shown;
        QVERIFY(tok_->encodeIds(common).size() < common.size() * 2 / 3);
    }

    void roundTrip_data() {
        QTest::addColumn<QByteArray>("text");
        for (const auto& [name, text] : samples())
            QTest::newRow(name) << QByteArray(text.data(), static_cast<int>(text.size()));
        QTest::newRow("empty") << QByteArray();
    }

    void roundTrip() {
        QFETCH(QByteArray, text);
        const std::string s(text.constData(), static_cast<size_t>(text.size()));
        const std::vector<int> ids = tok_->encodeIds(s);
        for (int id : ids) QVERIFY2(id != 0, "byte fallback must leave no <unk>");
        QCOMPARE(tok_->decode(ids), s);
        const auto tokens = tok_->encode(s);
        QCOMPARE(tokens.size(), ids.size());
        for (size_t i = 0; i < tokens.size(); ++i) {
            QCOMPARE(tokens[i].id, ids[i]);
            QCOMPARE(tokens[i].piece, tok_->piece(ids[i]));
        }
    }

    void offsets_data() { roundTrip_data(); }

    void offsets() {
        QFETCH(QByteArray, text);
        const std::string s(text.constData(), static_cast<size_t>(text.size()));
        checkOffsets(s, tok_->encode(s), true);
    }

    void byteFallbackOffsets() {
        // An emoji outside the vocabulary becomes its four UTF-8 bytes, one byte per token.
        const std::string s = "a\xF0\x9F\x98\x80";
        const auto tokens = tok_->encode(s);
        QCOMPARE(tokens.size(), size_t(5));
        const char* expected[] = {"<0xF0>", "<0x9F>", "<0x98>", "<0x80>"};
        for (int i = 0; i < 4; ++i) {
            QCOMPARE(tokens[1 + i].piece, std::string(expected[i]));
            QCOMPARE(tokens[1 + i].byte_begin, size_t(1 + i));
            QCOMPARE(tokens[1 + i].byte_end, size_t(2 + i));
        }
    }

    void concatenatedDecode() {
        // No dummy prefix: decoding is concatenation, so text streams token by token.
        const std::string s = " Every token keeps the map  at 10:30.\nThe end";
        const auto ids = tok_->encodeIds(s);
        std::string streamed;
        for (int id : ids) streamed += tok_->decode({id});
        QCOMPARE(streamed, s);
        const auto tokens = tok_->encode(s);
        QCOMPARE(tokens.front().byte_begin, size_t(0));
        QVERIFY(tokens.front().piece.rfind("\xE2\x96\x81", 0) == 0);  // the leading space is "▁"
    }

    void splitDigits() {
        for (const auto& t : tok_->encode("x 1234567890 y")) {
            int digits = 0;
            for (char c : t.piece) digits += (c >= '0' && c <= '9');
            QVERIFY2(digits <= 1, qPrintable(QString::fromStdString("piece with several digits: " + t.piece)));
        }
    }

    void invalidUtf8() {
        // Malformed bytes: SentencePiece encodes each as U+FFFD (its three bytes as byte pieces).
        // No crash, offsets stay inside the text and contiguous; those byte pieces may be empty
        // ranges; decoding gives U+FFFD where each malformed byte was.
        const std::string s = std::string("ok \xFF\xFE then \xC3") + " and \xE2\x82" + "!" + "\x80";
        const auto tokens = tok_->encode(s);
        checkOffsets(s, tokens, false);
        const std::string decoded = tok_->decode(tok_->encodeIds(s));
        QCOMPARE(decoded, std::string("ok \xEF\xBF\xBD\xEF\xBF\xBD then \xEF\xBF\xBD and \xEF\xBF\xBD\xEF\xBF\xBD!\xEF\xBF\xBD"));
        // Decoding byte pieces that do not form UTF-8 gives U+FFFD too, never a crash.
        const std::string half = tok_->decode({3 + 0xF0, 3 + 0x9F});
        QVERIFY(!half.empty());
    }

    void threads() {
        const auto inputs = samples();
        std::vector<std::vector<int>> expected;
        for (const auto& [name, text] : inputs) expected.push_back(tok_->encodeIds(text));
        std::vector<int> failures(4, 0);
        std::vector<std::thread> workers;
        for (int w = 0; w < 4; ++w) {
            workers.emplace_back([&, w] {
                for (int round = 0; round < 50; ++round)
                    for (size_t i = 0; i < inputs.size(); ++i) {
                        const auto& text = inputs[i].second;
                        if (tok_->encodeIds(text) != expected[i] || tok_->decode(expected[i]) != text) ++failures[w];
                        if (tok_->encode(text).size() != expected[i].size()) ++failures[w];
                    }
            });
        }
        for (auto& t : workers) t.join();
        QCOMPARE(failures, std::vector<int>(4, 0));
    }

    void deterministicTraining() {
        const QString prefix = dir_.filePath("again");
        modscope::Tokenizer::train(options(prefix));
        // The .model also records its own model_prefix; pieces and scores are in the .vocab.
        const QString first = modelPath_.left(modelPath_.size() - int(qstrlen(".model"))) + ".vocab";
        QVERIFY(!readFile(first).empty());
        QVERIFY(readFile(prefix + ".vocab") == readFile(first));
    }

    void loadErrors() {
        const QString random = dir_.filePath("random_bytes.model");
        Rng rng{42};
        std::string bytes(4096, '\0');
        for (auto& c : bytes) c = static_cast<char>(rng.next() & 0xFF);
        QVERIFY(writeFile(random, bytes));
        expectLoadError(random, "random_bytes.model");

        const QString empty = dir_.filePath("empty.model");
        QVERIFY(writeFile(empty, ""));
        expectLoadError(empty, "empty.model");

        const QString text = dir_.filePath("corpus_as.model");
        QVERIFY(writeFile(text, corpus(3, 2000)));
        expectLoadError(text, "corpus_as.model");

        expectLoadError(dir_.filePath("missing.model"), "missing.model");
        expectLoadError(dir_.path(), dir_.path());
        QVERIFY_THROWS_EXCEPTION(modscope::Error, modscope::Tokenizer::load(""));
    }

    void trainErrors() {
        auto o = options(dir_.filePath("bad"));
        o.input_files.push_back(dir_.filePath("no_such_corpus.txt").toStdString());
        try {
            modscope::Tokenizer::train(o);
            QFAIL("training on a missing file did not throw");
        } catch (const modscope::Error& e) {
            QVERIFY2(QString(e.what()).contains("no_such_corpus.txt"), e.what());
        }

        o = options(dir_.filePath("bad"));
        o.vocab_size = 10;
        QVERIFY_THROWS_EXCEPTION(modscope::Error, modscope::Tokenizer::train(o));
        o = options(dir_.filePath("bad"));
        o.model_type = "transformer";
        QVERIFY_THROWS_EXCEPTION(modscope::Error, modscope::Tokenizer::train(o));

        const QString blank = dir_.filePath("blank.txt");
        QVERIFY(writeFile(blank, "\n\n\n"));
        o = options(dir_.filePath("bad"));
        o.input_files = {blank.toStdString()};
        QVERIFY_THROWS_EXCEPTION(modscope::Error, modscope::Tokenizer::train(o));

        o = options(dir_.filePath("no_such_dir/sub/tok"));
        QVERIFY_THROWS_EXCEPTION(modscope::Error, modscope::Tokenizer::train(o));
    }
};

QTEST_GUILESS_MAIN(TokenizerTest)
#include "tokenizer_test.moc"
