// libFuzzer target: .jsonl routing traces (tracesFromJsonLines), one document per line.
// The contract: documents or a modscope::Error; accepted documents write out and read back the same.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "modscope/trace_io.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        for (const auto& doc : modscope::tracesFromJsonLines(text)) {
            const std::string line = modscope::traceToJsonLine(doc);
            const auto again = modscope::tracesFromJsonLines(line);
            if (again.size() != 1 || modscope::traceToJsonLine(again.front()) != line) std::abort();
        }
    } catch (const modscope::Error&) {
    }
    return 0;
}
