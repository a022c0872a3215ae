#!/usr/bin/env bash
# Remakes the screenshots in resources/screenshots (README.md) from the bundled model, offscreen.
# Usage: scripts/make_screenshots.sh   (needs a built tree: build/bin/modscope)
set -euo pipefail
cd "$(dirname "$0")/.."
app=${MODSCOPE_BIN:-build/bin}/modscope
out=resources/screenshots
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
prompt="And God said, Let there be light: and there was light. A fortune for the day: you will spend your compute where it matters, and let the rest ride the residual stream."
"$app" --prompt "$prompt" --theme light --size 1600x1000 --select 3:12 --screenshot "$out/modscope-light.png"
"$app" --prompt "And God said unto Moses" --theme dark --size 1600x1000 --mode causal --generate 32 \
    --screenshot "$out/modscope-dark-generation.png"
"$app" --prompt "$prompt" --theme light --size 1600x1000 --capacity 0.25 --pin-capacity 0.125 \
    --screenshot "$out/modscope-compare.png"
"$app" --model resources/models/mode-staged --prompt "$prompt" --theme light --size 1600x1000 --select 3:12 \
    --screenshot "$out/modscope-mode-staged.png"
"$app" --prompt "$prompt" --theme light --size 1600x1000 --select 3:12 --decision-values --force 5:all=skip \
    --screenshot "$out/modscope-decision-values.png"
