#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, as root (README.md):
#   bash scripts/setup.sh run    install, build, and open the app on the bundled default model
#   bash scripts/setup.sh test   install, build, and run every test through CTest
# Options through the environment: BUILD_DIR (default build), BUILD_TYPE (Release), JOBS (all cores),
# MODSCOPE_PRESET=dev-asan to build and test with AddressSanitizer + UBSan instead.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in run|test|build|deps) ;; *) echo "usage: bash scripts/setup.sh run|test|build|deps" >&2; exit 2 ;; esac

# Every package the project needs, from Debian 12's archive.
packages=(
    build-essential cmake ninja-build pkg-config git
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

case "$mode" in
test)
    cd "$dir"
    ctest --output-on-failure --timeout 1200 -j "${JOBS:-2}"
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
