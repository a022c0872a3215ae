// Which backend runs (backend.h, "choice").
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "modscope/engine.h"
#include "runtime_state.h"
#ifdef MODSCOPE_CPU_KERNELS
#include "cpu/cpu_kernels.h"
#endif

namespace modscope::backend {

#ifdef MODSCOPE_CPU_KERNELS
const OpsBackend& cpuKernelsBackend();  // cpu/cpu_kernels_backend.cpp
#endif

namespace {

thread_local const OpsBackend* t_current = nullptr;

// The kernel backend, refused while MODSCOPE_CPU_ISA holds a word that is no level: the kernels ignore it, and a
// run meant to test one level would pass at the CPU's own.
const OpsBackend& kernelsWithValidIsa() {
#ifdef MODSCOPE_CPU_KERNELS
    if (const auto error = cpu::environmentIsaError(); !error.empty()) throw Error(error);
#endif
    return *cpuKernels();
}

}  // namespace

bool cpuKernelsTurnedOff() {
    static const bool off = [] {
        const char* env = std::getenv("MODSCOPE_CPU_KERNELS");
        if (env == nullptr) return false;
        for (const char* word : {"0", "off", "OFF", "no", "false"})
            if (std::strcmp(env, word) == 0) return true;
        return false;
    }();
    return off;
}

const OpsBackend& ops() {
    static const OpsBackend backend;
    return backend;
}

const OpsBackend* cpuKernels() {
#ifdef MODSCOPE_CPU_KERNELS
    return &cpuKernelsBackend();
#else
    return nullptr;
#endif
}

bool cpuKernelsBuilt() {
    return cpuKernels() != nullptr;
}

const OpsBackend* cpuKernelsUsable() {
    if (cpuKernelsTurnedOff() || !runtime::state().cpu_kernels) return nullptr;
    return cpuKernels();
}

const OpsBackend& resolve(const std::string& requested, const torch::Device& device,
                          torch::ScalarType dtype) {
    if (requested == "ops") return ops();
    const bool fits = device.is_cpu() && dtype == torch::kFloat32;
    if (requested == "auto" || requested.empty())
        return fits && cpuKernelsUsable() ? kernelsWithValidIsa() : ops();
    if (requested == "cpu-kernels") {
        if (!cpuKernelsBuilt())
            throw Error(
                "backend 'cpu-kernels' requested, but this ModScope was built with MODSCOPE_CPU_KERNELS=OFF");
        if (cpuKernelsTurnedOff())
            throw Error(
                "backend 'cpu-kernels' requested, but MODSCOPE_CPU_KERNELS in the environment turns it off");
        if (!runtime::state().cpu_kernels)
            throw Error(
                "backend 'cpu-kernels' requested, but the process did not enable it "
                "(configureRuntime with RuntimeOptions::cpu_kernels)");
        if (!fits) throw Error("backend 'cpu-kernels' runs float32 models on the CPU only");
        return kernelsWithValidIsa();
    }
    throw Error("unknown backend '" + requested + "' (expected auto, ops or cpu-kernels)");
}

std::vector<const OpsBackend*> usable() {
    std::vector<const OpsBackend*> out{&ops()};
    if (const auto* k = cpuKernelsUsable()) out.push_back(k);
    return out;
}

const OpsBackend& current() {
    if (t_current != nullptr) return *t_current;
    const auto* kernels = cpuKernelsUsable();
    return kernels != nullptr ? *kernels : ops();
}

Use::Use(const OpsBackend& backend) : previous_(t_current) {
    t_current = &backend;
}
Use::~Use() {
    t_current = previous_;
}

}  // namespace modscope::backend
