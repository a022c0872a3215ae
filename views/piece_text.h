// How token text is shown: whitespace made visible, byte pieces named, long pieces shortened.
#pragma once

#include <QString>
#include <string>
#include <vector>

namespace modscope {

// A tokenizer piece as an axis label: SentencePiece's "▁" becomes a visible "␣", byte pieces "<0x0A>"
// become "↵" (newline), "<0x2B>" the printable character "+", others "⟨E2⟩"; anything longer than
// max_chars is elided.
QString pieceLabel(const std::string& piece, int max_chars = 12);

// A token as the heatmap's axis and the token strip both show it: the piece, except that a byte piece shows
// the text it begins (a whole character, as the strip does) where it begins one; text is the token's prompt
// text (RoutingSnapshot::texts), empty for a byte inside a character.
QString tokenLabel(const std::string& piece, const std::string& text, int max_chars = 12);

// The prompt text of one token for running text: newlines and tabs shown as symbols so a token made only
// of whitespace still has something to see.
QString visibleText(const std::string& text);

// Position t's n most probable next tokens (RunTrace::top_ids and top_probs, [T * n], with their pieces) as
// "␣the 21.0%, ␣a 9.5%, …".
QString topPredictionsText(const std::vector<int>& ids, const std::vector<float>& probs,
                           const std::vector<std::string>& pieces, int n, int t);

// Text of a byte range that may split a UTF-8 sequence (byte-fallback tokens): valid UTF-8 or empty.
bool isWellFormedUtf8(const std::string& bytes);

}  // namespace modscope
