// Thread count from the machine's load (adaptive_threads.h).
#include "adaptive_threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

namespace modscope::cpu {

namespace {

double nowSeconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int allCores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

int fixedThreads() {
    const char* env = std::getenv("MODSCOPE_TORCH_THREADS");
    return env != nullptr ? std::max(0, std::atoi(env)) : 0;
}

CpuTimes readCpuTimes() {
    CpuTimes t;
    t.wall = nowSeconds();
    const double tick = static_cast<double>(std::max(1L, sysconf(_SC_CLK_TCK)));
    std::ifstream stat("/proc/stat");
    std::string label;
    // cpu  user nice system idle iowait irq softirq steal ...
    double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
    if (stat >> label >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal && label == "cpu")
        t.machine_busy = (user + nice + system + irq + softirq + steal) / tick;
    std::ifstream self("/proc/self/stat");
    std::string line;
    if (std::getline(self, line)) {
        // pid (comm) state ppid ... : utime and stime are the 12th and 13th fields after the comm's ')'.
        const auto close = line.rfind(')');
        if (close != std::string::npos) {
            std::istringstream rest(line.substr(close + 1));
            std::string field;
            double utime = 0, stime = 0;
            for (int i = 1; i <= 13 && rest >> field; ++i) {
                if (i == 12) utime = std::atof(field.c_str());
                if (i == 13) stime = std::atof(field.c_str());
            }
            t.own_busy = (utime + stime) / tick;
        }
    }
    return t;
}

int threadsFromLoad(const CpuTimes& before, const CpuTimes& after, int cores) {
    const double wall = after.wall - before.wall;
    if (wall < 0.1) return 0;
    const double others = ((after.machine_busy - before.machine_busy) - (after.own_busy - before.own_busy)) / wall;
    // Leave other processes the cores they are using (rounded), and keep the rest.
    return std::max(1, cores - static_cast<int>(std::floor(std::max(0.0, others) + 0.5)));
}

int adaptThreads() {
    static const bool fixed = fixedThreads() > 0;
    if (fixed) return at::get_num_threads();
    static std::mutex mutex;
    static CpuTimes last = readCpuTimes();
    static int chosen = allCores();
    int threads = 0;
    {
        std::lock_guard<std::mutex> lock(mutex);
        if (nowSeconds() - last.wall >= 0.25) {
            const auto now = readCpuTimes();
            if (const int n = threadsFromLoad(last, now, allCores()); n > 0) chosen = n;
            last = now;
        }
        threads = chosen;
    }
    if (at::get_num_threads() != threads) at::set_num_threads(threads);
    return threads;
}

// Looked up at run time: libblas.so.3 is whichever BLAS Debian's alternatives select.
int openBlasThreads() {
    auto* get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    return get != nullptr ? get() : 0;
}

void setOpenBlasThreads(int threads) {
    if (auto* set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set(threads);
}

}  // namespace modscope::cpu
