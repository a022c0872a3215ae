#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, as root (README.md):
#   bash scripts/setup.sh run    install, build, and open the app on the bundled default model
#   bash scripts/setup.sh test   install, build, and run every test through CTest; then the engine tests
#                                again in a build without the CPU kernels (the ops-only preset: the ops
#                                backend alone, as on a GPU or a non-x86 machine); then the whole suite under
#                                AddressSanitizer + UBSan (the dev-asan preset), then each libFuzzer target on
#                                a fixed number of inputs from a fixed seed (the fuzz preset). Any failure or
#                                finding fails it.
#   bash scripts/setup.sh fuzz   build the fuzz preset and fuzz each target for FUZZ_SECONDS (600) from a
#                                random seed, to look for new defects rather than gate on old ones.
# Options through the environment: BUILD_DIR (default build), BUILD_TYPE (Release), JOBS (all cores),
# MODSCOPE_PRESET=dev-asan to build and test with AddressSanitizer + UBSan only, FUZZ=0 to skip the fuzz
# stage of `test`, FUZZ_SEED (1) for its seed, SANITIZERS=0 to skip the sanitizer and fuzz stages of `test`,
# OPS_ONLY=0 to skip its ops-only stage.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in run|test|build|deps|fuzz) ;; *) echo "usage: bash scripts/setup.sh run|test|build|deps|fuzz" >&2; exit 2 ;; esac

# Every package the project needs, from Debian 12's archive.
packages=(
    build-essential cmake ninja-build pkg-config git
    clang libclang-rt-14-dev
    qt6-base-dev qt6-svg-dev qt6-qpa-plugins libgl-dev libqcustomplot-dev
    libsentencepiece-dev libtorch-dev libdnnl-dev libopenblas0-pthread nlohmann-json3-dev libcli11-dev
    locales
    python3-torch
    xvfb xauth fonts-dejavu-core
    fortunes bible-kjv
)

install_packages() {
    local missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "setup: all ${#packages[@]} packages present"
        return
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    # LibTorch must use the threaded OpenBLAS, not the reference BLAS (30x slower matmuls).
    local blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
    if [ -e "$blas" ]; then
        update-alternatives --set libblas.so.3-x86_64-linux-gnu "$blas" >/dev/null
        update-alternatives --set liblapack.so.3-x86_64-linux-gnu \
            /usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3 >/dev/null
    fi
}

build() {
    local preset=${MODSCOPE_PRESET:-}
    local jobs=${JOBS:-$(nproc)}
    if [ -n "$preset" ]; then
        cmake --preset "$preset"
        cmake --build --preset "$preset" -j "$jobs"
    else
        local dir=${BUILD_DIR:-build}
        cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}"
        cmake --build "$dir" -j "$jobs"
    fi
}

build_dir() {
    if [ -n "${MODSCOPE_PRESET:-}" ]; then echo "build-${MODSCOPE_PRESET}"; else echo "${BUILD_DIR:-build}"; fi
}

install_packages
[ "$mode" = deps ] && exit 0
if [ "$mode" != fuzz ]; then
    build
    dir=$(build_dir)
fi

# The whole suite under AddressSanitizer + UBSan (CMakePresets.json's dev-asan: the test preset sets
# ASAN_OPTIONS, and leaves out the float64 variants and the ops variants of the checkpoint, trainer and
# reference tests, whose code the routing and generation tests' ops variants already run under it, and
# tool_command_line_test and bench_tool_test, which run the command-line tools and nothing else, so that the
# build preset builds neither them nor modscope-bench; the kernel tests run at the CPU's own instruction-set
# level only, MODSCOPE_TEST_ISA_ROWS=native, and the trace and trainer tests leave their runs of modscope-trace
# and modscope-train to the normal suite, MODSCOPE_TEST_SKIP_TOOLS). A new test goes into the build preset's
# targets too. The tokenizer module stays uninstrumented (DEVELOPERS.md).
sanitizer_stage() {
    local t0=$SECONDS
    cmake --preset dev-asan
    cmake --build --preset dev-asan -j "${JOBS:-$(nproc)}"
    local t1=$SECONDS
    ctest --preset dev-asan --timeout 1800 -j "${JOBS:-2}"
    echo "setup: sanitizer stage: build $((t1 - t0)) s, tests $((SECONDS - t1)) s"
}

# The build without the CPU kernels (CMakePresets.json's ops-only: no oneDNN, no intrinsics, no app), its
# engine tests only (the preset's targets and filter): what a GPU or a machine other than x86-64 builds.
ops_only_stage() {
    local t0=$SECONDS
    cmake --preset ops-only
    cmake --build --preset ops-only -j "${JOBS:-$(nproc)}"
    local t1=$SECONDS
    ctest --preset ops-only --timeout 1200 -j "${JOBS:-2}"
    echo "setup: ops-only stage: build $((t1 - t0)) s, tests $((SECONDS - t1)) s"
}

# Each libFuzzer target from its seed corpus (fuzz/corpus/<target>, plus the inputs of past findings in
# tests/data/fuzz_regressions) into a scratch folder; a crash, a leak, a timeout or an out-of-memory stops it
# with its input in build-fuzz/findings. `test` runs a fixed number of inputs from a fixed seed, so that a red
# CI reproduces with the same command (CI once failed on a finding a time-bounded random run happened on);
# `fuzz` explores: FUZZ_SECONDS a target (default 600) from a random seed.
fuzz_runs() {
    case "$1" in  # about 10 s each on the 2-core CI machine: a gate on known inputs, `fuzz` explores
    config) echo 200000 ;; trace_json) echo 60000 ;; trace_jsonl) echo 60000 ;; trace_csv) echo 200000 ;;
    checkpoint) echo 50000 ;; stats_json) echo 10000 ;;
    esac
}

fuzz_stage() {
    local how=$1
    local t0=$SECONDS
    cmake --preset fuzz
    cmake --build --preset fuzz -j "${JOBS:-$(nproc)}"
    local t1=$SECONDS
    mkdir -p build-fuzz/findings
    local target work limits
    for target in config trace_json trace_jsonl trace_csv stats_json checkpoint; do
        if [ "$how" = gate ]; then
            limits=(-seed="${FUZZ_SEED:-1}" -runs="$(fuzz_runs "$target")" -max_total_time=300)
            echo "setup: fuzzing fuzz_$target: ${limits[*]}"
        else
            limits=(-max_total_time="${FUZZ_SECONDS:-600}")
            echo "setup: fuzzing fuzz_$target for ${FUZZ_SECONDS:-600} s from a random seed"
        fi
        work=$(mktemp -d)
        local corpora=("fuzz/corpus/$target")
        if [ "$target" = checkpoint ]; then corpora+=(tests/data/fuzz_regressions); fi
        if ! build-fuzz/bin/fuzz_$target "${limits[@]}" -rss_limit_mb=2048 -timeout=10 \
            -max_len=65536 -print_final_stats=1 -artifact_prefix="build-fuzz/findings/$target-" \
            "$work" "${corpora[@]}" > "build-fuzz/fuzz_$target.log" 2>&1; then
            tail -n 60 "build-fuzz/fuzz_$target.log"
            echo "setup: fuzz_$target found a problem; its input is in build-fuzz/findings/" >&2
            grep -m1 '^INFO: Seed:' "build-fuzz/fuzz_$target.log" >&2 || true
            rm -rf "$work"
            return 1
        fi
        grep -E '^stat::number_of_executed_units|^Done' "build-fuzz/fuzz_$target.log" || true
        rm -rf "$work"
    done
    echo "setup: fuzz stage: build $((t1 - t0)) s, fuzzing $((SECONDS - t1)) s"
}

case "$mode" in
test)
    t0=$SECONDS
    (cd "$dir" && ctest --output-on-failure --timeout 1200 -j "${JOBS:-2}")
    echo "setup: tests $((SECONDS - t0)) s"
    if [ "${OPS_ONLY:-1}" != 0 ] && [ -z "${MODSCOPE_PRESET:-}" ]; then
        ops_only_stage
    fi
    if [ "${SANITIZERS:-1}" != 0 ] && [ -z "${MODSCOPE_PRESET:-}" ]; then
        sanitizer_stage
        [ "${FUZZ:-1}" = 0 ] || fuzz_stage gate
    fi
    ;;
fuzz)
    fuzz_stage explore
    ;;
run)
    model=resources/models/default
    [ -f "$model/weights.pt" ] || echo "setup: note: $model has no weights.pt; the app will ask for a model"
    if [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; then
        exec "$dir/bin/modscope" --model "$model"
    else
        echo "setup: no display here; starting the app on a virtual X server (xvfb-run) and saving a"
        echo "       screenshot of its window to $dir/modscope-screenshot.png"
        exec xvfb-run -a -s "-screen 0 1920x1200x24" "$dir/bin/modscope" --model "$model" \
            --prompt "In the beginning God created the heaven and the earth." \
            --screenshot "$dir/modscope-screenshot.png"
    fi
    ;;
esac
