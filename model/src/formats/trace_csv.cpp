// Routing traces as long-form CSV (docs/TRACE_FORMAT.md): one row per layer and token, written for
// analysis (pandas, R, spreadsheets) and read back by strict RFC 4180 rules.
#include <charconv>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>

#include "formats/trace_text.h"
#include "formats/utf8.h"
#include "modscope/trace_io.h"

namespace modscope {

namespace {

bool needsQuotes(const std::string& s) {
    if (s.empty()) return true;
    if (s.front() == ' ' || s.front() == '\t' || s.back() == ' ' || s.back() == '\t') return true;
    return s.find_first_of(",\"\r\n") != std::string::npos;
}

void csvField(std::string& out, const std::string& s) {
    if (!needsQuotes(s)) {
        out += s;
        return;
    }
    out += '"';
    for (const char c : s) {
        if (c == '"') out += '"';
        out += c;
    }
    out += '"';
}

void appendCsvRows(std::string& out, const TraceDocument& doc, int prompt_index) {
    const auto& run = doc.run;
    const std::size_t T = doc.tokens.size();
    std::string prefix;
    if (prompt_index >= 0) {
        if (!isValidUtf8(doc.prompt_id)) throw Error("cannot write the trace: prompt_id is not valid UTF-8");
        prefix = std::to_string(prompt_index) + ",";
        csvField(prefix, doc.prompt_id);
        prefix += ',';
    }
    if (!run.token_loss.empty() && run.token_loss.size() != T)
        throw Error("cannot write the trace: " + std::to_string(run.token_loss.size()) + " token losses for " +
                    std::to_string(T) + " tokens");
    for (const auto& o : run.overrides)
        if (o.layer < 0 || o.layer >= static_cast<int>(run.layers.size()) ||
            (o.position != RoutingOverride::kAllPositions && (o.position < 0 || o.position >= static_cast<int>(T))))
            throw Error("cannot write the trace: an override of layer " + std::to_string(o.layer) + " at position " +
                        std::to_string(o.position) + " outside the run");
    for (std::size_t li = 0; li < run.layers.size(); ++li) {
        const auto& l = run.layers[li];
        const std::string layer = std::to_string(l.index) + ",";
        if (!l.decision_value.empty() && l.decision_value.size() != T)
            throw Error("cannot write the trace: layer " + std::to_string(li) + " has " +
                        std::to_string(l.decision_value.size()) + " decision values for " + std::to_string(T) + " tokens");
        if (!l.update_ratio.empty() && l.update_ratio.size() != T)
            throw Error("cannot write the trace: layer " + std::to_string(li) + " has " +
                        std::to_string(l.update_ratio.size()) + " update ratios for " + std::to_string(T) + " tokens");
        for (std::size_t t = 0; t < T; ++t) {
            out += prefix;
            out += layer;
            out += std::to_string(t) + "," + std::to_string(doc.tokens[t].id) + ",";
            if (!isValidUtf8(doc.tokens[t].piece))
                throw Error("cannot write the trace: tokens[" + std::to_string(t) +
                            "].piece is not valid UTF-8");
            csvField(out, doc.tokens[t].piece);
            out += l.routed ? ",1," : ",0,";
            if (l.routed) {
                if (!std::isfinite(l.router_logits.at(t)) || !std::isfinite(l.predictor_prob.at(t)))
                    throw Error("cannot write the trace: layer " + std::to_string(li) + " token " +
                                std::to_string(t) + " has a non-finite value");
                out += formatFloat(l.router_logits[t]) + "," + std::to_string(l.rank.at(t)) + ",";
                out += l.selected.at(t) ? "1," : "0,";
                out += formatFloat(l.predictor_prob[t]) + ",";
                out += l.predictor_selected.at(t) ? "1," : "0,";
                out += l.topk_selected.at(t) ? "1," : "0,";
            } else {
                out += ",,";
                out += l.selected.at(t) ? "1," : "0,";
                out += ",,";
                out += l.selected.at(t) ? "1," : "0,";
            }
            out += "prompt,";
            if (l.routed) out += formatFloat(l.gate(static_cast<int>(t)));
            out += ',';
            if (!l.update_ratio.empty()) {
                if (!std::isfinite(l.update_ratio.at(t)))
                    throw Error("cannot write the trace: layer " + std::to_string(li) + " token " +
                                std::to_string(t) + " has a non-finite update ratio");
                out += formatFloat(l.update_ratio[t]);
            }
            out += ',';
            if (l.moe && l.expert.size() == T) {
                out += std::to_string(l.expert.at(t)) + "," + std::to_string(l.expert_choice.at(t)) + ",";
                if (l.expert_choice.at(t) >= 0) {
                    if (!std::isfinite(l.expert_prob.at(t)))
                        throw Error("cannot write the trace: layer " + std::to_string(li) + " token " +
                                    std::to_string(t) + " has a non-finite expert probability");
                    out += formatFloat(l.expert_prob[t]);
                }
            } else {
                out += ",,";
            }
            out += ',';
            if (!run.token_loss.empty() && std::isfinite(run.token_loss[t])) out += formatFloat(run.token_loss[t]);
            out += ',';
            if (const int f = forcedDecision(run, l.index, static_cast<int>(t)); f >= 0) out += f ? "process" : "skip";
            out += ',';
            if (!l.decision_value.empty()) {
                if (!std::isfinite(l.decision_value[t]))
                    throw Error("cannot write the trace: layer " + std::to_string(li) + " token " +
                                std::to_string(t) + " has a non-finite decision value");
                out += formatFloat(l.decision_value[t]);
            }
            out += "\r\n";
        }
        if (!doc.generation) continue;
        const auto& g = *doc.generation;
        for (std::size_t i = 0; i < g.result.steps.size(); ++i) {
            const auto& s = g.result.steps[i];
            out += prefix;
            out += layer;
            out += std::to_string(s.position) + "," + std::to_string(s.token_id) + ",";
            csvField(out, g.pieces.at(i));
            out += l.routed ? ",1,,," : ",0,,,";
            out += s.processed.at(li) ? "1," : "0,";
            if (l.routed) {
                const float p = s.predictor_prob.at(li);
                if (!std::isfinite(p))
                    throw Error("cannot write the trace: generation step " + std::to_string(i) + " layer " +
                                std::to_string(li) + " has a non-finite predictor probability");
                out += formatFloat(p) + ",";
                // A generation step runs in causal mode: what the rule decided is what the layer processed.
                out += s.processed.at(li) ? "1," : "0,";
            } else {
                out += ",,";
            }
            out += ",generate,,,";
            if (l.moe && li < s.expert.size()) out += std::to_string(s.expert[li]);
            out += ",,,,,\r\n";
        }
    }
}

std::string csvHeader(bool with_index) {
    std::string h = with_index ? "prompt_index,prompt_id," : "";
    bool first = true;
    for (const char* c : kTraceCsvColumns) {
        if (!first) h += ',';
        h += c;
        first = false;
    }
    return h + "\r\n";
}

template <typename T>
T csvInt(const std::string& s, std::size_t line, const char* column, T lo, T hi) {
    T v{};
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size() || v < lo || v > hi)
        throw Error("CSV row " + std::to_string(line) + ", " + column + ": \"" + printable(s) +
                    "\" is not an integer from " + std::to_string(lo) + " to " + std::to_string(hi));
    return v;
}

bool csvBool(const std::string& s, std::size_t line, const char* column) {
    if (s == "1") return true;
    if (s == "0") return false;
    throw Error("CSV row " + std::to_string(line) + ", " + column + ": \"" + printable(s) +
                "\" is not 0 or 1");
}

float csvFloat(const std::string& s, std::size_t line, const char* column) {
    try {
        return parseFloat32(s, std::string(column));
    } catch (const Error& e) {
        throw Error("CSV row " + std::to_string(line) + ", " + e.what());
    }
}

}  // namespace

std::string traceToCsv(const TraceDocument& doc) {
    std::string out = csvHeader(false);
    appendCsvRows(out, doc, -1);
    return out;
}

std::string tracesToCsv(const std::vector<TraceDocument>& docs) {
    std::string out = csvHeader(true);
    for (std::size_t i = 0; i < docs.size(); ++i)
        appendCsvRows(out, docs[i], docs[i].prompt_index >= 0 ? docs[i].prompt_index : static_cast<int>(i));
    return out;
}

namespace {

// Calls record(fields, record_number) for each record of strict RFC 4180 text (the header is record 1),
// one record in memory at a time.
template <typename F>
void forEachCsvRecord(const std::string& text, F&& record) {
    if (text.size() > kMaxTraceFileBytes)
        throw Error("CSV: " + std::to_string(text.size()) + " bytes, more than the " +
                    std::to_string(kMaxTraceFileBytes) + " a trace may have");
    std::size_t bad_at = 0;
    if (!isValidUtf8(text, &bad_at)) throw Error("CSV: not UTF-8 text (byte " + std::to_string(bad_at) + ")");
    std::size_t width = 0, count = 0;
    std::vector<std::string> fields;
    std::size_t i = text.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
    std::size_t line = 1;
    const std::size_t n = text.size();
    while (i < n) {
        const std::size_t record_line = line;
        fields.clear();
        for (;;) {  // one field per iteration
            std::string field;
            if (i < n && text[i] == '"') {
                ++i;
                for (;;) {
                    if (i >= n)
                        throw Error("CSV line " + std::to_string(record_line) +
                                    ": a quoted field is not closed");
                    const char c = text[i++];
                    if (c == '"') {
                        if (i < n && text[i] == '"') {
                            field += '"';
                            ++i;
                            continue;
                        }
                        break;
                    }
                    if (c == '\n') ++line;
                    field += c;
                }
                if (i < n && text[i] != ',' && text[i] != '\n' &&
                    !(text[i] == '\r' && i + 1 < n && text[i + 1] == '\n'))
                    throw Error("CSV line " + std::to_string(line) + ": text after a closing quote");
            } else {
                while (i < n && text[i] != ',' && text[i] != '\n' && text[i] != '\r') {
                    if (text[i] == '"')
                        throw Error("CSV line " + std::to_string(line) +
                                    ": a quote inside an unquoted field");
                    field += text[i++];
                }
                if (i < n && text[i] == '\r' && !(i + 1 < n && text[i + 1] == '\n'))
                    throw Error("CSV line " + std::to_string(line) + ": a carriage return outside quotes");
            }
            fields.push_back(std::move(field));
            if (i < n && text[i] == ',') {
                ++i;
                continue;
            }
            break;
        }
        // End of record: CRLF, LF or end of text.
        if (i < n && text[i] == '\r') ++i;
        if (i < n && text[i] == '\n') {
            ++i;
            ++line;
        }
        if (count == 0) width = fields.size();
        if (fields.size() != width)
            throw Error("CSV line " + std::to_string(record_line) + ": " + std::to_string(fields.size()) +
                        " fields, the header has " + std::to_string(width));
        record(fields, ++count);
    }
}

}  // namespace

std::vector<std::vector<std::string>> parseCsv(const std::string& text) {
    std::vector<std::vector<std::string>> rows;
    forEachCsvRecord(text, [&](std::vector<std::string>& fields, std::size_t) { rows.push_back(fields); });
    return rows;
}

std::vector<TraceCsvRow> traceRowsFromCsv(const std::string& text) {
    std::vector<TraceCsvRow> out;
    bool with_index = false, with_id = false, with_update = false, with_expert = false, with_interventions = false,
         header_seen = false;
    // Messages count records (the header is row 1): a quoted newline makes records span lines.
    forEachCsvRecord(text, [&](const std::vector<std::string>& f, std::size_t line) {
        if (line == 1) {
            header_seen = true;
            // This version's columns, the third version's (no intervention columns), the second version's (no
            // expert columns either) or the first version's (no gate and update_ratio either; a batch without
            // prompt_id).
            const std::vector<std::string> all(std::begin(kTraceCsvColumns), std::end(kTraceCsvColumns));
            const std::vector<std::string> v1(all.begin(), all.begin() + kTraceCsvColumnsV1);
            const std::vector<std::string> v2(all.begin(), all.begin() + kTraceCsvColumnsV2);
            const std::vector<std::string> v3(all.begin(), all.begin() + kTraceCsvColumnsV3);
            with_index = !f.empty() && f[0] == "prompt_index";
            with_id = with_index && f.size() > 1 && f[1] == "prompt_id";
            const std::size_t lead = with_index ? (with_id ? 2 : 1) : 0;
            const std::vector<std::string> rest(f.begin() + static_cast<std::ptrdiff_t>(std::min(lead, f.size())),
                                                f.end());
            with_interventions = rest == all;
            with_expert = with_interventions || rest == v3;
            with_update = with_expert || rest == v2;
            if (!(with_update && (with_id || !with_index)) && !(rest == v1 && !with_id)) {
                std::string want = with_index ? "prompt_index,prompt_id" : "";
                for (const auto& c : all) want += (want.empty() ? "" : ",") + c;
                throw Error("CSV: not a trace CSV: the header should be " + want);
            }
            return;
        }
        std::size_t c = 0;
        TraceCsvRow row;
        if (with_index)
            row.prompt_index = csvInt<int>(f[c++], line, "prompt_index", 0, kMaxTraceDocuments - 1);
        if (with_id) row.prompt_id = f[c++];
        row.layer = csvInt<int>(f[c++], line, "layer", 0, kMaxTraceLayers - 1);
        row.position = csvInt<int>(f[c++], line, "position", 0, 2 * kMaxTraceTokens);
        row.token_id = csvInt<int>(f[c++], line, "token_id", 0, std::numeric_limits<int>::max());
        row.piece = f[c++];
        row.routed = csvBool(f[c++], line, "routed");
        if (!f[c].empty()) row.router_logit = csvFloat(f[c], line, "router_logit");
        ++c;
        if (!f[c].empty()) row.rank = csvInt<int>(f[c], line, "rank", 0, 2 * kMaxTraceTokens);
        ++c;
        row.selected = csvBool(f[c++], line, "selected");
        if (!f[c].empty()) row.predictor_prob = csvFloat(f[c], line, "predictor_prob");
        ++c;
        if (!f[c].empty()) row.predictor_selected = csvBool(f[c], line, "predictor_selected");
        ++c;
        if (!f[c].empty()) row.topk_selected = csvBool(f[c], line, "topk_selected");
        ++c;
        row.phase = f[c++];
        if (row.phase != "prompt" && row.phase != "generate")
            throw Error("CSV row " + std::to_string(line) + ", phase: \"" + printable(row.phase) +
                        "\" is not prompt or generate");
        if (with_update) {
            if (!f[c].empty()) row.gate = csvFloat(f[c], line, "gate");
            if (row.gate && !(*row.gate >= 0.0f && *row.gate <= 1.0f))
                throw Error("CSV row " + std::to_string(line) + ", gate: \"" + printable(f[c]) + "\" is not from 0 to 1");
            ++c;
            if (!f[c].empty()) row.update_ratio = csvFloat(f[c], line, "update_ratio");
            if (row.update_ratio && !(*row.update_ratio >= 0.0f))
                throw Error("CSV row " + std::to_string(line) + ", update_ratio: \"" + printable(f[c]) +
                            "\" is negative");
            ++c;
        }
        if (with_expert) {
            if (!f[c].empty()) row.expert = csvInt<int>(f[c], line, "expert", -1, kMaxTraceExperts - 1);
            ++c;
            if (!f[c].empty()) row.expert_choice = csvInt<int>(f[c], line, "expert_choice", -1, 2 * kMaxTraceExperts - 1);
            ++c;
            if (!f[c].empty()) row.expert_prob = csvFloat(f[c], line, "expert_prob");
            if (row.expert_prob && !(*row.expert_prob >= 0.0f && *row.expert_prob <= 1.0f))
                throw Error("CSV row " + std::to_string(line) + ", expert_prob: \"" + printable(f[c]) +
                            "\" is not from 0 to 1");
            ++c;
        }
        if (with_interventions) {
            if (!f[c].empty()) row.token_loss = csvFloat(f[c], line, "token_loss");
            if (row.token_loss && !(*row.token_loss >= 0.0f))
                throw Error("CSV row " + std::to_string(line) + ", token_loss: \"" + printable(f[c]) + "\" is negative");
            ++c;
            row.forced = f[c];
            if (!row.forced.empty() && row.forced != "process" && row.forced != "skip")
                throw Error("CSV row " + std::to_string(line) + ", forced: \"" + printable(f[c]) +
                            "\" is not process, skip or empty");
            ++c;
            if (!f[c].empty()) row.decision_value = csvFloat(f[c], line, "decision_value");
            ++c;
        }
        out.push_back(std::move(row));
    });
    if (!header_seen) throw Error("CSV: empty (no header)");
    return out;
}


}  // namespace modscope
