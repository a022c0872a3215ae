#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, as root (README.md):
#   bash scripts/setup.sh run    install, build, and open the app on the bundled default model
#   bash scripts/setup.sh test   install, build, and run every test through CTest; then the whole suite again
#                                under AddressSanitizer + UBSan (the dev-asan preset), then each libFuzzer
#                                target for a bounded time (the fuzz preset). Any failure or finding fails it.
# Options through the environment: BUILD_DIR (default build), BUILD_TYPE (Release), JOBS (all cores),
# MODSCOPE_PRESET=dev-asan to build and test with AddressSanitizer + UBSan only, FUZZ_SECONDS (30 per target;
# 0 skips fuzzing), SANITIZERS=0 to skip the sanitizer and fuzzing stages of `test`.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in run|test|build|deps) ;; *) echo "usage: bash scripts/setup.sh run|test|build|deps" >&2; exit 2 ;; esac

# Every package the project needs, from Debian 12's archive.
packages=(
    build-essential cmake ninja-build pkg-config git
    clang libclang-rt-14-dev
    qt6-base-dev qt6-svg-dev qt6-qpa-plugins libgl-dev libqcustomplot-dev
    libsentencepiece-dev libtorch-dev libopenblas0-pthread nlohmann-json3-dev
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
build
dir=$(build_dir)

# The whole suite under AddressSanitizer + UBSan (CMakePresets.json's dev-asan: the test preset sets
# ASAN_OPTIONS). The tokenizer module stays uninstrumented (DEVELOPERS.md).
sanitizer_stage() {
    local t0=$SECONDS
    cmake --preset dev-asan
    cmake --build --preset dev-asan -j "${JOBS:-$(nproc)}"
    local t1=$SECONDS
    ctest --preset dev-asan --timeout 1800 -j "${JOBS:-2}"
    echo "setup: sanitizer stage: build $((t1 - t0)) s, tests $((SECONDS - t1)) s"
}

# Each libFuzzer target from its seed corpus (fuzz/corpus/<target>) for FUZZ_SECONDS. New inputs go to a
# scratch folder; a crash, a leak, a timeout or an out-of-memory stops it with its input in build-fuzz/findings.
fuzz_stage() {
    local seconds=${FUZZ_SECONDS:-30}
    [ "$seconds" -gt 0 ] || return 0
    local t0=$SECONDS
    cmake --preset fuzz
    cmake --build --preset fuzz -j "${JOBS:-$(nproc)}"
    local t1=$SECONDS
    mkdir -p build-fuzz/findings
    local target work
    for target in config trace_json trace_jsonl trace_csv checkpoint; do
        work=$(mktemp -d)
        echo "setup: fuzzing fuzz_$target for $seconds s"
        if ! build-fuzz/bin/fuzz_$target -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
            -max_len=65536 -print_final_stats=1 -artifact_prefix="build-fuzz/findings/$target-" \
            "$work" "fuzz/corpus/$target" > "build-fuzz/fuzz_$target.log" 2>&1; then
            tail -n 60 "build-fuzz/fuzz_$target.log"
            echo "setup: fuzz_$target found a problem; its input is in build-fuzz/findings/" >&2
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
    if [ "${SANITIZERS:-1}" != 0 ] && [ -z "${MODSCOPE_PRESET:-}" ]; then
        sanitizer_stage
        fuzz_stage
    fi
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
