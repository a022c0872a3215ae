#!/usr/bin/env bash
# The GPU check (DEVELOPERS.md, "Backends"): builds the engine, its engine tests and modscope-trace against a
# CUDA LibTorch (by default the one inside python3's PyTorch wheel), runs the engine tests with CUDA as the test
# device, and compares the bundled model's routing traces on CUDA with the CPU's, prompt by prompt.
#
#   bash scripts/gpu_check.sh
#
# Environment: TORCH_PREFIX, a LibTorch's CMake prefix (default: python3 -c 'import torch;
# print(torch.utils.cmake_prefix_path)'); PYTHON (python3); BUILD_DIR (build-gpu); JOBS (all cores);
# GPU_CHECK_CPU_ONLY=1 runs every step with the CPU standing in for the GPU (to try the script where there is
# none: nothing it then prints is a GPU result).
#
# The build has no Qt app and no CPU kernels (MODSCOPE_BUILD_APP=OFF, MODSCOPE_CPU_KERNELS=OFF): the wheel
# ships no oneDNN headers, and the ops backend is what CUDA runs. It needs CMake, Ninja, a C++17 compiler, the
# CUDA toolkit that matches the wheel, and Qt 6 Core/Test, SentencePiece and nlohmann-json (Debian:
# qt6-base-dev libsentencepiece-dev nlohmann-json3-dev libcli11-dev), which it installs with apt-get where it can.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
dir=${BUILD_DIR:-build-gpu}
jobs=${JOBS:-$(nproc)}
cpu_only=${GPU_CHECK_CPU_ONLY:-0}
say() { echo "gpu_check: $*"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

# 1. The LibTorch to build against, and whether it has CUDA and a GPU.
if [ -z "${TORCH_PREFIX:-}" ]; then
    TORCH_PREFIX=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)') ||
        fail "$py cannot import torch; set TORCH_PREFIX to a CUDA LibTorch's CMake prefix"
fi
say "LibTorch from $TORCH_PREFIX"
"$py" - <<'EOF' || fail "the PyTorch python imports cannot serve this check (see above)"
import sys, torch
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, C++11 ABI {torch._C._GLIBCXX_USE_CXX11_ABI}")
if not torch._C._GLIBCXX_USE_CXX11_ABI:
    print("gpu_check: this LibTorch uses the pre-C++11 string ABI; Debian's Qt and SentencePiece cannot link with it")
    sys.exit(1)
EOF
if [ "$cpu_only" = 1 ]; then
    device=cpu
    say "GPU_CHECK_CPU_ONLY=1: the CPU stands in for the GPU; no result below is a GPU result"
else
    device=cuda
    "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        fail "torch sees no CUDA GPU here (nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 1))"
    nvidia-smi -L || true
fi

# 2. The packages the engine and its tests build with.
need=()
for p in cmake ninja-build g++ pkg-config qt6-base-dev libsentencepiece-dev nlohmann-json3-dev libcli11-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; } ||
        fail "cannot install ${need[*]} (no package mirror?); install them and run this again"
fi

# 3. Build: the engine, its tests, and the tools they drive.
cuda_args=()
[ -d /usr/local/cuda ] && cuda_args+=(-DCUDAToolkit_ROOT=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DMODSCOPE_BUILD_APP=OFF -DMODSCOPE_CPU_KERNELS=OFF "${cuda_args[@]}"
targets=(engine_routing_test engine_generation_test engine_mixture_test engine_interventions_test engine_backends_test engine_runtime_test checkpoint_test
         reference_test trainer_test modscope-trace modscope-train)
cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
bin="$dir/bin"
if [ "$device" = cuda ]; then
    "$bin/modscope-trace" --device cuda --prompt "probe" --out "$dir/probe.json" --quiet ||
        fail "modscope-trace cannot run on CUDA: was the engine built with CUDA? (cmake's 'CUDA build:' line above)"
fi

# 4. The engine tests, first on the CPU with this build; then the device-parametrised ones with their models on
# the device: engine_backends_test (the bundled model on the device against the CPU: routing in both modes at
# 16-1,024 tokens, generation), engine_routing_test and engine_generation_test (float32, then float64), and
# engine_mixture_test (mixture layers: capacity, causality, the KV cache) and engine_interventions_test (forced
# decisions, and decision values against single-flip runs).
# checkpoint_test, reference_test and trainer_test also run /usr/bin/python3 with torch (the Python reference,
# the broken checkpoints): they join where it is there.
tests='^engine_'
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import torch' 2>/dev/null && tests='^(engine_|trainer_test|checkpoint_test|reference_test)'
say "engine tests on the CPU"
(cd "$dir" && QT_QPA_PLATFORM=offscreen ctest --output-on-failure --timeout 1200 -R "$tests")
say "engine tests with their models on $device"
(cd "$dir" && MODSCOPE_TEST_DEVICE=$device QT_QPA_PLATFORM=offscreen \
    ctest --output-on-failure --timeout 1200 -R '^engine_(backends|routing|generation|mixture|interventions)_test')

# 5. The bundled model's traces on the device against the CPU's: the same decisions, router logits within
# 2e-3 (float32 summed in another order), in both modes over the whole context (2,048 tokens of README.md), and
# in a greedy generation of 48 tokens after a short prompt.
prompt=$dir/gpu_check_prompt.txt
cat README.md DEVELOPERS.md > "$prompt"
status=0
for mode in topk causal; do
    for d in cpu "$device"; do
        "$bin/modscope-trace" --device "$d" --input "$prompt" --mode "$mode" \
            --out "$dir/gpu_check_${mode}_$d.json" --quiet || fail "modscope-trace on $d ($mode)"
        "$bin/modscope-trace" --device "$d" --prompt "And God said unto Moses, I AM THAT I AM" --mode "$mode" \
            --generate 48 --temperature 0 --out "$dir/gpu_check_${mode}_gen_$d.json" --quiet ||
            fail "modscope-trace --generate on $d ($mode)"
    done
    "$py" - "$dir/gpu_check_${mode}_cpu.json" "$dir/gpu_check_${mode}_$device.json" \
        "$dir/gpu_check_${mode}_gen_cpu.json" "$dir/gpu_check_${mode}_gen_$device.json" <<'EOF' || status=1
import json, sys
a, b, ga, gb = (json.load(open(p)) for p in sys.argv[1:5])
cells = diff = 0
worst = 0.0
for la, lb in zip(a["layers"], b["layers"]):
    cells += len(la["selected"])
    diff += sum(x != y for x, y in zip(la["selected"], lb["selected"]))
    if la["router_logits"] is not None:
        worst = max([worst] + [abs(x - y) for x, y in zip(la["router_logits"], lb["router_logits"])])
ga, gb = ga["generation"], gb["generation"]
assert len(ga["steps"]) == 48 and len(gb["steps"]) == 48, "the generation made fewer than 48 steps"
same_tokens = [s["token_id"] for s in ga["steps"]] == [s["token_id"] for s in gb["steps"]]
same_steps = [s["processed"] for s in ga["steps"]] == [s["processed"] for s in gb["steps"]]
print(f"gpu_check: {a['mode']:6} {len(a['tokens'])} tokens, backends {a.get('backend')} on {a['device']} / "
      f"{b.get('backend')} on {b['device']}: {diff} of {cells} routing decisions differ, router logits within "
      f"{worst:.2e}; generation: tokens {'same' if same_tokens else 'DIFFER'}, routing {'same' if same_steps else 'DIFFERS'}")
sys.exit(0 if diff == 0 and worst <= 2e-3 and same_tokens and same_steps else 1)
EOF
done
[ "$status" = 0 ] || fail "the device's traces differ from the CPU's (above)"
say "passed on $device"
