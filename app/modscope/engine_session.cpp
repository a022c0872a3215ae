#include "engine_session.h"

#include "engine_worker.h"

namespace modscope {

EngineSession::EngineSession(QObject* parent) : QObject(parent), worker_(new EngineWorker) {
    qRegisterMetaType<ModelInfo>();
    qRegisterMetaType<SnapshotPtr>();
    qRegisterMetaType<GenerationPoint>();
    qRegisterMetaType<GenerationSummary>();
    thread_.setObjectName(QStringLiteral("modscope-engine"));
    worker_->moveToThread(&thread_);
    connect(&thread_, &QThread::finished, worker_, &QObject::deleteLater);

    connect(worker_, &EngineWorker::modelLoaded, this, [this](quint64 job, const ModelInfo& info) {
        if (job == load_job_) load_job_ = 0;
        Q_EMIT modelLoaded(info);
    });
    connect(worker_, &EngineWorker::modelLoadFailed, this, [this](quint64 job, const QString& message) {
        if (job == load_job_) load_job_ = 0;
        Q_EMIT modelLoadFailed(message);
    });
    connect(worker_, &EngineWorker::runFinished, this, [this](const SnapshotPtr& snapshot) {
        if (!snapshot || snapshot->job != latest_run_) return;  // out of date on arrival
        pending_run_ = 0;
        Q_EMIT runFinished(snapshot);
    });
    connect(worker_, &EngineWorker::runFailed, this, [this](quint64 job, const QString& message) {
        if (job != latest_run_) return;
        pending_run_ = 0;
        Q_EMIT runFailed(message);
    });
    connect(worker_, &EngineWorker::runProgress, this, [this](quint64 job, int done, int total) {
        if (job == latest_run_) Q_EMIT runProgress(done, total);
    });
    connect(worker_, &EngineWorker::referenceLoaded, this,
            [this](quint64, const QString& name, const QString& directory) { Q_EMIT referenceLoaded(name, directory); });
    connect(worker_, &EngineWorker::referenceFailed, this,
            [this](quint64, const QString& message) { Q_EMIT referenceFailed(message); });
    connect(worker_, &EngineWorker::generationStep, this,
            [this](quint64 job, const GenerationPoint& point, const SnapshotPtr& snapshot) {
                if (job == generation_job_) Q_EMIT generationStep(point, snapshot);
            });
    connect(worker_, &EngineWorker::generationFinished, this, [this](const GenerationSummary& summary) {
        if (summary.job != generation_job_) return;
        generation_job_ = 0;
        generation_cancel_.reset();
        Q_EMIT generationFinished(summary);
    });
    connect(worker_, &EngineWorker::generationFailed, this, [this](quint64 job, const QString& message) {
        if (job != generation_job_) return;
        generation_job_ = 0;
        generation_cancel_.reset();
        Q_EMIT generationFailed(message);
    });
    thread_.start();
}

EngineSession::~EngineSession() { shutdown(); }

std::uint64_t EngineSession::loadModel(const QString& directory, const QString& device) {
    if (shut_down_) return 0;
    // Runs for the old model are pointless now.
    if (run_cancel_) run_cancel_->store(true);
    stopGeneration();
    const auto job = nextJob();
    load_job_ = job;
    QMetaObject::invokeMethod(worker_, [w = worker_, job, directory, device] { w->loadModel(job, directory, device); },
                              Qt::QueuedConnection);
    return job;
}

std::uint64_t EngineSession::requestRun(const QString& text, RoutingMode mode, double capacity,
                                        std::size_t generated_from_byte, std::vector<double> layer_capacity,
                                        RunInterventions interventions) {
    if (shut_down_) return 0;
    if (run_cancel_) run_cancel_->store(true);
    RunRequest request;
    request.job = nextJob();
    request.text = text.toStdString();
    request.mode = mode;
    request.capacity = capacity;
    request.layer_capacity = std::move(layer_capacity);
    request.generated_from_byte = generated_from_byte;
    request.interventions = std::move(interventions);
    request.cancel = run_cancel_ = makeCancelFlag();
    latest_run_ = pending_run_ = request.job;
    QMetaObject::invokeMethod(worker_, [w = worker_, request] { w->run(request); }, Qt::QueuedConnection);
    return request.job;
}

std::uint64_t EngineSession::loadReference(const QString& directory) {
    if (shut_down_) return 0;
    const auto job = nextJob();
    QMetaObject::invokeMethod(worker_, [w = worker_, job, directory] { w->loadReference(job, directory); },
                              Qt::QueuedConnection);
    return job;
}

std::uint64_t EngineSession::startGeneration(const QString& prompt, const GenerationSettings& settings,
                                             double capacity) {
    if (shut_down_ || generation_job_) return 0;
    if (run_cancel_) run_cancel_->store(true);
    GenerateRequest request;
    request.job = nextJob();
    request.prompt = prompt.toStdString();
    request.settings = settings;
    request.capacity = capacity;
    request.cancel = generation_cancel_ = makeCancelFlag();
    generation_job_ = request.job;
    // A run superseded by the generation must not report later.
    latest_run_ = 0;
    pending_run_ = 0;
    QMetaObject::invokeMethod(worker_, [w = worker_, request] { w->generate(request); }, Qt::QueuedConnection);
    return request.job;
}

void EngineSession::stopGeneration() {
    if (generation_cancel_) generation_cancel_->store(true);
}

void EngineSession::shutdown() {
    if (shut_down_) return;
    shut_down_ = true;
    if (run_cancel_) run_cancel_->store(true);
    if (generation_cancel_) generation_cancel_->store(true);
    // Jobs still queued check their (raised) flags and return at once.
    thread_.quit();
    thread_.wait();
}

}  // namespace modscope
