// Routing traces to files in the trace format (docs/TRACE_FORMAT.md, modscope/trace_io.h): the one place
// the app turns what it shows into a trace document.
#pragma once

#include <QString>

#include "modscope/trace_io.h"
#include "routing_snapshot.h"

namespace modscope {

// The document of the run a snapshot shows (its tokens, routing, model and truncation).
TraceDocument traceDocumentFor(const RoutingSnapshot& snapshot);

// Writes doc as JSON (.json) or CSV (.csv), atomically. Returns an empty string or what went wrong.
QString exportTrace(const TraceDocument& doc, const QString& path);

}  // namespace modscope
