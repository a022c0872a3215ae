// spm_bridge: SentencePiece behind a plain C interface.
//
// Built as the module libmodscope_spm.so and opened with dlmopen(LM_ID_NEWLM, ...) into a linker
// namespace of its own (DEVELOPERS.md: Debian's libsentencepiece carries protobuf 3.14, LibTorch
// links protobuf 3.21, and the two cannot share one namespace). The rules that follow from that:
//
//  * The module has its own libc/libstdc++ copies, hence its own heap: every pointer the module
//    hands out is allocated by it and must be released by it (msp_string_free, msp_encoding_free,
//    msp_processor_free). The caller never frees module memory and never passes its own heap
//    memory to the module for freeing.
//  * No C++ exception crosses this interface: every entry point catches everything and reports
//    failures as a non-zero return and an error string (module-owned, free with msp_string_free).
//  * Only C types cross it. Strings are (pointer, length) pairs, never assumed NUL-terminated on
//    input; strings the module returns are also NUL-terminated for convenience.
//
// The caller resolves every function with dlsym by the names below, checks msp_api_version()
// against MSP_API_VERSION first, and refuses a module of another version.
#ifndef MODSCOPE_SPM_BRIDGE_H
#define MODSCOPE_SPM_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define MSP_EXPORT __attribute__((visibility("default")))
#else
#define MSP_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bumped on any change of a signature, a struct layout or a documented behaviour below.
#define MSP_API_VERSION 1

typedef struct msp_processor msp_processor;  // opaque: a loaded sentencepiece::SentencePieceProcessor

// Result of msp_encode. Every array is owned by the module; release with msp_encoding_free.
typedef struct msp_encoding {
    size_t count;                 // number of tokens
    const int32_t* ids;           // [count] token ids
    const uint64_t* begin;        // [count] byte offset of the token's surface in the input
    const uint64_t* end;          // [count] one past its last byte; begin <= end <= input length
    const char* pieces;           // every piece string, concatenated: piece i is the bytes
    const uint64_t* piece_offset; // [piece_offset[i], piece_offset[i+1]) of pieces; count + 1 entries
} msp_encoding;

// Return codes of the functions that can fail.
#define MSP_OK 0
#define MSP_ERROR 1

// The MSP_API_VERSION the module was built with.
MSP_EXPORT int msp_api_version(void);

// Releases a string the module returned (error messages, decoded text). NULL is a no-op.
MSP_EXPORT void msp_string_free(char* s);

// Loads a model file. On success returns MSP_OK and *out; on failure MSP_ERROR and *error
// (a message without the file name: the caller knows which file it asked for).
MSP_EXPORT int msp_processor_load(const char* path, size_t path_len, msp_processor** out, char** error);
MSP_EXPORT void msp_processor_free(msp_processor* p);

// Vocabulary facts of a loaded model. Special ids are -1 when the model has none.
MSP_EXPORT int msp_vocab_size(const msp_processor* p);
MSP_EXPORT int msp_unk_id(const msp_processor* p);
MSP_EXPORT int msp_bos_id(const msp_processor* p);
MSP_EXPORT int msp_eos_id(const msp_processor* p);
MSP_EXPORT int msp_pad_id(const msp_processor* p);

// The piece string of id, pointing into the processor (valid while it lives; NUL-terminated, but
// use *len). MSP_ERROR when id is outside [0, vocab_size).
MSP_EXPORT int msp_id_to_piece(const msp_processor* p, int id, const char** data, size_t* len);

// Tokenizes text[0, len). Safe to call concurrently on one processor (SentencePiece's const API).
// Offsets are byte offsets into text. SentencePiece gives a character that falls back to byte
// pieces only one surface (on its last byte piece; the others are empty); the module splits that
// surface so that byte piece k covers exactly the k-th byte, whenever the bytes of the text are
// exactly those byte pieces (always so for valid UTF-8 and the identity normalisation). Otherwise
// (malformed UTF-8, which SentencePiece encodes as U+FFFD, or a normalising model) the empty
// ranges stay: ranges are then non-decreasing and contiguous but some are empty.
MSP_EXPORT int msp_encode(const msp_processor* p, const char* text, size_t len, msp_encoding** out,
                          char** error);
MSP_EXPORT void msp_encoding_free(msp_encoding* e);

// Detokenizes ids. *out (NUL-terminated, length *out_len) is module-owned: msp_string_free.
// MSP_ERROR when an id is outside [0, vocab_size).
MSP_EXPORT int msp_decode(const msp_processor* p, const int32_t* ids, size_t count, char** out,
                          size_t* out_len, char** error);

// Trains a model with SentencePieceTrainer::Train. keys/values are the trainer's flags
// (--key=value without the dashes, e.g. "vocab_size" -> "300"); "input" must not be among them:
// the module reads input_files itself, line by line (a trailing '\r' is dropped), and feeds them
// through a SentenceIterator, so file names may contain any character. seed goes to
// sentencepiece::SetRandomGeneratorSeed (this SentencePiece has no trainer flag for it), folded to
// 32 bits as (seed ^ seed >> 32), avoiding 0xffffffff (SentencePiece's "seed from random_device").
// Every input file is opened before training starts; one that cannot be read, or input without a
// single non-empty line, is an error.
// Training is serialised inside the module (the seed and the log level are process globals).
MSP_EXPORT int msp_train(const char* const* keys, const char* const* values, size_t n_flags,
                         const char* const* input_files, size_t n_files, uint64_t seed, char** error);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // MODSCOPE_SPM_BRIDGE_H
