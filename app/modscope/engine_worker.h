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
    void run(const RunRequest& request);
    void generate(const GenerateRequest& request);

Q_SIGNALS:
    void modelLoaded(quint64 job, const modscope::ModelInfo& info);
    void modelLoadFailed(quint64 job, const QString& message);
    void runFinished(const modscope::SnapshotPtr& snapshot);
    void runFailed(quint64 job, const QString& message);
    void generationStep(quint64 job, const modscope::GenerationPoint& point, const modscope::SnapshotPtr& snapshot);
    void generationFinished(const modscope::GenerationSummary& summary);
    void generationFailed(quint64 job, const QString& message);

private:
    // A loaded model stays until another loads successfully: a failed load leaves it in use.
    std::shared_ptr<Model> model_;
};

}  // namespace modscope
