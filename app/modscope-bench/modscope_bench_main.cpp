// modscope-bench: how fast the engine and the app are on this machine, in one run (docs/PERFORMANCE.md).
//
// Tables go to stdout, progress to stderr. Every figure is measured in this run; nothing fails on time
// (exit 0 unless something could not be measured at all: 1, or a bad command line: 2).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>

#include "bench_context.h"
#include "engine_sections.h"
#include "machine_info.h"
#include "modscope/engine.h"
#include "tool_command_line.h"

#ifdef MODSCOPE_BENCH_HAVE_APP
#include "app_section.h"
#endif

namespace {

const char* kAbout = R"(Measures how fast the engine and the app are on this machine, in one run (docs/PERFORMANCE.md).

usage: modscope-bench [--model DIR] [--json FILE] [--markdown FILE] [--quick] [--sections LIST]
)";

const char* kNotes = R"(
Tables go to stdout, progress to stderr. Every figure is measured in this run; nothing fails on time.
Exit status: 0 done, 1 something could not be measured at all, 2 bad arguments.
)";

using modscope::bench::BenchOptions;

// The comma-separated --sections list, each name checked.
void applySections(const std::string& list, BenchOptions& o) {
    const auto& all = BenchOptions::allSections();
    std::stringstream in(list);
    std::string name;
    o.sections.clear();
    while (std::getline(in, name, ',')) {
        if (name.empty()) continue;
        if (std::find(all.begin(), all.end(), name) == all.end())
            throw modscope::cli::UsageError("--sections: unknown section '" + name + "'");
        o.sections.insert(name);
    }
    if (o.sections.empty()) throw modscope::cli::UsageError("--sections: '" + list + "' names no section");
}

// Runs fn on a thread of its own that ends before this returns, and rethrows what fn threw. libgomp keeps a
// pool of threads for every thread that has started parallel work, for as long as that thread lives; with
// more pool threads than cores it stops spinning at barriers, and each of the engine's regions then waits on
// a futex. The app starts parallel work on its engine thread only (checked under gdb), so the app section
// must find no other pool: a 1,024-token Model::run on a fresh thread took 26.5-28 ms alone and 40-50 ms
// while the thread that had opened the model lived on (default model, this machine).
template <typename Fn>
void onItsOwnThread(Fn&& fn) {
    std::exception_ptr error;
    std::thread([&] {
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
    }).join();
    if (error) std::rethrow_exception(error);
}

}  // namespace

int main(int argc, char** argv) {
    // First, before any other thread starts: the engine changes process-wide state only when asked (modscope/engine.h).
    modscope::configureRuntime(modscope::RuntimeOptions::forTools());
    using namespace modscope;
    using namespace modscope::bench;
    BenchOptions options;
    std::string all_sections;
    for (const auto& name : BenchOptions::allSections()) all_sections += (all_sections.empty() ? "" : ",") + name;
    modscope::cli::ToolCommandLine cli("modscope-bench", kAbout, kNotes);
    cli.text("--model", options.model_dir, "DIR", "model to measure (default: the bundled default model)");
    cli.text("--json", options.json_path, "FILE", "write every figure as JSON (atomically)");
    cli.text("--markdown", options.markdown_path, "FILE", "write the tables as Markdown (for docs/PERFORMANCE.md)");
    cli.flag("--quick", options.quick,
             "fewer repetitions, no T = 2048 where slow, fewer training steps (under a minute)");
    cli.withValue("--sections", "LIST", "comma-separated, in any order; default all: " + all_sections,
                  [&options](const std::string& list) { applySections(list, options); });
    if (const auto status = cli.parse(argc, argv)) return *status;
    const auto t_start = std::chrono::steady_clock::now();
    BenchReport report;
    BenchContext ctx(options, report);
    try {
        auto& j = report.json;
        j["tool"] = "modscope-bench";
        j["quick"] = options.quick;
        j["machine"] = machineInfo();
        onItsOwnThread([&] { (void)ctx.model(); });  // opened off the main thread, which runs the app section
        const Model& model = ctx.model();
        j["model"] = {{"directory", ctx.modelDirectory()},
                      {"name", model.config().name},
                      {"config", nlohmann::json::parse(model.config().toJson())},
                      {"parameters", model.parameterCount()},
                      {"device", model.device()},
                      {"backend", model.backend()}};
        const auto& m = j["machine"];
        std::cout << "modscope-bench" << (options.quick ? " --quick" : "") << ": "
                  << m["cpu"].get<std::string>() << ", " << m["cores"].get<int>() << " cores, LibTorch "
                  << m["libtorch"].get<std::string>() << " (BLAS_INFO " << m["blas"].get<std::string>()
                  << ": " << m["blas_library"].get<std::string>() << " on " << m["openblas_threads_now"].get<int>()
                  << " thread(s)), matmuls on " << m["matmul_library"].get<std::string>() << ", "
                  << m["torch_threads"].get<int>() << " torch thread(s), load average " << loadAverage()
                  << "\nmodel: " << ctx.modelDirectory() << " on " << model.device() << ", backend "
                  << model.backend() << "\n\n";

        nlohmann::json ran = nlohmann::json::array();
        const auto section = [&](const char* name, void (*fn)(BenchContext&)) {
            if (!options.wants(name)) return;
            const auto t0 = std::chrono::steady_clock::now();
            // The engine's sections each on a thread that then ends; the app's needs the main thread (Qt's).
            if (std::string(name) == "app")
                fn(ctx);
            else
                onItsOwnThread([&] { fn(ctx); });
            ran.push_back(
                {{"name", name},
                 {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}});
        };
        section("forward", benchForward);
        section("mod", benchModVsDense);
        section("mixtures", benchMixtures);
        section("interventions", benchInterventions);
        section("stats", benchStats);
        section("layers", benchLayers);
        section("generation", benchGeneration);
        section("peak", benchPeak);
        section("routing", benchRouting);
#ifdef MODSCOPE_BENCH_HAVE_APP
        section("app", benchApp);
#else
        if (options.wants("app") && !options.sections.empty())
            throw Error("this build has no app (MODSCOPE_BUILD_APP=OFF): the app section cannot run");
#endif
        section("training", benchTraining);
        section("reference", benchReference);
        j["sections"] = ran;
        j["load_average_end"] = loadAverage();
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        j["duration_seconds"] = seconds;
        std::cout << "total " << seconds << " s, load average at the end " << loadAverage() << "\n";

        if (!options.json_path.empty()) writeFileAtomic(options.json_path, j.dump(2) + "\n");
        if (!options.markdown_path.empty()) {
            std::ostringstream md;
            md << "Measured on " << m["cpu"].get<std::string>() << " (" << m["cores"].get<int>()
               << " cores), LibTorch " << m["libtorch"].get<std::string>() << ", BLAS "
               << m["blas_library"].get<std::string>() << " (" << m["openblas_threads_now"].get<int>()
               << " thread), matmuls on " << m["matmul_library"].get<std::string>() << ", "
               << m["torch_threads"].get<int>() << " LibTorch thread(s); load average " << m["load_average"][0] << " at the start, "
               << j["load_average_end"] << " at the end; " << (options.quick ? "--quick, " : "") << "total "
               << static_cast<int>(seconds) << " s.\n\n";
            for (const auto& t : report.tables) md << t.markdown() << "\n";
            writeFileAtomic(options.markdown_path, md.str());
        }
    } catch (const std::exception& e) {
        return cli.fail(e.what());
    }
    return 0;
}
