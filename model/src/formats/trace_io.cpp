// Routing traces as files: their aggregates, and saving and loading by extension (.json, .jsonl, .csv).
// The formats themselves: trace_json_writer.cpp, trace_json_reader.cpp, trace_csv.cpp.
#include "modscope/trace_io.h"

#include <algorithm>

#include "formats/file_io.h"
#include "formats/trace_text.h"

namespace modscope {

TraceStats& TraceStats::operator+=(const TraceStats& o) {
    tokens += o.tokens;
    processed += o.processed;
    pairs += o.pairs;
    routed_processed += o.routed_processed;
    routed_pairs += o.routed_pairs;
    flops += o.flops;
    dense_flops += o.dense_flops;
    predictor += o.predictor;
    if (layers.empty()) {
        layers = o.layers;
    } else {
        for (std::size_t i = 0; i < std::min(layers.size(), o.layers.size()); ++i) {
            layers[i].k += o.layers[i].k;
            layers[i].processed += o.layers[i].processed;
            layers[i].tokens += o.layers[i].tokens;
            layers[i].predictor += o.layers[i].predictor;
        }
    }
    return *this;
}

TraceStats traceStats(const TraceDocument& doc) {
    TraceStats s;
    const int T = static_cast<int>(doc.tokens.size());
    s.tokens = T;
    s.flops = doc.run.flops;
    s.dense_flops = doc.run.dense_flops;
    for (const auto& l : doc.run.layers) {
        TraceLayerStats ls;
        ls.index = l.index;
        ls.routed = l.routed;
        ls.k = l.k;
        ls.processed = l.processed;
        ls.tokens = T;
        ls.predictor = Agreement::of(l);
        s.processed += l.processed;
        s.pairs += T;
        if (l.routed) {
            s.routed_processed += l.processed;
            s.routed_pairs += T;
            s.predictor += ls.predictor;
        }
        s.layers.push_back(ls);
    }
    return s;
}

void saveTrace(const std::string& path, const TraceDocument& doc) {
    const auto ext = lowerExtension(path);
    if (ext == ".json")
        writeFileAtomic(path, traceToJson(doc));
    else if (ext == ".jsonl")
        writeFileAtomic(path, traceToJsonLine(doc) + "\n");
    else if (ext == ".csv")
        writeFileAtomic(path, traceToCsv(doc));
    else
        throw Error(path + ": unknown trace format '" + (ext.empty() ? std::string("(no extension)") : ext) +
                    "' (use .json, .jsonl or .csv)");
}

void saveTraces(const std::string& path, const std::vector<TraceDocument>& docs) {
    const auto ext = lowerExtension(path);
    if (ext == ".json") {
        std::string out = "[\n";
        for (std::size_t i = 0; i < docs.size(); ++i) {
            std::string one = traceToJson(docs[i]);
            one.pop_back();  // the newline
            out += one;
            out += i + 1 < docs.size() ? ",\n" : "\n";
        }
        writeFileAtomic(path, out + "]\n");
    } else if (ext == ".jsonl") {
        std::string out;
        for (const auto& d : docs) out += traceToJsonLine(d) + "\n";
        writeFileAtomic(path, out);
    } else if (ext == ".csv") {
        writeFileAtomic(path, tracesToCsv(docs));
    } else {
        throw Error(path + ": unknown trace format '" + (ext.empty() ? std::string("(no extension)") : ext) +
                    "' (use .json, .jsonl or .csv)");
    }
}

TraceDocument loadTrace(const std::string& path) {
    const auto ext = lowerExtension(path);
    if (ext != ".json")
        throw Error(
            path + ": traces are opened from their .json file" +
            (ext == ".csv" ? std::string(" (the CSV form is for analysis and cannot be replayed)") : ""));
    const auto text = readFileBounded(path, kMaxTraceFileBytes);
    try {
        return traceFromJson(text);
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    }
}

std::vector<TraceDocument> loadTraces(const std::string& path) {
    const auto ext = lowerExtension(path);
    if (ext != ".json" && ext != ".jsonl")
        throw Error(
            path + ": traces are opened from .json or .jsonl files" +
            (ext == ".csv" ? std::string(" (the CSV form is for analysis and cannot be replayed)") : ""));
    const auto text = readFileBounded(path, kMaxTraceFileBytes);
    try {
        return ext == ".json" ? tracesFromJson(text) : tracesFromJsonLines(text);
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    }
}

}  // namespace modscope


