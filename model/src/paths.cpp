// Locating the bundled default model (modscope/paths.h).
#include "modscope/paths.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "modscope/engine.h"

#ifndef MODSCOPE_SOURCE_DIR
#define MODSCOPE_SOURCE_DIR ""
#endif

namespace modscope {

namespace fs = std::filesystem;

namespace {

bool holdsCheckpoint(const std::string& dir) {
    std::error_code ec;
    return fs::is_regular_file(fs::path(dir) / "config.json", ec);
}

std::string normal(const fs::path& p) {
    return p.lexically_normal().string();
}

}  // namespace

std::string executableDirectory() {
    std::error_code ec;
    const auto exe = fs::read_symlink("/proc/self/exe", ec);
    if (ec || exe.empty()) return {};
    return exe.parent_path().string();
}

std::vector<std::string> defaultModelCandidates() {
    if (const char* env = std::getenv("MODSCOPE_MODEL"); env && *env) return {env};
    std::vector<std::string> out;
    const auto exe = executableDirectory();
    if (!exe.empty()) {
        const fs::path d(exe);
        out.push_back(normal(d / ".." / "resources" / "models" / "default"));
        out.push_back(normal(d / ".." / ".." / "resources" / "models" / "default"));
        out.push_back(normal(d / ".." / "share" / "modscope" / "models" / "default"));
    }
    const std::string source = MODSCOPE_SOURCE_DIR;
    if (!source.empty()) {
        const auto p = normal(fs::path(source) / "resources" / "models" / "default");
        bool seen = false;
        for (const auto& c : out) seen = seen || c == p;
        if (!seen) out.push_back(p);
    }
    return out;
}

std::string defaultModelDirectory() {
    const auto candidates = defaultModelCandidates();
    for (const auto& c : candidates)
        if (holdsCheckpoint(c)) return c;
    if (const char* env = std::getenv("MODSCOPE_MODEL"); env && *env)
        throw Error(std::string("MODSCOPE_MODEL is set to '") + env +
                    "', which is not a model directory (no config.json there)");
    std::string places;
    for (const auto& c : candidates) places += (places.empty() ? "" : ", ") + c;
    throw Error("no default model found (looked in " + (places.empty() ? std::string("no place") : places) +
                "); build it as README.md describes in \"Model zoo\", or name a model directory "
                "(--model DIR or MODSCOPE_MODEL=DIR)");
}

std::vector<BundledModel> bundledModels() {
    std::vector<std::string> folders;  // the places a default model is searched, without the "default"
    const auto exe = executableDirectory();
    if (!exe.empty()) {
        const fs::path d(exe);
        folders.push_back(normal(d / ".." / "resources" / "models"));
        folders.push_back(normal(d / ".." / ".." / "resources" / "models"));
        folders.push_back(normal(d / ".." / "share" / "modscope" / "models"));
    }
    if (const std::string source = MODSCOPE_SOURCE_DIR; !source.empty())
        folders.push_back(normal(fs::path(source) / "resources" / "models"));
    for (const auto& folder : folders) {
        std::error_code ec;
        if (!fs::is_directory(folder, ec)) continue;
        std::vector<BundledModel> out;
        for (const auto& entry : fs::directory_iterator(folder, ec))
            if (entry.is_directory(ec) && holdsCheckpoint(entry.path().string()))
                out.push_back({entry.path().filename().string(), normal(entry.path())});
        if (out.empty()) continue;
        // The default first, then by name.
        std::sort(out.begin(), out.end(), [](const BundledModel& a, const BundledModel& b) {
            return (a.name == "default") != (b.name == "default") ? a.name == "default" : a.name < b.name;
        });
        return out;
    }
    return {};
}

}  // namespace modscope
