// modscope::Tokenizer: SentencePiece through the libmodscope_spm.so module (model/spm_bridge).
//
// Debian's libsentencepiece carries its own protobuf 3.14 and LibTorch links protobuf 3.21; in one
// linker namespace they crash or abort on a version check. The module links SentencePiece behind a
// C interface and is opened with dlmopen(LM_ID_NEWLM) into a namespace of its own, once per process,
// and stays loaded. Memory the module hands out goes back to the module (its own heap).
#include "modscope/engine.h"

#include "spm_bridge.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace modscope {
namespace {

constexpr const char* kModuleName = "libmodscope_spm.so";

// The module's entry points, resolved once.
struct SpmModule {
    void* handle = nullptr;
    std::string path;
    std::string error;  // why no module could be loaded (handle == nullptr)

    decltype(&msp_api_version) api_version = nullptr;
    decltype(&msp_string_free) string_free = nullptr;
    decltype(&msp_processor_load) processor_load = nullptr;
    decltype(&msp_processor_free) processor_free = nullptr;
    decltype(&msp_vocab_size) vocab_size = nullptr;
    decltype(&msp_unk_id) unk_id = nullptr;
    decltype(&msp_bos_id) bos_id = nullptr;
    decltype(&msp_eos_id) eos_id = nullptr;
    decltype(&msp_pad_id) pad_id = nullptr;
    decltype(&msp_id_to_piece) id_to_piece = nullptr;
    decltype(&msp_encode) encode = nullptr;
    decltype(&msp_encoding_free) encoding_free = nullptr;
    decltype(&msp_decode) decode = nullptr;
    decltype(&msp_train) train = nullptr;

    // Takes a module error string, frees it on the module's heap, returns it (or fallback).
    std::string takeError(char* message, const char* fallback) const {
        std::string text = message && *message ? message : fallback;
        if (message) string_free(message);
        return text;
    }
};

bool isFile(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string executableDir() {
    std::vector<char> buf(PATH_MAX + 1);
    for (;;) {
        const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size());
        if (n < 0) return {};
        if (static_cast<size_t>(n) < buf.size()) {
            std::string exe(buf.data(), static_cast<size_t>(n));
            const auto slash = exe.rfind('/');
            return slash == std::string::npos ? std::string() : exe.substr(0, slash);
        }
        buf.resize(buf.size() * 2);
    }
}

template <typename F>
bool resolve(void* handle, const char* name, F& out, std::string& error) {
    dlerror();
    void* sym = ::dlsym(handle, name);
    if (!sym) {
        const char* why = dlerror();
        error = std::string("missing symbol ") + name + (why ? std::string(" (") + why + ")" : std::string());
        return false;
    }
    out = reinterpret_cast<F>(sym);
    return true;
}

// Opens one candidate; on failure returns false with the reason in `error` and nothing left open.
bool tryOpen(const std::string& path, SpmModule& m, std::string& error) {
    dlerror();
    void* handle = ::dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char* why = dlerror();
        error = std::string("dlmopen failed: ") + (why ? why : "unknown error");
        return false;
    }
    SpmModule c;
    c.handle = handle;
    c.path = path;
    bool ok = resolve(handle, "msp_api_version", c.api_version, error);
    if (ok && c.api_version() != MSP_API_VERSION) {
        error = "API version " + std::to_string(c.api_version()) + ", this program needs " +
                std::to_string(MSP_API_VERSION);
        ok = false;
    }
    ok = ok && resolve(handle, "msp_string_free", c.string_free, error) &&
         resolve(handle, "msp_processor_load", c.processor_load, error) &&
         resolve(handle, "msp_processor_free", c.processor_free, error) &&
         resolve(handle, "msp_vocab_size", c.vocab_size, error) &&
         resolve(handle, "msp_unk_id", c.unk_id, error) && resolve(handle, "msp_bos_id", c.bos_id, error) &&
         resolve(handle, "msp_eos_id", c.eos_id, error) && resolve(handle, "msp_pad_id", c.pad_id, error) &&
         resolve(handle, "msp_id_to_piece", c.id_to_piece, error) &&
         resolve(handle, "msp_encode", c.encode, error) &&
         resolve(handle, "msp_encoding_free", c.encoding_free, error) &&
         resolve(handle, "msp_decode", c.decode, error) && resolve(handle, "msp_train", c.train, error);
    if (!ok) {
        ::dlclose(handle);
        return false;
    }
    m = std::move(c);
    return true;
}

SpmModule loadModule() {
    std::vector<std::pair<std::string, std::string>> candidates;  // path, where it came from
    if (const char* env = std::getenv("MODSCOPE_SPM_MODULE"); env && *env)
        candidates.emplace_back(env, "$MODSCOPE_SPM_MODULE");
    const std::string dir = executableDir();
    if (!dir.empty()) {
        candidates.emplace_back(dir + "/" + kModuleName, "beside the executable");
        candidates.emplace_back(dir + "/../lib/modscope/" + kModuleName, "installed layout");
    }
#ifdef MODSCOPE_SPM_BUILD_PATH
    candidates.emplace_back(MODSCOPE_SPM_BUILD_PATH, "build tree");
#endif

    std::string tried;
    std::vector<std::string> seen;
    for (const auto& [path, origin] : candidates) {
        if (std::find(seen.begin(), seen.end(), path) != seen.end()) continue;
        seen.push_back(path);
        std::string why;
        SpmModule m;
        if (!isFile(path)) {
            why = "not found";
        } else if (tryOpen(path, m, why)) {
            return m;
        }
        tried += "\n  " + path + " (" + origin + "): " + why;
    }
    SpmModule none;
    none.error = std::string("cannot load the SentencePiece module ") + kModuleName +
                 "; set MODSCOPE_SPM_MODULE to its path. Tried:" + tried;
    return none;
}

// The module, loaded on first use (thread-safe) and kept for the life of the process.
const SpmModule& spm() {
    static const SpmModule module = loadModule();
    if (!module.handle) throw Error(module.error);
    return module;
}

// Why `path` cannot be read as a file, or empty when it can.
std::string unreadableReason(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return std::strerror(errno);
    if (S_ISDIR(st.st_mode)) return "is a directory";
    if (!S_ISREG(st.st_mode)) return "not a regular file";
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::strerror(errno ? errno : EACCES);
    return {};
}

}  // namespace

struct Tokenizer::Impl {
    const SpmModule* module = nullptr;
    msp_processor* processor = nullptr;
    std::string path;
    int vocab = 0;
    int bos = -1;
    int eos = -1;

    ~Impl() {
        if (processor) module->processor_free(processor);
    }

    void checkId(int id) const {
        if (id < 0 || id >= vocab)
            throw Error(path + ": token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                        std::to_string(vocab) + ")");
    }

    // Runs msp_encode and hands the module's result to `use` before freeing it.
    template <typename Use>
    void withEncoding(const std::string& text, Use&& use) const {
        msp_encoding* enc = nullptr;
        char* err = nullptr;
        if (module->encode(processor, text.data(), text.size(), &enc, &err) != MSP_OK)
            throw Error(path + ": cannot encode text: " + module->takeError(err, "unknown error"));
        struct Free {
            const SpmModule* m;
            msp_encoding* e;
            ~Free() { m->encoding_free(e); }
        } guard{module, enc};
        use(*enc);
    }
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& model_path) {
    if (model_path.empty()) throw Error("tokenizer: no model file given");
    if (const std::string why = unreadableReason(model_path); !why.empty())
        throw Error("cannot open tokenizer model " + model_path + ": " + why);

    struct stat st {};
    if (::stat(model_path.c_str(), &st) == 0 && st.st_size == 0)
        throw Error(model_path + ": not a SentencePiece model (the file is empty)");

    const SpmModule& m = spm();
    msp_processor* processor = nullptr;
    char* err = nullptr;
    if (m.processor_load(model_path.data(), model_path.size(), &processor, &err) != MSP_OK)
        throw Error(model_path + ": not a SentencePiece model (" + m.takeError(err, "unknown error") + ")");

    std::unique_ptr<Tokenizer> t(new Tokenizer());
    t->impl_->module = &m;
    t->impl_->processor = processor;
    t->impl_->path = model_path;
    t->impl_->vocab = m.vocab_size(processor);
    t->impl_->bos = m.bos_id(processor);
    t->impl_->eos = m.eos_id(processor);
    return t;
}

std::vector<Token> Tokenizer::encode(const std::string& text) const {
    std::vector<Token> tokens;
    impl_->withEncoding(text, [&](const msp_encoding& e) {
        tokens.resize(e.count);
        for (size_t i = 0; i < e.count; ++i) {
            Token& t = tokens[i];
            t.id = e.ids[i];
            t.piece.assign(e.pieces + e.piece_offset[i], e.piece_offset[i + 1] - e.piece_offset[i]);
            t.byte_begin = static_cast<std::size_t>(e.begin[i]);
            t.byte_end = static_cast<std::size_t>(e.end[i]);
        }
    });
    return tokens;
}

std::vector<int> Tokenizer::encodeIds(const std::string& text) const {
    std::vector<int> ids;
    impl_->withEncoding(text, [&](const msp_encoding& e) { ids.assign(e.ids, e.ids + e.count); });
    return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
    std::vector<std::int32_t> list(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        impl_->checkId(ids[i]);
        list[i] = ids[i];
    }
    char* out = nullptr;
    size_t len = 0;
    char* err = nullptr;
    const SpmModule& m = *impl_->module;
    if (m.decode(impl_->processor, list.data(), list.size(), &out, &len, &err) != MSP_OK)
        throw Error(impl_->path + ": cannot decode: " + m.takeError(err, "unknown error"));
    std::string text(out, len);
    m.string_free(out);
    return text;
}

std::string Tokenizer::piece(int id) const {
    impl_->checkId(id);
    const char* data = nullptr;
    size_t len = 0;
    if (impl_->module->id_to_piece(impl_->processor, id, &data, &len) != MSP_OK)
        throw Error(impl_->path + ": no piece for token id " + std::to_string(id));
    return std::string(data, len);
}

int Tokenizer::vocabSize() const { return impl_->vocab; }
int Tokenizer::eosId() const { return impl_->eos; }
int Tokenizer::bosId() const { return impl_->bos; }
std::string Tokenizer::modelPath() const { return impl_->path; }

void Tokenizer::train(const TrainOptions& o) {
    const std::string target = o.model_prefix + ".model";
    auto bad = [&](const std::string& what) { return Error("cannot train tokenizer " + target + ": " + what); };
    if (o.model_prefix.empty()) throw Error("cannot train tokenizer: no model_prefix given");
    if (o.input_files.empty()) throw bad("no input files");
    for (const auto& file : o.input_files)
        if (const std::string why = unreadableReason(file); !why.empty())
            throw bad("cannot open input " + file + ": " + why);
    // 3 specials + 256 byte pieces come first; SentencePiece checks the rest against the characters.
    if (o.vocab_size < 260 || o.vocab_size > 1000000)
        throw bad("vocab_size " + std::to_string(o.vocab_size) +
                  " out of range [260, 1000000] (259 ids are taken by <unk> <s> </s> and the 256 bytes)");
    if (o.model_type != "bpe" && o.model_type != "unigram" && o.model_type != "char" && o.model_type != "word")
        throw bad("model_type \"" + o.model_type + "\" is not one of bpe, unigram, char, word");
    if (!(o.character_coverage > 0.0 && o.character_coverage <= 1.0))
        throw bad("character_coverage " + std::to_string(o.character_coverage) + " is not in (0, 1]");
    if (o.input_sentence_size < 0) throw bad("input_sentence_size is negative");
    if (o.num_threads < 1 || o.num_threads > 128)
        throw bad("num_threads " + std::to_string(o.num_threads) + " out of range [1, 128]");

    char coverage[64];
    std::snprintf(coverage, sizeof coverage, "%.17g", o.character_coverage);
    const std::vector<std::pair<std::string, std::string>> flags = {
        {"model_prefix", o.model_prefix},
        {"vocab_size", std::to_string(o.vocab_size)},
        {"model_type", o.model_type},
        {"character_coverage", coverage},
        {"input_sentence_size", std::to_string(o.input_sentence_size)},
        {"shuffle_input_sentence", "true"},
        {"num_threads", std::to_string(o.num_threads)},
        {"max_sentence_length", "16384"},
        {"train_extremely_large_corpus", "false"},
        // Lossless: any byte sequence encodes without <unk>, and the text is not rewritten, so byte
        // offsets map 1:1 and decode(encode(x)) == x for valid UTF-8.
        {"byte_fallback", "true"},
        {"normalization_rule_name", "identity"},
        {"remove_extra_whitespaces", "false"},
        // No dummy "▁" before the text: decode is then plain concatenation of pieces (leading
        // spaces survive, and decode(a) + decode(b) == decode(a + b) for streamed generation).
        {"add_dummy_prefix", "false"},
        {"split_digits", "true"},
        {"unk_id", "0"},
        {"bos_id", "1"},
        {"eos_id", "2"},
        {"pad_id", "-1"},
        // Training logs every step to stderr; errors come back as the status message instead.
        {"minloglevel", "2"},
    };
    std::vector<const char*> keys, values, files;
    for (const auto& [k, v] : flags) {
        keys.push_back(k.c_str());
        values.push_back(v.c_str());
    }
    for (const auto& f : o.input_files) files.push_back(f.c_str());

    const SpmModule& m = spm();
    char* err = nullptr;
    if (m.train(keys.data(), values.data(), keys.size(), files.data(), files.size(), o.seed, &err) != MSP_OK)
        throw bad(m.takeError(err, "SentencePiece training failed"));
}

}  // namespace modscope
