// Keeps asynchronous signal handlers off the threads that run oneDNN's sgemm (internal to model/).
//
// Why: oneDNN's JIT f32 GEMM kernels for AVX2 and AVX-512 point the stack pointer at a heap workspace while
// they run (a defect of oneDNN before 3.11; Debian 12 ships 2.6.3). A signal handler that runs on such a
// thread has its frame written into that heap block, over the allocator's bookkeeping. modscope-train, stopped
// with SIGINT, aborted with "malloc(): smallbin double linked list corrupted" in about one run in 30 while
// other processes loaded the machine; a loop of sgemm calls sent SIGUSR1 every 0.5 ms aborted within 150
// signals, every time. So a thread blocks asynchronous signals, for good, before its first product, and so do
// the OpenMP threads working for it; one thread started for the purpose keeps them unblocked and runs the
// handlers (or takes the default action, such as ending the process) instead.
#pragma once

#include <signal.h>

namespace modscope::cpu {

// Every signal but the synchronous ones a thread raises on itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
// SIGSYS, SIGABRT) and SIGPIPE, which a failed write raises in the writing thread.
const sigset_t& asynchronousSignals();

// Starts the thread that takes the signals; once per process (later calls return at once).
void startSignalThread();

// Called before every sgemm: blocks the signals in the calling thread and in the OpenMP threads of its team
// that started before it did (those started later inherit the block). After the first call on a thread, a
// thread-local comparison, unless the team has grown since.
void keepSignalsOffThisThread();

}  // namespace modscope::cpu
