#!/usr/bin/env bash
# Trains the bundled default model and its dense baseline (same shape, same training FLOPs).
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default: build/default-model)
# Windows are at most 256 tokens; the context is 2048 (rotary positions need no learned table, so
# max_seq_len changes no weight: the app runs long pastes, beyond what the model trained on).
# Needs a built tree (build/bin/modscope-train) and the Debian packages fortunes and bible-kjv.
# Writes WORK_DIR/mod and WORK_DIR/dense; copy WORK_DIR/mod without train_state.pt into
# resources/models/default to ship it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/default-model}
bin=${MODSCOPE_BIN:-build/bin}
scripts/make_default_corpus.sh "$work/corpus"
common=(--corpus "$work/corpus/fortunes.txt" --corpus "$work/corpus/kjv.txt"
        --vocab 2048 --d-model 192 --layers 6 --heads 3 --d-ff 512 --max-seq-len 2048
        --seq-lens 16,32,64,128,256 --batch-tokens 4096 --lr 3e-3 --warmup 100 --seed 1234
        --eval-every 250 --checkpoint-every 250)

# MoD: capacity 12.5% on layers 1, 3, 5; the router's own BCE loss (weight 0.1) keeps the top-k cut
# stable across sequences, which is what lets a per-token predictor agree with it.
"$bin/modscope-train" --out "$work/mod" --name modscope-default "${common[@]}" \
    --capacity 0.125 --routed 1,3,5 --router-aux-weight 0.1 --steps 2800

# Dense baseline with the tokenizer of the MoD run and the training FLOPs the MoD run spent.
flops=$(tail -n 1 "$work/mod/train_log.jsonl" >/dev/null; grep -o '"train_flops":[0-9.e+]*' "$work/mod/train_log.jsonl" | tail -n 1 | cut -d: -f2)
"$bin/modscope-train" --out "$work/dense" --name modscope-dense-baseline "${common[@]}" \
    --tokenizer "$work/mod/tokenizer.model" --dense --flops-budget "$flops"

for run in mod dense; do
    "$bin/modscope-train" --evaluate "$work/$run" --corpus "$work/corpus/fortunes.txt" \
        --corpus "$work/corpus/kjv.txt" | tee "$work/$run/evaluation.txt"
done
