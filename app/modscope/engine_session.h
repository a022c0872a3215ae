// EngineSession: the GUI's handle on the engine. It owns the engine thread and its EngineWorker, gives
// every job an id and a cancel flag, cancels runs a newer request has made out of date, and passes on only
// the results the GUI still wants. All its functions are called on the GUI thread and return at once.
#pragma once

#include <QObject>
#include <QThread>

#include "engine_jobs.h"

namespace modscope {

class EngineWorker;

class EngineSession : public QObject {
    Q_OBJECT
public:
    explicit EngineSession(QObject* parent = nullptr);
    ~EngineSession() override;  // shutdown()

    std::uint64_t loadModel(const QString& directory, const QString& device);
    // Cancels any run still queued or running, then queues this one.
    std::uint64_t requestRun(const QString& text, RoutingMode mode, double capacity,
                             std::size_t generated_from_byte = std::string::npos,
                             std::vector<double> layer_capacity = {}, RunInterventions interventions = {});
    // The model whose per-token loss each run shows beside the open model's (same tokenizer); empty: none.
    std::uint64_t loadReference(const QString& directory);
    std::uint64_t startGeneration(const QString& prompt, const GenerationSettings& settings, double capacity);
    void stopGeneration();

    bool isGenerating() const { return generation_job_ != 0; }
    bool isLoading() const { return load_job_ != 0; }
    bool isRunPending() const { return pending_run_ != 0; }
    std::uint64_t latestRunJob() const { return latest_run_; }

    // Cancels everything, stops the engine thread and waits for it: the engine checks its cancel flags
    // between layers and tokens, so this returns within one layer's (or one load's) time.
    void shutdown();

Q_SIGNALS:
    void modelLoaded(const modscope::ModelInfo& info);
    void modelLoadFailed(const QString& message);
    void runFinished(const modscope::SnapshotPtr& snapshot);  // only the newest run's
    void runFailed(const QString& message);
    void runProgress(int done, int total);  // the newest run's decision values
    void referenceLoaded(const QString& name, const QString& directory);  // empty name: none
    void referenceFailed(const QString& message);
    void generationStep(const modscope::GenerationPoint& point, const modscope::SnapshotPtr& snapshot);
    void generationFinished(const modscope::GenerationSummary& summary);
    void generationFailed(const QString& message);

private:
    std::uint64_t nextJob() { return ++last_job_; }

    QThread thread_;
    EngineWorker* worker_;
    std::uint64_t last_job_ = 0;
    std::uint64_t latest_run_ = 0;
    std::uint64_t pending_run_ = 0;
    std::uint64_t load_job_ = 0;
    std::uint64_t generation_job_ = 0;
    CancelFlag run_cancel_;
    CancelFlag generation_cancel_;
    bool shut_down_ = false;
};

}  // namespace modscope
