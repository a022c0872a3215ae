// libFuzzer target: .csv routing traces (parseCsv, strict RFC 4180, and traceRowsFromCsv, typed rows).
// The contract: records or rows, or a modscope::Error; typed rows only come from text parseCsv accepts.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "modscope/trace_io.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    bool parsed = false;
    try {
        const auto records = modscope::parseCsv(text);
        parsed = true;
        for (const auto& r : records)
            if (r.size() != records.front().size()) std::abort();  // every record as wide as the first
    } catch (const modscope::Error&) {
    }
    try {
        modscope::traceRowsFromCsv(text);
        if (!parsed) std::abort();
    } catch (const modscope::Error&) {
    }
    return 0;
}
