#!/bin/bash
# Paper B's comparison on a frozen model small enough for the CPU, where greedy decoding itself can
# be measured: a 4-layer character model trained from scratch on the chat answers with no heads, then
# frozen; three sets of 4 heads on it at equal compute (plain MTP, MTP-D, KL only), on the same text,
# whose labels the model predicts only about half the time; greedy mtp@4 on held-out prompts, with
# paired bootstrap intervals. The main model is one and the same for the three, so no difference
# comes from its quality (the from-scratch comparison's confound, results/paperb_scratch/).
#
#   bash results/paperb_frozen/small_cpu.sh      # about 12 minutes on 2 cores
#   MAIN_STEPS=3000 HEAD_STEPS=1500 OUT=out/paperb_small_long RESULTS=results/paperb_frozen/small_long \
#       bash results/paperb_frozen/small_cpu.sh  # about 25 minutes
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/paperb_small}
RESULTS=${RESULTS:-results/paperb_frozen/small}
MAIN_STEPS=${MAIN_STEPS:-900}
HEAD_STEPS=${HEAD_STEPS:-600}
SEED=${SEED:-0}
mkdir -p "$OUT" "$RESULTS"
if [ ! -f data/paperb_chat/train.bin ]; then
    $PY results/paperb_scratch/make_texts.py --chat data/chat --out data/paperb_texts
    $PY data/prepare.py text --file data/paperb_texts/chat.txt --tokenizer chars --val_frac 0.02 \
        --out data/paperb_chat
fi
model="--n_layer 4 --n_head 4 --n_kv_head 4 --n_embd 128 --batch_size 8 --seq_len 256 --lr 2e-3
       --device cpu --overwrite --data data/paperb_chat --seed $SEED"
OMP_NUM_THREADS=2 $PY train.py --mode scratch $model --n_mtp_heads 0 --max_steps $MAIN_STEPS \
    --warmup 50 --eval_every $MAIN_STEPS --eval_batches 4 --save_every $MAIN_STEPS --out "$OUT/main" \
    > "$OUT/main.stdout" 2>&1
heads="--mode heads --init_from $OUT/main --n_mtp_heads 4 --top_n 0 --max_steps $HEAD_STEPS
       --warmup 30 --eval_every $HEAD_STEPS --eval_batches 8 --save_every $HEAD_STEPS"
train() {   # name, loss options
    OMP_NUM_THREADS=1 $PY train.py $model $heads --out "$OUT/$1" "${@:2}" > "$OUT/$1.stdout" 2>&1
}
train beta0 --beta 0 & train beta1 --beta 1 & wait
train alpha0 --alpha 0 --beta 1
cp "$OUT"/*.log.jsonl "$RESULTS/"
OMP_NUM_THREADS=2 $PY results/paperb_scratch/bootstrap.py \
    --prompts data/paperb_texts/chat_prompts.jsonl --method mtp@4 --num_prompts 152 \
    --max_new_tokens 128 --raw \
    --runs beta0=$OUT/beta0,beta1=$OUT/beta1,alpha0=$OUT/alpha0 \
    --out "$RESULTS/chat.json" > "$RESULTS/chat_table.txt"
cat "$RESULTS/chat_table.txt"
# the main model's own greedy text decides what every arm's drafts must match: how often it loops
OMP_NUM_THREADS=2 $PY - "$OUT/main" > "$RESULTS/loops.txt" <<'PY'
import sys
sys.path.insert(0, "results/paperb_scratch")
from loops import greedy_tails, period
tails = greedy_tails(sys.argv[1], "data/paperb_texts/chat_prompts.jsonl", 152)
looping = sum(period(t) > 0 for t in tails)
print(f"{looping} of {len(tails)} greedy outputs end in a loop of period <= 16")
PY
cat "$RESULTS/loops.txt"
