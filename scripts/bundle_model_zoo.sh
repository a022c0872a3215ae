#!/usr/bin/env bash
# Copies trained zoo variants (scripts/train_model_zoo.sh) into resources/models/<variant> with float16 weights,
# checking that float16 moves the held-out loss by less than 0.001 nats at every window length (docs/MODEL.md).
# Usage: scripts/bundle_model_zoo.sh [WORK_DIR]   (default: build/model-zoo)
#   VARIANTS="dense default moe mode-staged mode-integrated" (default: every trained one in WORK_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/model-zoo}
bin=${MODSCOPE_BIN:-build/bin}
variants=${VARIANTS:-dense default moe mode-staged mode-integrated}
corpus=(--corpus "$work/corpus/fortunes.txt" --corpus "$work/corpus/kjv.txt")
for variant in $variants; do
    [ -f "$work/$variant/evaluation.txt" ] || { echo "$variant: not trained and evaluated in $work" >&2; exit 1; }
    out=resources/models/$variant
    rm -rf "$out.part"
    "$bin/modscope-train" --export "$work/$variant" --out "$out.part" --half "${corpus[@]}" \
        --lengths 16,32,64,128,256 --windows 512 | tee "$work/$variant/float16_check.txt"
    rm -rf "$out"
    mv "$out.part" "$out"
    du -sh "$out"
done
