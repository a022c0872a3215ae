// The runtime options in force (configureRuntime, modscope/engine.h), for the engine's own files.
#pragma once

#include "modscope/engine.h"

namespace modscope::runtime {

// The options configureRuntime applied; the defaults (nothing changed) until it is called.
const RuntimeOptions& state();

// Before CPU work on the calling thread: adapts LibTorch's thread count to the machine's load where the
// options ask for it (adaptive_threads.h); nothing otherwise.
void beforeCpuWork();

}  // namespace modscope::runtime
