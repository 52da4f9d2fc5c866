#!/bin/bash
# The frozen-model MTP / MTP-D comparison on one GPU, in one 10-minute call: three sets of 3 MTP
# heads on the frozen bundled SmolLM2-135M-Instruct, trained side by side on the Python stdlib's
# sources (text the model did not write) at equal compute -- plain MTP (--beta 0), MTP-D (--beta 1)
# and KL only (--alpha 0 --beta 1) -- then per-depth acceptance of greedy mtp@3 with bootstrap
# intervals on held-out stdlib prompts (raw text) and on the hand-written chat prompts (templated).
#   RESULTS=out/paperb_frozen_results results/paperb_frozen/run.sh   # GPU, ~8 minutes
#   SMOKE=1 RESULTS=/tmp/paperb_frozen results/paperb_frozen/run.sh  # CPU, a few steps, end to end
# Needs data/paperb_stdlib_smollm2 and data/paperb_frozen_texts/stdlib_prompts.jsonl (README.md).
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-python}
RESULTS=${RESULTS:?set RESULTS to the folder of tables, JSON and logs}
CKPT=${CKPT:-out/paperb_frozen}
LIMIT=${LIMIT:-570}          # seconds for the whole script: the device call stops at 600
if [ "${SMOKE:-0}" = 1 ]; then
    export OMP_NUM_THREADS=1
    STEPS=3; BATCH=2; SEQ=64; WARMUP=1; PROMPTS=3; NEW=8; DEV=cpu; DTYPE=float32
else
    STEPS=${STEPS:-800}; BATCH=16; SEQ=512; WARMUP=100; PROMPTS=100; NEW=128; DEV=cuda
    DTYPE=bfloat16
fi
mkdir -p "$RESULTS/logs" "$CKPT"
# head 1 reads blocks 2, 15 and the last (the shipped heads' fused input); KL over the top 10,000
# logits; one validation at the end
common="--mode heads --init_from smollm2 --data data/paperb_stdlib_smollm2 --n_mtp_heads 3
        --head_taps 2,15 --top_n 10000 --batch_size $BATCH --seq_len $SEQ --max_steps $STEPS
        --warmup $WARMUP --lr 5e-4 --weight_decay 0 --eval_every $STEPS --eval_batches 8
        --save_every $STEPS --device $DEV --dtype $DTYPE --overwrite"
runs="beta0=$CKPT/beta0,beta1=$CKPT/beta1,alpha0=$CKPT/alpha0"
left() { echo $((LIMIT - SECONDS)); }

train() {  # name, loss options
    timeout "$(left)" $PY train.py $common --out "$CKPT/$1" "${@:2}" \
        > "$RESULTS/logs/$1.stdout" 2>&1
    local rc=$?
    cp "$CKPT/$1.log.jsonl" "$RESULTS/logs/" 2>/dev/null
    echo "train $1: exit $rc, $(tail -c 300 "$RESULTS/logs/$1.stdout" | tr '\r' '\n' | tail -1)"
    return $rc
}

evaluate() {  # set name, prompts file, seconds it needs at least, bootstrap.py options
    if [ "$(left)" -lt "$3" ]; then
        echo "eval $1: skipped, $(left) s left, needs $3 s"
        return
    fi
    timeout "$(left)" $PY results/paperb_scratch/bootstrap.py --prompts "$2" --runs "$runs" \
        --method mtp@3 --num_prompts $PROMPTS --max_new_tokens $NEW --device $DEV \
        --dtype $DTYPE --out "$RESULTS/$1.json" "${@:4}" \
        > "$RESULTS/${1}_table.txt" 2> "$RESULTS/logs/eval_$1.stderr"
    echo "eval $1: exit $? at $SECONDS s"
}

# the three trainings at once: one process alone leaves most of the GPU idle
train beta0 --beta 0 & p0=$!
train beta1 --beta 1 & p1=$!
train alpha0 --alpha 0 --beta 1 & p2=$!
ok=1
for p in $p0 $p1 $p2; do wait $p || ok=0; done
echo "training: $SECONDS s"
if [ $ok = 0 ]; then
    echo "a training failed or ran out of time: no evaluation (logs in $RESULTS/logs)"
    exit 1
fi
# both sets at once, each decoding the three runs one after the other
evaluate stdlib data/paperb_frozen_texts/stdlib_prompts.jsonl 60 --raw &
evaluate chat data/chat_prompts.jsonl 60 &
wait
echo "evaluation: $SECONDS s"
cat "$RESULTS"/stdlib_table.txt "$RESULTS"/chat_table.txt 2>/dev/null
