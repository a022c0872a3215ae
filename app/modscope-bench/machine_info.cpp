#include "machine_info.h"

#include <sys/utsname.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "modscope/profiling.h"

namespace modscope::bench {

namespace {

// The value of the first "key : value" line of a /proc file whose key starts with key.
std::string procField(const char* file, const std::string& key) {
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
        if (line.compare(0, key.size(), key) != 0) continue;
        const auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        auto value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(" \t"));
        return value;
    }
    return {};
}

// The BLAS library this process has loaded. Debian's LibTorch reports BLAS_INFO "generic": it calls
// whichever libblas.so.3 the alternatives system selects (OpenBLAS, or the slow reference BLAS).
std::string loadedBlasLibrary() {
    std::ifstream in("/proc/self/maps");
    std::string line;
    while (std::getline(in, line)) {
        const auto slash = line.find('/');
        if (slash == std::string::npos) continue;
        const auto path = line.substr(slash);
        if (path.find("blas") == std::string::npos) continue;
        std::error_code ec;
        const auto real = std::filesystem::canonical(path, ec);
        return ec ? path : real.string();
    }
    return "unknown";
}

}  // namespace

double loadAverage() {
    std::ifstream in("/proc/loadavg");
    double one = -1;
    in >> one;
    return one;
}

nlohmann::json machineInfo() {
    nlohmann::json m;
    m["cpu"] = procField("/proc/cpuinfo", "model name");
    m["cores"] = std::thread::hardware_concurrency();
    const auto mem = procField("/proc/meminfo", "MemTotal");  // "16384 kB"
    m["memory_gb"] = mem.empty() ? 0.0 : std::stod(mem) / (1024.0 * 1024.0);
    utsname u{};
    if (uname(&u) == 0) m["os"] = std::string(u.sysname) + " " + u.release + " " + u.machine;
    std::ifstream in("/proc/loadavg");
    double a = 0, b = 0, c = 0;
    in >> a >> b >> c;
    m["load_average"] = {a, b, c};
    const auto build = engineBuildInfo();
    m["libtorch"] = build.torch_version;
    m["blas"] = build.blas;
    m["blas_library"] = loadedBlasLibrary();
    m["torch_threads"] = build.torch_threads;
    m["openblas_threads"] =
        build.openblas_threads.empty() ? nlohmann::json(nullptr) : nlohmann::json(build.openblas_threads);
    m["openblas_threads_now"] = build.openblas_threads_now;
    m["matmul_library"] = build.matmul_library;
    return m;
}

}  // namespace modscope::bench
