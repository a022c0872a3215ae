// Device choice and LibTorch thread settings.
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <malloc.h>

#include <cstdlib>
#include <mutex>

#include "cpu_matmul.h"
#include "cpu_signals.h"
#include "cpu_threads.h"
#include "modscope/engine.h"

namespace modscope {

bool cudaCompiledIn() {
#ifdef MODSCOPE_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

bool cudaAvailable() { return cudaCompiledIn() && torch::cuda::is_available(); }

std::string resolveDevice(const std::string& requested) {
    if (requested == "cpu") return "cpu";
    if (requested == "auto" || requested.empty()) return cudaAvailable() ? "cuda:0" : "cpu";
    if (requested == "cuda" || requested.rfind("cuda:", 0) == 0) {
        if (!cudaCompiledIn())
            throw Error("device 'cuda' requested, but this ModScope was built against a LibTorch without CUDA "
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

void configureRuntime() {
    static std::once_flag once;
    std::call_once(once, [] {
        // A forward allocates and frees tensors of 0.1-50 MB by the dozen. By default glibc serves them
        // with mmap and returns them on free, so every run page-faults its buffers in again: 650k faults
        // in 6 s of forwards, measured, and up to a third of the time at T = 128. Kept in the heap, they are
        // reused; the process's footprint stays at its peak rather than shrinking between runs.
#ifdef M_MMAP_THRESHOLD
        mallopt(M_MMAP_THRESHOLD, 512 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
        mallopt(M_TOP_PAD, 64 << 20);
#endif
        // The matmuls run on oneDNN's sgemm (cpu_matmul.h), threaded by LibTorch's OpenMP pool like every
        // other operator; OpenBLAS, which would start its own threads for any product left to it, gets one.
        // Two pools spinning for the same cores halve throughput on a 2-core machine (DEVELOPERS.md).
        cpu::setOpenBlasThreads(1);
        const int fixed = cpu::fixedThreads();
        const int threads = fixed > 0 ? fixed : cpu::allCores();
        at::set_num_threads(threads);
    });
}

void startSignalThread() { cpu::startSignalThread(); }

}  // namespace modscope
