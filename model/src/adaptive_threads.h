// How many threads the engine's CPU work gets, chosen from what the rest of the machine is doing, where
// RuntimeOptions::adapt_threads asks for it; and OpenBLAS's thread count (internal to model/).
//
// Why: the matmuls and loops run on LibTorch's OpenMP pool, and a parallel region ends at a barrier that waits
// for every thread of the team. With other processes keeping the cores busy, the kernel preempts one of our
// threads for a whole time slice while the other waits at the barrier, at every region: a 114-token run in the
// app took 706 ms instead of 10 ms with two busy processes beside it, and 14 ms on one thread
// (docs/CPU_BACKEND.md, Threads and matmuls). So the engine leaves other processes the cores they are using and
// takes the rest: on two cores, one thread while others use more than half a core, both otherwise.
#pragma once

namespace modscope::cpu {

// The cores LibTorch may use: every one, or MODSCOPE_TORCH_THREADS when it is set to a positive count
// (which also stops adaptThreads from changing it).
int allCores();
int fixedThreads();  // MODSCOPE_TORCH_THREADS's count, 0 when unset or not positive

// Cumulative CPU time in seconds: all cores' busy time (steal included) and this process's own.
struct CpuTimes {
    double wall = 0, machine_busy = 0, own_busy = 0;
};
CpuTimes readCpuTimes();  // /proc/stat and /proc/self/stat; zeros where they cannot be read

// Threads for the next interval given two readings: `cores` less the cores other processes used between them
// (rounded to the nearest), at least 1. Fewer than 0.1 s apart: undecided (returns 0).
int threadsFromLoad(const CpuTimes& before, const CpuTimes& after, int cores);

// Called before CPU work on the calling thread: re-reads the load at most every 0.25 s and sets LibTorch's
// thread count (this thread's OpenMP pool, which also threads oneDNN) to the choice. A no-op when
// MODSCOPE_TORCH_THREADS fixes the count. Returns the threads in force.
int adaptThreads();

// OpenBLAS's thread count now, 0 when the BLAS LibTorch loaded is not OpenBLAS; and its setter (a no-op then).
int openBlasThreads();
void setOpenBlasThreads(int threads);

}  // namespace modscope::cpu
