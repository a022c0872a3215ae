#!/usr/bin/env bash
# Trains the bundled model zoo (README "Model zoo"): five variants of one shape, each on the bundled model's
# corpus, tokenizer, window lengths and seed, each spending the same training FLOPs.
# Usage: scripts/train_model_zoo.sh [WORK_DIR]   (default: build/model-zoo)
#   VARIANTS="dense default moe mode-staged mode-integrated" (default: the five bundled) picks the runs; each
#   writes WORK_DIR/<variant>, resumes a stopped run (train_state.pt), and ends with its evaluation.txt.
#   moe-capacity-0.5 (not bundled) is the comparison for integrated MoDE: a MoE whose experts' capacity is
#   lowered until no more tokens reach an expert than integrated MoDE sends to one.
#   BUDGET=F training FLOPs of every run (docs/MODEL.md "FLOPs", 3x forward per token; default 1.395e14).
# Needs a built tree (build/bin/modscope-train) and the Debian packages fortunes and bible-kjv.
# scripts/bundle_model_zoo.sh then copies the trained variants into resources/models/<variant> (float16 weights).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/model-zoo}
bin=${MODSCOPE_BIN:-build/bin}
variants=${VARIANTS:-dense default moe mode-staged mode-integrated}
budget=${BUDGET:-1.395e14}
tokenizer=resources/models/default/tokenizer.model
scripts/make_default_corpus.sh "$work/corpus"
corpus=(--corpus "$work/corpus/fortunes.txt" --corpus "$work/corpus/kjv.txt")
common=("${corpus[@]}" --tokenizer "$tokenizer"
        --vocab 2048 --d-model 192 --layers 6 --heads 3 --d-ff 512 --max-seq-len 2048
        --batch-tokens 4096 --lr 3e-3 --warmup 100 --seed 1234 --eval-every 250 --checkpoint-every 250
        --seq-lens 16,16,32,32,64,128,256 --flops-budget "$budget")
# The mixtures: four experts in the middle routed layer. One layer, not all three routed ones, because each
# mixture layer adds three MLPs (1.8 MB in float16) and the five bundled models must fit in 40 MB.
mixture=(--moe 3 --experts 4 --balance-weight 0.01)

for variant in $variants; do
    case $variant in
        dense) args=(--name modscope-dense --dense) ;;
        # MoD, the paper's recipe: the predictor learns from a stop-gradient input, no router loss on the LM.
        default) args=(--name modscope-default --capacity 0.125 --routed 1,3,5 --router-aux-weight 0) ;;
        moe) args=(--name modscope-moe --dense "${mixture[@]}" --expert-capacity 1.25) ;;
        moe-capacity-0.5) args=(--name modscope-moe-capacity-0.5 --dense "${mixture[@]}" --expert-capacity 0.5) ;;
        # Staged MoDE: MoD's router picks 12.5% of the tokens, and the block's MLP is the mixture.
        mode-staged) args=(--name modscope-mode-staged --capacity 0.125 --routed 1,3,5 --router-aux-weight 0
                           "${mixture[@]}" --expert-capacity 1.25) ;;
        # Integrated MoDE: attention for every token; four no-op choices beside the four experts.
        mode-integrated) args=(--name modscope-mode-integrated --dense "${mixture[@]}" --expert-capacity 1.25 --noop-experts 4) ;;
        *) echo "unknown variant '$variant'" >&2; exit 2 ;;
    esac
    out="$work/$variant"
    resume=()
    [ -f "$out/train_state.pt" ] && resume=(--resume)
    if [ ! -f "$out/evaluation.txt" ]; then
        "$bin/modscope-train" --out "$out" "${common[@]}" "${args[@]}" "${resume[@]}"
        case $variant in default|mode-staged)
            # Causal mode's budget feedback and prefix top-k, chosen on training-split windows (docs/TRAINING.md).
            "$bin/modscope-train" --calibrate-causal "$out" "${corpus[@]}" --lengths 16,32,64,128,256 \
                | tee "$out/causal_rule.txt" ;;
        esac
        # 2,048 windows a length: at 16 tokens that is 32k tokens, a standard error near 0.1 point.
        "$bin/modscope-train" --evaluate "$out" --windows 2048 "${corpus[@]}" > "$out/evaluation.txt.part"
        mv "$out/evaluation.txt.part" "$out/evaluation.txt"
        cat "$out/evaluation.txt"
    fi
done
