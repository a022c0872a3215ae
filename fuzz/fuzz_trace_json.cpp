// libFuzzer target: .json routing traces (traceFromJson, tracesFromJson), untrusted files the app replays.
// The contract: a document or a modscope::Error; a document that is accepted can be written again and the
// text written reads back to the same text.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "modscope/trace_io.h"

namespace {

void checkRoundTrip(const modscope::TraceDocument& doc) {
    const std::string json = modscope::traceToJson(doc);
    if (modscope::traceToJson(modscope::traceFromJson(json)) != json) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        checkRoundTrip(modscope::traceFromJson(text));
    } catch (const modscope::Error&) {
    }
    try {
        for (const auto& doc : modscope::tracesFromJson(text)) checkRoundTrip(doc);
    } catch (const modscope::Error&) {
    }
    return 0;
}
