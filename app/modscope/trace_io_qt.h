// modscope/trace_io.h for code that also sees Qt headers: TraceStats has a member named `slots`, which
// Qt's keyword macro of that name (empty) would erase. The macro is set aside for the include only.
#pragma once

#pragma push_macro("slots")
#undef slots
#include "modscope/trace_io.h"
#pragma pop_macro("slots")
