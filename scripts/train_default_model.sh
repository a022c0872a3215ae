#!/usr/bin/env bash
# Trains the bundled default model and its dense baseline (same shape, same training FLOPs).
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default: build/default-model)
#   STAGES="mod causal dense evaluate" (default: all four) picks the stages to run: train the MoD model,
#   choose its causal-mode rule on training-split windows, train the dense baseline, evaluate both.
#   TOKENIZER=FILE reuses a SentencePiece model; default: the bundled one if present, so that retrained
#   models keep the vocabulary of the shipped ones (set TOKENIZER= to train a new one in the MoD stage).
#   BUDGET=F training FLOPs of the MoD run (docs/MODEL.md "FLOPs", 3x forward per token); the dense
#   baseline then gets exactly what the MoD run spent.
# Windows are at most 256 tokens; the context is 2048 (rotary positions need no learned table, so
# max_seq_len changes no weight: the app runs long pastes, beyond what the model trained on).
# Needs a built tree (build/bin/modscope-train) and the Debian packages fortunes and bible-kjv.
# Writes WORK_DIR/mod and WORK_DIR/dense; copy WORK_DIR/mod without train_state.pt into
# resources/models/default to ship it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/default-model}
bin=${MODSCOPE_BIN:-build/bin}
stages=${STAGES:-mod causal dense evaluate}
budget=${BUDGET:-1.395e14}
default_tokenizer=resources/models/default/tokenizer.model
tokenizer=${TOKENIZER-$( [ -f "$default_tokenizer" ] && echo "$default_tokenizer" )}
scripts/make_default_corpus.sh "$work/corpus"
common=(--corpus "$work/corpus/fortunes.txt" --corpus "$work/corpus/kjv.txt"
        --vocab 2048 --d-model 192 --layers 6 --heads 3 --d-ff 512 --max-seq-len 2048
        --batch-tokens 4096 --lr 3e-3 --warmup 100 --seed 1234 --eval-every 250 --checkpoint-every 250)
# Short windows weigh double: prompts typed into the app are mostly short, and at 16 tokens (k = 2) the
# top-k cut is the hardest for a per-token predictor to follow (docs/TRAINING.md).
seq_lens=16,16,32,32,64,128,256

case " $stages " in *" mod "*)
    # MoD: capacity 12.5% on layers 1, 3, 5; the router's own BCE loss (weight 0.5) makes the top-k cut sit
    # at a stable logit, so that the number of tokens above it varies little between windows.
    "$bin/modscope-train" --out "$work/mod" --name modscope-default "${common[@]}" \
        ${tokenizer:+--tokenizer "$tokenizer"} --seq-lens "$seq_lens" \
        --capacity 0.125 --routed 1,3,5 --router-aux-weight 0.5 --flops-budget "$budget" ;;
esac

case " $stages " in *" causal "*)
    # Causal mode's budget feedback and prefix top-k (docs/MODEL.md), measured on training-split windows of
    # every length the app sees; the chosen rule goes into mod/config.json.
    "$bin/modscope-train" --calibrate-causal "$work/mod" --corpus "$work/corpus/fortunes.txt" \
        --corpus "$work/corpus/kjv.txt" --lengths 16,32,64,128,256 | tee "$work/mod/causal_rule.txt" ;;
esac

case " $stages " in *" dense "*)
    # Dense baseline with the tokenizer of the MoD run and the training FLOPs the MoD run spent.
    flops=$(grep -o '"train_flops":[0-9.e+]*' "$work/mod/train_log.jsonl" | tail -n 1 | cut -d: -f2)
    "$bin/modscope-train" --out "$work/dense" --name modscope-dense-baseline "${common[@]}" \
        --tokenizer "$work/mod/tokenizer.model" --seq-lens "$seq_lens" --dense --flops-budget "$flops" ;;
esac

case " $stages " in *" evaluate "*)
    for run in mod dense; do
        [ -d "$work/$run" ] || continue
        # 2,048 windows a length: at 16 tokens that is 32k tokens, a standard error near 0.1 point.
        "$bin/modscope-train" --evaluate "$work/$run" --windows 2048 --corpus "$work/corpus/fortunes.txt" \
            --corpus "$work/corpus/kjv.txt" | tee "$work/$run/evaluation.txt"
    done ;;
esac
