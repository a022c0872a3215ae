// Device choice, backend availability and the process's runtime options (modscope/engine.h).
#include <ATen/Parallel.h>
#include <malloc.h>
#include <torch/cuda.h>

#include <cstdlib>
#include <mutex>

#include "adaptive_threads.h"
#include "backend/backend.h"
#include "modscope/engine.h"
#include "runtime_state.h"
#ifdef MODSCOPE_CPU_KERNELS
#include "cpu/cpu_matmul.h"
#include "cpu/cpu_signals.h"
#endif

namespace modscope {

bool cudaCompiledIn() {
#ifdef MODSCOPE_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

bool cudaAvailable() {
    return cudaCompiledIn() && torch::cuda::is_available();
}

std::string resolveDevice(const std::string& requested) {
    if (requested == "cpu") return "cpu";
    if (requested == "auto" || requested.empty()) return cudaAvailable() ? "cuda:0" : "cpu";
    if (requested == "cuda" || requested.rfind("cuda:", 0) == 0) {
        if (!cudaCompiledIn())
            throw Error(
                "device 'cuda' requested, but this ModScope was built against a LibTorch without CUDA "
                "(rebuild with CMAKE_PREFIX_PATH pointing at a CUDA LibTorch, see README.md)");
        if (!torch::cuda::is_available())
            throw Error("device 'cuda' requested, but no CUDA GPU is visible to LibTorch on this machine");
        const std::string index = requested == "cuda" ? "0" : requested.substr(5);
        char* end = nullptr;
        const long i = std::strtol(index.c_str(), &end, 10);
        if (index.empty() || *end != '\0' || i < 0 || i >= static_cast<long>(torch::cuda::device_count()))
            throw Error("device '" + requested + "': no such CUDA device");
        return "cuda:" + std::to_string(i);
    }
    throw Error("unknown device '" + requested + "' (expected auto, cpu or cuda)");
}

bool cpuKernelsCompiledIn() {
    return backend::cpuKernelsBuilt();
}
bool cpuKernelsEnabled() {
    return backend::cpuKernelsUsable() != nullptr;
}

namespace {

std::mutex g_runtime_mutex;
RuntimeOptions g_runtime;
bool g_configured = false;

}  // namespace

RuntimeOptions RuntimeOptions::forTools() {
    RuntimeOptions o;
    const int fixed = cpu::fixedThreads();
    o.threads = fixed > 0 ? fixed : cpu::allCores();
    o.adapt_threads = fixed <= 0;
    // OpenBLAS runs the ops backend's products: one thread only where the kernel backend will run them.
    o.single_thread_blas = backend::cpuKernelsBuilt() && !backend::cpuKernelsTurnedOff();
    o.keep_freed_memory = true;
    o.cpu_kernels = true;
    return o;
}

bool configureRuntime(const RuntimeOptions& options) {
    std::lock_guard<std::mutex> lock(g_runtime_mutex);
    if (g_configured) return false;
    g_configured = true;
    g_runtime = options;
#ifdef MODSCOPE_CPU_KERNELS
    // First, while this may still be the only thread: the thread that runs signal handlers (cpu_signals.h).
    if (options.cpu_kernels) cpu::startSignalThread();
#else
    g_runtime.cpu_kernels = false;
#endif
    if (options.keep_freed_memory) {
        // By default glibc serves blocks this large with mmap and returns them on free, so every run
        // page-faults its buffers in again: 650k faults in 6 s of forwards, and up to a third of the time at
        // T = 128.
#ifdef M_MMAP_THRESHOLD
        mallopt(M_MMAP_THRESHOLD, 512 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
        mallopt(M_TOP_PAD, 64 << 20);
#endif
    }
    if (options.single_thread_blas) cpu::setOpenBlasThreads(1);
    if (options.threads > 0) at::set_num_threads(options.threads);
    return true;
}

RuntimeOptions runtimeOptions() {
    std::lock_guard<std::mutex> lock(g_runtime_mutex);
    return g_runtime;
}

namespace runtime {

const RuntimeOptions& state() {
    return g_runtime;
}

void beforeCpuWork() {
    if (g_runtime.adapt_threads) cpu::adaptThreads();
}

}  // namespace runtime

}  // namespace modscope
