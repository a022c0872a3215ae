#include "piece_text.h"

#include <QStringDecoder>
#include <QStringList>

namespace modscope {

QString pieceLabel(const std::string& piece, int max_chars) {
    QString s;
    if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece.back() == '>') {
        const QString hex = QString::fromLatin1(piece.substr(3, 2).c_str());
        if (hex == QLatin1String("0A")) return QStringLiteral("↵");
        if (hex == QLatin1String("09")) return QStringLiteral("⇥");
        if (hex == QLatin1String("0D")) return QStringLiteral("␍");
        if (hex == QLatin1String("20")) return QStringLiteral("␣");
        bool ok = false;
        const int byte = hex.toInt(&ok, 16);
        if (ok && byte > 0x20 && byte < 0x7F) return QString(QChar(byte));  // "<0x2B>" is "+"
        return QStringLiteral("⟨%1⟩").arg(hex);
    }
    s = QString::fromUtf8(piece.data(), qsizetype(piece.size()));
    s.replace(QChar(0x2581), QChar(0x2423));  // ▁ -> ␣
    s.replace(QLatin1Char('\n'), QChar(0x21B5));
    s.replace(QLatin1Char('\t'), QChar(0x21E5));
    if (max_chars > 1 && s.size() > max_chars) s = s.left(max_chars - 1) + QChar(0x2026);
    return s;
}

QString tokenLabel(const std::string& piece, const std::string& text, int max_chars) {
    const bool byte_piece = piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece.back() == '>';
    if (!byte_piece || text.empty()) return pieceLabel(piece, max_chars);
    QString s = visibleText(text);
    if (max_chars > 1 && s.size() > max_chars) s = s.left(max_chars - 1) + QChar(0x2026);
    return s;
}

QString visibleText(const std::string& text) {
    QString s = QString::fromUtf8(text.data(), qsizetype(text.size()));
    s.replace(QLatin1Char('\t'), QChar(0x21E5));
    s.replace(QLatin1Char('\r'), QString());
    s.replace(QLatin1Char('\n'), QChar(0x21B5));
    return s;
}

bool isWellFormedUtf8(const std::string& bytes) {
    QStringDecoder decoder(QStringDecoder::Utf8, QStringDecoder::Flag::Stateless);
    const QString s = decoder.decode(QByteArrayView(bytes.data(), qsizetype(bytes.size())));
    return !decoder.hasError();
}

QString topPredictionsText(const std::vector<int>& ids, const std::vector<float>& probs,
                           const std::vector<std::string>& pieces, int n, int t) {
    QStringList parts;
    for (int i = 0; i < n; ++i) {
        const auto at = static_cast<std::size_t>(t) * static_cast<std::size_t>(n) + static_cast<std::size_t>(i);
        if (at >= ids.size() || at >= probs.size()) break;
        const QString piece = at < pieces.size() ? pieceLabel(pieces[at], 16) : QString::number(ids[at]);
        parts << QStringLiteral("%1 %2%").arg(piece).arg(100.0 * probs[at], 0, 'f', 1);
    }
    return parts.join(QStringLiteral(", "));
}

}  // namespace modscope
