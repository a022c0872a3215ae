// Untrusted files, made broken on purpose: one checkpoint directory per kind of defect a file from someone
// else may have, and one trace file per defect, each with the words its refusal must contain. The
// engine tests, the command-line tests and the app tests all refuse the same set. No LibTorch here (the app
// tests use it): tensor edits go through Debian's Python with torch.
#pragma once

#include <string>
#include <vector>

namespace modscope::badfiles {

struct BadFile {
    std::string name;      // the defect, for test output
    std::string path;      // a checkpoint directory, or a trace file
    std::string expected;  // a fragment the error message must contain
};

// Copies the good checkpoint directory into one folder per defect under parent and breaks each:
// weights.pt truncated, empty, random bytes, with a NaN, an infinity, a missing and a wrong-shaped tensor;
// config.json with a billion layers, a negative head count, d_model not divisible by the heads, a huge
// vocabulary, a vocabulary that does not match the tokenizer, a model that fits the bounds but not the
// weights file; tokenizer.model of random bytes. Fails (throws std::runtime_error) when Python fails.
std::vector<BadFile> makeBadCheckpoints(const std::string& good_dir, const std::string& parent);

// Writes one .json file per defect of the good trace text into parent: a wrong schema, per-token and
// per-layer arrays of the wrong length, huge numbers, a truncated file, random bytes, an empty file.
std::vector<BadFile> makeBadTraces(const std::string& good_json, const std::string& parent);

std::string readFile(const std::string& path);
void writeFile(const std::string& path, const std::string& data);

}  // namespace modscope::badfiles
