// spm_bridge: the module side of spm_bridge.h (see there for the rules of the interface).
//
// Everything here runs in the module's own linker namespace with its own heap. Every entry point
// catches every exception; memory handed out is allocated here and released here.
#include "spm_bridge.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

struct msp_processor {
    sentencepiece::SentencePieceProcessor sp;
};

namespace {

// A NUL-terminated copy on this module's heap, or nullptr when even that fails.
char* copyString(const char* data, size_t len) {
    char* out = static_cast<char*>(std::malloc(len + 1));
    if (!out) return nullptr;
    if (len) std::memcpy(out, data, len);
    out[len] = '\0';
    return out;
}

char* copyString(const std::string& s) { return copyString(s.data(), s.size()); }

int fail(char** error, const std::string& message) {
    if (error) *error = copyString(message);
    return MSP_ERROR;
}

// SentencePiece's failed checks read "./src/file.cc(123) [condition] explanation": keep the
// explanation when there is one, the condition otherwise.
std::string statusText(const sentencepiece::util::Status& status) {
    const char* message = status.error_message();
    std::string text = message && *message ? message : "unknown SentencePiece error";
    const size_t cc = text.find(".cc(");
    const size_t open = text.find(") [", cc == std::string::npos ? 0 : cc);
    if (cc != std::string::npos && open != std::string::npos && text.find(' ') > cc) {
        int depth = 0;
        size_t close = std::string::npos;
        for (size_t i = open + 2; i < text.size(); ++i) {
            if (text[i] == '[') ++depth;
            if (text[i] == ']' && --depth == 0) {
                close = i;
                break;
            }
        }
        if (close != std::string::npos) {
            std::string rest = text.substr(close + 1);
            while (!rest.empty() && rest.front() == ' ') rest.erase(0, 1);
            std::string condition = text.substr(open + 3, close - open - 3);
            if (!rest.empty())
                text = rest;
            else if (condition.find("ParseFromArray") != std::string::npos)
                text = "the file does not parse as a SentencePiece model protobuf";
            else
                text = "check failed: " + condition;
        }
    }
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text;
}

// The byte a byte-fallback piece ("<0xAB>") stands for, or -1.
int bytePieceValue(const std::string& piece) {
    if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        return -1;
    };
    const int hi = hex(piece[3]), lo = hex(piece[4]);
    if (hi < 0 || lo < 0) return -1;
    return hi * 16 + lo;
}

// The msp_encoding handed out is the base of this; msp_encoding_free downcasts back to it.
struct Encoding : msp_encoding {
    Encoding() : msp_encoding{} {}
    std::vector<int32_t> id_store;
    std::vector<uint64_t> begin_store, end_store, offset_store;
    std::string piece_store;
};

// Training state is process-global inside SentencePiece (random seed, log level).
std::mutex& trainMutex() {
    static std::mutex m;
    return m;
}

// Feeds the trainer the lines of several files, in order.
class FileLines : public sentencepiece::SentenceIterator {
public:
    explicit FileLines(std::vector<std::string> files) : files_(std::move(files)) { Next(); }

    bool done() const override { return done_; }
    const std::string& value() const override { return line_; }
    sentencepiece::util::Status status() const override { return status_; }

    void Next() override {
        while (!done_) {
            if (!in_.is_open()) {
                if (index_ >= files_.size()) {
                    done_ = true;
                    return;
                }
                in_.open(files_[index_], std::ios::binary);
                if (!in_) {
                    const int err = errno;
                    return setError("cannot open " + files_[index_] + ": " + std::strerror(err));
                }
            }
            if (std::getline(in_, line_)) {
                if (!line_.empty() && line_.back() == '\r') line_.pop_back();
                if (line_.empty()) continue;
                ++lines_;
                return;
            }
            if (in_.bad()) return setError("cannot read " + files_[index_]);
            in_.close();
            in_.clear();
            ++index_;
        }
    }

    std::size_t lines() const { return lines_; }

private:
    void setError(const std::string& message) {
        status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kNotFound, message);
        line_.clear();
        done_ = true;
    }

    std::vector<std::string> files_;
    std::size_t index_ = 0;
    std::ifstream in_;
    std::string line_;
    std::size_t lines_ = 0;
    bool done_ = false;
    sentencepiece::util::Status status_;
};

}  // namespace

extern "C" {

MSP_EXPORT int msp_api_version(void) { return MSP_API_VERSION; }

MSP_EXPORT void msp_string_free(char* s) { std::free(s); }

MSP_EXPORT int msp_processor_load(const char* path, size_t path_len, msp_processor** out, char** error) {
    if (error) *error = nullptr;
    if (!out) return fail(error, "msp_processor_load: no output pointer");
    *out = nullptr;
    try {
        auto p = std::make_unique<msp_processor>();
        const auto status = p->sp.Load(std::string(path ? path : "", path ? path_len : 0));
        if (!status.ok()) return fail(error, statusText(status));
        if (p->sp.GetPieceSize() <= 0) return fail(error, "the model has no pieces");
        *out = p.release();
        return MSP_OK;
    } catch (const std::exception& e) {
        return fail(error, std::string("SentencePiece failed: ") + e.what());
    } catch (...) {
        return fail(error, "SentencePiece failed with an unknown exception");
    }
}

MSP_EXPORT void msp_processor_free(msp_processor* p) {
    try {
        delete p;
    } catch (...) {
    }
}

MSP_EXPORT int msp_vocab_size(const msp_processor* p) {
    try {
        return p ? p->sp.GetPieceSize() : 0;
    } catch (...) {
        return 0;
    }
}

#define MSP_SPECIAL_ID(fn)                       \
    MSP_EXPORT int msp_##fn(const msp_processor* p) { \
        try {                                    \
            return p ? p->sp.fn() : -1;          \
        } catch (...) {                          \
            return -1;                           \
        }                                        \
    }
MSP_SPECIAL_ID(unk_id)
MSP_SPECIAL_ID(bos_id)
MSP_SPECIAL_ID(eos_id)
MSP_SPECIAL_ID(pad_id)
#undef MSP_SPECIAL_ID

MSP_EXPORT int msp_id_to_piece(const msp_processor* p, int id, const char** data, size_t* len) {
    try {
        if (!p || !data || !len || id < 0 || id >= p->sp.GetPieceSize()) return MSP_ERROR;
        const std::string& piece = p->sp.IdToPiece(id);
        *data = piece.c_str();
        *len = piece.size();
        return MSP_OK;
    } catch (...) {
        return MSP_ERROR;
    }
}

MSP_EXPORT int msp_encode(const msp_processor* p, const char* text, size_t len, msp_encoding** out,
                          char** error) {
    if (error) *error = nullptr;
    if (!out) return fail(error, "msp_encode: no output pointer");
    *out = nullptr;
    if (!p) return fail(error, "msp_encode: no processor");
    if (!text && len) return fail(error, "msp_encode: no text");
    // SentencePiece keeps offsets as uint32.
    if (len > UINT32_MAX - 1) return fail(error, "text too long for SentencePiece (4 GiB or more)");
    try {
        sentencepiece::ImmutableSentencePieceText spt;
        const auto status = p->sp.Encode(std::string_view(text ? text : "", len), spt.mutable_proto());
        if (!status.ok()) return fail(error, statusText(status));

        auto enc = std::make_unique<Encoding>();
        const size_t n = spt.pieces_size();
        enc->id_store.resize(n);
        enc->begin_store.resize(n);
        enc->end_store.resize(n);
        enc->offset_store.resize(n + 1);
        for (size_t i = 0; i < n; ++i) {
            const auto piece = spt.pieces(static_cast<int>(i));
            enc->id_store[i] = static_cast<int32_t>(piece.id());
            // Clamp defensively: ranges must stay within the text whatever SentencePiece reports.
            uint64_t b = piece.begin(), e = piece.end();
            if (b > len) b = len;
            if (e > len) e = len;
            if (e < b) e = b;
            enc->begin_store[i] = b;
            enc->end_store[i] = e;
            enc->offset_store[i] = enc->piece_store.size();
            enc->piece_store += piece.piece();
        }
        enc->offset_store[n] = enc->piece_store.size();

        // Byte fallback: SentencePiece gives all of a character's surface to its last byte piece
        // and empty ranges at the same begin to the others. Where the text's bytes are exactly
        // those byte pieces, give each piece its own byte.
        const auto* bytes = reinterpret_cast<const unsigned char*>(text);
        for (size_t u = 0; u < n; ++u) {
            const uint64_t b = enc->begin_store[u], e = enc->end_store[u];
            if (e - b < 2 || !p->sp.IsByte(enc->id_store[u])) continue;
            const size_t count = static_cast<size_t>(e - b);
            if (count > u + 1) continue;
            const size_t s = u + 1 - count;
            bool exact = true;
            for (size_t k = 0; k < count && exact; ++k) {
                const size_t t = s + k;
                const int value = bytePieceValue(
                    enc->piece_store.substr(enc->offset_store[t], enc->offset_store[t + 1] - enc->offset_store[t]));
                exact = p->sp.IsByte(enc->id_store[t]) && value == bytes[b + k] && enc->begin_store[t] == b &&
                        (t == u || enc->end_store[t] == b);
            }
            if (!exact) continue;
            for (size_t k = 0; k < count; ++k) {
                enc->begin_store[s + k] = b + k;
                enc->end_store[s + k] = b + k + 1;
            }
        }

        enc->count = n;
        enc->ids = enc->id_store.data();
        enc->begin = enc->begin_store.data();
        enc->end = enc->end_store.data();
        enc->pieces = enc->piece_store.c_str();
        enc->piece_offset = enc->offset_store.data();
        *out = enc.release();
        return MSP_OK;
    } catch (const std::exception& e) {
        return fail(error, std::string("SentencePiece failed: ") + e.what());
    } catch (...) {
        return fail(error, "SentencePiece failed with an unknown exception");
    }
}

MSP_EXPORT void msp_encoding_free(msp_encoding* e) {
    try {
        delete static_cast<Encoding*>(e);
    } catch (...) {
    }
}

MSP_EXPORT int msp_decode(const msp_processor* p, const int32_t* ids, size_t count, char** out,
                          size_t* out_len, char** error) {
    if (error) *error = nullptr;
    if (!out || !out_len) return fail(error, "msp_decode: no output pointer");
    *out = nullptr;
    *out_len = 0;
    if (!p) return fail(error, "msp_decode: no processor");
    if (!ids && count) return fail(error, "msp_decode: no ids");
    try {
        const int vocab = p->sp.GetPieceSize();
        std::vector<int> list(count);
        for (size_t i = 0; i < count; ++i) {
            if (ids[i] < 0 || ids[i] >= vocab)
                return fail(error, "token id " + std::to_string(ids[i]) + " is outside the vocabulary [0, " +
                                       std::to_string(vocab) + ")");
            list[i] = ids[i];
        }
        std::string text;
        const auto status = p->sp.Decode(list, &text);
        if (!status.ok()) return fail(error, statusText(status));
        char* copy = copyString(text);
        if (!copy) return fail(error, "out of memory");
        *out = copy;
        *out_len = text.size();
        return MSP_OK;
    } catch (const std::exception& e) {
        return fail(error, std::string("SentencePiece failed: ") + e.what());
    } catch (...) {
        return fail(error, "SentencePiece failed with an unknown exception");
    }
}

MSP_EXPORT int msp_train(const char* const* keys, const char* const* values, size_t n_flags,
                         const char* const* input_files, size_t n_files, uint64_t seed, char** error) {
    if (error) *error = nullptr;
    try {
        std::unordered_map<std::string, std::string> kwargs;
        for (size_t i = 0; i < n_flags; ++i) {
            if (!keys || !values || !keys[i] || !values[i]) return fail(error, "msp_train: null flag");
            const std::string key = keys[i];
            if (key == "input") return fail(error, "msp_train: pass input files separately, not as --input");
            kwargs[key] = values[i];
        }
        if (n_files == 0) return fail(error, "no input files to train on");
        std::vector<std::string> files;
        for (size_t i = 0; i < n_files; ++i) {
            if (!input_files || !input_files[i]) return fail(error, "msp_train: null input file name");
            files.emplace_back(input_files[i]);
        }

        // Every file must open; at least one non-empty line must exist (the trainer does not cope
        // well with nothing). Stops reading at the first such line.
        bool any_text = false;
        for (const auto& file : files) {
            std::ifstream in(file, std::ios::binary);
            if (!in) {
                const int err = errno;
                return fail(error, "cannot open " + file + ": " + std::strerror(err));
            }
            std::string line;
            while (!any_text && std::getline(in, line)) {
                if (!line.empty() && line.back() == '\r') line.pop_back();
                any_text = !line.empty();
            }
        }
        if (!any_text) return fail(error, "the input files hold no text (every line is empty)");

        std::lock_guard<std::mutex> lock(trainMutex());
        unsigned int seed32 = static_cast<unsigned int>(seed ^ (seed >> 32));
        if (seed32 == UINT_MAX) seed32 = UINT_MAX - 1;
        sentencepiece::SetRandomGeneratorSeed(seed32);

        FileLines lines(files);
        const auto status = sentencepiece::SentencePieceTrainer::Train(kwargs, &lines);
        if (!lines.status().ok()) return fail(error, statusText(lines.status()));
        if (!status.ok()) return fail(error, statusText(status));
        return MSP_OK;
    } catch (const std::exception& e) {
        return fail(error, std::string("SentencePiece training failed: ") + e.what());
    } catch (...) {
        return fail(error, "SentencePiece training failed with an unknown exception");
    }
}

}  // extern "C"
