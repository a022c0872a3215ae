// The machine a benchmark ran on, for the report: CPU, cores, memory, load, LibTorch and its BLAS.
#pragma once

#include <nlohmann/json.hpp>

namespace modscope::bench {

// {"cpu", "cores", "memory_gb", "os", "load_average" [1, 5, 15 min], "libtorch", "blas", "blas_library",
//  "torch_threads", "openblas_threads" (environment), "openblas_threads_now", "matmul_library"}
nlohmann::json machineInfo();

// The 1-minute load average now (other people's work on a shared machine shows here); -1 when unknown.
double loadAverage();

}  // namespace modscope::bench
