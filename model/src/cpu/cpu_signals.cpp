#include "cpu/cpu_signals.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <mutex>
#include <thread>

namespace modscope::cpu {

namespace {

// 0: this thread has not blocked the signals; otherwise the size of its OpenMP team (itself included) whose
// threads have them blocked.
thread_local int t_shielded_team = 0;

void blockHere() { pthread_sigmask(SIG_BLOCK, &asynchronousSignals(), nullptr); }

}  // namespace

const sigset_t& asynchronousSignals() {
    static const sigset_t set = [] {
        sigset_t s;
        sigfillset(&s);
        for (const int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT, SIGPIPE}) sigdelset(&s, sig);
        return s;
    }();
    return set;
}

void startSignalThread() {
    static std::once_flag once;
    std::call_once(once, [] {
        std::thread([] {
            // Created by a thread that may have blocked them already (a parent process's mask is inherited too).
            pthread_sigmask(SIG_UNBLOCK, &asynchronousSignals(), nullptr);
            pthread_setname_np(pthread_self(), "modscope-signal");
            for (;;) pause();
        }).detach();
    });
}

void keepSignalsOffThisThread() {
    // Products inside a parallel region (cpu::addBlockInPlace's) find their team shielded: the region's
    // master calls this before opening it, and a region must not be started from inside one.
    if (at::in_parallel_region()) return;
    const int team = at::get_num_threads();
    if (t_shielded_team >= team) return;
    startSignalThread();
    blockHere();
    // OpenMP threads this thread started before it blocked the signals did not inherit the block: a region
    // over the whole team blocks them. It is written with OpenMP itself (this file is built with -fopenmp)
    // because at::parallel_for runs serially in a file built without, as most of the engine's files are. The
    // build without OpenMP (clang without libomp) blocks the calling thread only.
#ifdef _OPENMP
    if (team > 1) {
#pragma omp parallel num_threads(team)
        blockHere();
    }
#endif
    t_shielded_team = team;
}

}  // namespace modscope::cpu
