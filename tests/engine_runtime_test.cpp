// A program that links the engine and opens and runs a model changes no process-wide state until it calls
// configureRuntime: no signal blocked, no thread started, LibTorch's and OpenBLAS's thread counts as they were,
// and the ops backend. Then configureRuntime applies what it is asked for, once.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>

#include <QDir>
#include <QFile>
#include <QTest>

#include "modscope/engine.h"

using namespace modscope;

namespace {

QStringList threadNames() {
    QStringList names;
    for (const auto& task : QDir("/proc/self/task").entryList(QDir::Dirs | QDir::NoDotAndDotDot)) {
        QFile comm("/proc/self/task/" + task + "/comm");
        if (comm.open(QIODevice::ReadOnly)) names << QString::fromUtf8(comm.readAll()).trimmed();
    }
    return names;
}

bool signalBlocked(int sig) {
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, nullptr, &now);
    return sigismember(&now, sig) == 1;
}

int openBlasThreads() {
    auto* get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    return get != nullptr ? get() : -1;
}

ModelConfig smallConfig() {
    ModelConfig c;
    c.vocab_size = 64;
    c.d_model = 32;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 64;
    c.max_seq_len = 64;
    c.routed_layers = {1};
    c.predictor_hidden = 8;
    return c;
}

}  // namespace

class EngineRuntimeTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void openingAndRunningChangesNothingGlobal() {
        at::set_num_threads(1);  // a library user's own choice, which the engine must keep
        const int blas_before = openBlasThreads();
        QVERIFY(!signalBlocked(SIGINT));
        QVERIFY(!signalBlocked(SIGCHLD));

        auto model = Model::create(smallConfig(), 3, "cpu");
        QCOMPARE(QString::fromStdString(model->backend()), QString("ops"));
        QVERIFY(!cpuKernelsEnabled());
        std::vector<int> ids(40);
        for (int i = 0; i < 40; ++i) ids[i] = (i * 7) % 64;
        const auto trace = model->run(ids);
        QCOMPARE(QString::fromStdString(trace.backend), QString("ops"));
        GenerationOptions g;
        g.max_new_tokens = 5;
        QCOMPARE(int(model->generate(ids, g).generated_ids.size()), 5);

        QCOMPARE(at::get_num_threads(), 1);
        QCOMPARE(openBlasThreads(), blas_before);
        QVERIFY(!signalBlocked(SIGINT));
        QVERIFY(!signalBlocked(SIGCHLD));
        QVERIFY(!threadNames().contains("modscope-signal"));
        QVERIFY(!runtimeOptions().cpu_kernels);
    }

    // Run after the test above (Qt Test keeps the declaration order).
    void configureRuntimeAppliesWhatItIsAsked() {
        RuntimeOptions o;
        o.threads = 2;
        o.cpu_kernels = true;
        QVERIFY(configureRuntime(o));
        QCOMPARE(at::get_num_threads(), 2);
        QCOMPARE(runtimeOptions().threads, 2);
        QVERIFY(!configureRuntime(RuntimeOptions{}));  // once per process
        QCOMPARE(runtimeOptions().threads, 2);
        auto model = Model::create(smallConfig(), 3, "cpu");
        if (!cpuKernelsCompiledIn()) {
            QCOMPARE(QString::fromStdString(model->backend()), QString("ops"));
            return;
        }
        if (!cpuKernelsEnabled()) {  // MODSCOPE_CPU_KERNELS=0 in the environment
            QCOMPARE(QString::fromStdString(model->backend()), QString("ops"));
            return;
        }
        QCOMPARE(QString::fromStdString(model->backend()), QString("cpu-kernels"));
        QTRY_VERIFY(threadNames().contains("modscope-signal"));  // the thread names itself once it runs
        std::vector<int> ids(40, 5);
        (void)model->run(ids);
        // The kernels' products ran on this thread: it keeps asynchronous signals off, as the options said.
        QVERIFY(signalBlocked(SIGINT));
    }
};

QTEST_GUILESS_MAIN(EngineRuntimeTest)
#include "engine_runtime_test.moc"
