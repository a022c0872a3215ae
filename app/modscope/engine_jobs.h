// The plain values that cross between the GUI thread and the engine worker: requests in, results out.
// Every job carries an id; a job's cancel flag is shared with the engine, which checks it between layers
// and between generated tokens.
#pragma once

#include <QMetaType>
#include <QString>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "generation_controls.h"
#include "modscope/engine.h"
#include "routing_snapshot.h"

namespace modscope {

struct TraceDocument;

using CancelFlag = std::shared_ptr<std::atomic<bool>>;
inline CancelFlag makeCancelFlag() { return std::make_shared<std::atomic<bool>>(false); }

// What the GUI knows about the loaded model (it never touches the Model itself).
struct ModelInfo {
    std::string directory;
    std::string name;
    std::string device;
    std::string backend;  // "cpu-kernels" or "ops"
    std::int64_t parameters = 0;
    ModelConfig config;
    std::string weights_sha256;
};

// What a run asks beyond routing (docs/MODEL.md "Interventions"): decisions forced by hand, and the value of
// every routing decision.
struct RunInterventions {
    std::vector<RoutingOverride> overrides;
    bool keep_capacity = false;
    bool decision_values = false;
};

struct RunRequest {
    std::uint64_t job = 0;
    std::string text;
    RoutingMode mode = RoutingMode::TopK;
    double capacity = -1.0;
    std::vector<double> layer_capacity;  // RunOptions::layer_capacity
    RunInterventions interventions;
    // Tokens starting at or after this byte of text were generated (marked as such); npos: none.
    std::size_t generated_from_byte = std::string::npos;
    CancelFlag cancel;
};

struct GenerateRequest {
    std::uint64_t job = 0;
    std::string prompt;
    GenerationSettings settings;
    double capacity = -1.0;  // the top-k reference the predictor's accuracy is measured against
    CancelFlag cancel;
};

struct GenerationSummary {
    std::uint64_t job = 0;
    int generated = 0;
    double tokens_per_second = 0.0;
    bool cancelled = false;
    bool hit_context = false;  // stopped because the model's context was full
    bool hit_eos = false;
    std::size_t prompt_bytes = 0;  // where the generated text starts in the final text
    std::string text;              // prompt + generated, as it now stands in the editor
    std::shared_ptr<const TraceDocument> document;  // the prompt's causal run plus the generation
};

}  // namespace modscope

Q_DECLARE_METATYPE(modscope::ModelInfo)
Q_DECLARE_METATYPE(modscope::SnapshotPtr)
Q_DECLARE_METATYPE(modscope::GenerationPoint)
Q_DECLARE_METATYPE(modscope::GenerationSummary)
