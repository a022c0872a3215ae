// EngineWorker: the one object that touches the Model. It lives on the engine thread and runs the jobs
// EngineSession queues, in order; results go back as signals carrying plain values.
#pragma once

#include <QObject>

#include <memory>

#include "engine_jobs.h"

namespace modscope {

class Model;

class EngineWorker : public QObject {
    Q_OBJECT
public:
    EngineWorker();
    ~EngineWorker() override;

    // Each runs on the worker's thread (queued by EngineSession).
    void loadModel(std::uint64_t job, const QString& directory, const QString& device);
    // A model with the same tokenizer whose per-token loss runs beside every run's (an empty directory drops it).
    void loadReference(std::uint64_t job, const QString& directory);
    void run(const RunRequest& request);
    void generate(const GenerateRequest& request);

Q_SIGNALS:
    void modelLoaded(quint64 job, const modscope::ModelInfo& info);
    void modelLoadFailed(quint64 job, const QString& message);
    void runFinished(const modscope::SnapshotPtr& snapshot);
    void runFailed(quint64 job, const QString& message);
    void runProgress(quint64 job, int done, int total);  // decision values: cells done of all
    void referenceLoaded(quint64 job, const QString& name, const QString& directory);
    void referenceFailed(quint64 job, const QString& message);
    void generationStep(quint64 job, const modscope::GenerationPoint& point, const modscope::SnapshotPtr& snapshot);
    void generationFinished(const modscope::GenerationSummary& summary);
    void generationFailed(quint64 job, const QString& message);

private:
    // Top predictions a run reports per position (the loss strip's hover, the details panel).
    static constexpr int kTopPredictions = 5;

    // The snapshot shown, with the run's losses, top predictions and (when asked) decision values, the same run's
    // without its overrides, and the reference model's losses.
    SnapshotPtr withLosses(const RoutingSnapshot& shown, const std::vector<int>& ids, const RunOptions& run_options,
                           const RunRequest& request);

    // A loaded model stays until another loads successfully: a failed load leaves it in use.
    std::shared_ptr<Model> model_;
    std::shared_ptr<Model> reference_;  // dropped when a model with another tokenizer loads
};

}  // namespace modscope
