// Where ModScope finds its bundled files, for the app and every tool alike. Plain C++, no torch, no Qt.
#pragma once

#include <string>
#include <vector>

namespace modscope {

// The folder holding the running executable (from /proc/self/exe); empty when it cannot be told.
std::string executableDirectory();

// The places searched for the bundled default model, in order: $MODSCOPE_MODEL when set, then
// <exe dir>/../resources/models/default, <exe dir>/../../resources/models/default (build/bin),
// <exe dir>/../share/modscope/models/default (installed), then <source dir>/resources/models/default.
std::vector<std::string> defaultModelCandidates();

// The first candidate that holds a checkpoint (config.json). Throws Error listing the places searched and
// how to build the model (README.md, "Model zoo"). When MODSCOPE_MODEL is set it is the only place
// looked at: a wrong value is reported rather than silently replaced by another model.
std::string defaultModelDirectory();

// The models bundled beside the default one (README "Model zoo"): each folder of the first models folder
// the default model is searched in that holds any checkpoint, "default" first, then by name. Empty when
// there is none.
struct BundledModel {
    std::string name;       // the folder's name: "default", "dense", "moe", ...
    std::string directory;
};
std::vector<BundledModel> bundledModels();

}  // namespace modscope
