#!/usr/bin/env bash
# Paper A in miniature on synthetic math, one GPU call of under 10 minutes (issues 14, 23):
#   1. data: synthetic GSM8K-style problems, 512 held-out test problems;
#   2. teacher: a 6-layer, 256-wide Llama trained from scratch (char tokenizer, no MTP heads);
#   3. seven conversions to a mask-token model from that teacher, side by side, 800 steps each: gated LoRA (hard
#      teacher targets, random k in [2, 8], one shared mask; its next-token predictions are the teacher's, so k=1
#      cannot be damaged), full fine-tuning at lr 3e-5 and 1e-4 (Paper A's own recipe: the same weights decode with
#      no gate), and Paper A's four ablations, each one change to the gated run: soft or ground-truth targets,
#      fixed k = k_max, distinct mask tokens;
#   4. benches on the 512 test problems, each model's as soon as its training ends: ar of the teacher; for gated
#      and both full fine-tunes ar, static@3, verified@4, ConfAdapt at tau 0.5..0.99 (gated also static@2/4); for
#      each ablation ar, static@3, confadapt@0.9/0.95, verified@4; a k_max sweep (4, 8, 16) of the gated model on
#      128 problems;
#   5. config/papera_table.py: the table beside Paper A's numbers, and the accuracy/tokens-per-forward plot.
# Raw logs and bench JSON go to $RESULTS (default results/papera) as each step ends. Steps still running when
# BUDGET_S (default 540) is spent are stopped, those not started are skipped, both with a printed line, and the
# table is made from what finished. Bench decodes in float32: the tiny model is launch-bound, and in float32
# "exact" compares against plain ar itself (bf16 would need an ar@Q run per query length).
#
#   bash config/papera_synthmath.sh                          # on a GPU machine, from the project root
#   RESULTS=/tmp/papera bash config/papera_synthmath.sh      # results elsewhere
#   bash config/papera_synthmath.sh --smoke                  # the same pipeline, tiny, on the CPU
set -euo pipefail
source "$(dirname "$0")/papera_lib.sh"
if (( SMOKE )); then
  BUDGET_S=${BUDGET_S:-100000}
  SIZES="--n_train 200 --n_val 40 --n_test 8"
  MODEL="--n_layer 2 --n_head 2 --n_kv_head 2 --n_embd 32"
  TEACHER_STEPS=2; CONVERT_STEPS=2; EVAL=2; BATCH=4; PROMPTS=3; SWEEP_PROMPTS=2; NEW=16
else
  BUDGET_S=${BUDGET_S:-540}
  SIZES="--n_test 512"
  MODEL="--n_layer 6 --n_head 8 --n_kv_head 8 --n_embd 256"
  TEACHER_STEPS=2000; CONVERT_STEPS=800; EVAL=200; BATCH=64; PROMPTS=512; SWEEP_PROMPTS=128; NEW=64
fi
mkdir -p "$RESULTS" "$RUNS"
run prepare "$PY" data/prepare.py synthmath --out "$DATA" --seed 0 $SIZES --overwrite

run train_teacher "$PY" train.py --mode scratch --data "$DATA" --out "$RUNS/teacher" --overwrite --device "$DEV" \
  $MODEL --n_mtp_heads 0 --batch_size "$BATCH" --seq_len 256 --max_steps "$TEACHER_STEPS" --lr 1e-3 --warmup 200 \
  --schedule cosine --eval_every "$TEACHER_STEPS" --save_every "$TEACHER_STEPS"
cp "$RUNS/teacher.log.jsonl" "$RESULTS/"

# up to 22 processes share the machine below: cap each one's CPU threads so that together they fit its 16 cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
CONVERT="--mode mask_tokens --init_from $RUNS/teacher --data $DATA --device $DEV --overwrite --k_max 8 --target hard
  --batch_size $BATCH --seq_len 256 --max_steps $CONVERT_STEPS --warmup 100 --eval_every $EVAL
  --save_every $CONVERT_STEPS"
GATED="--lora_rank 64 --gated --lr 1e-3 --schedule cosine --weight_decay 0"
LO=confadapt@0.5,confadapt@0.6,confadapt@0.7,confadapt@0.8
HI=confadapt@0.9,confadapt@0.95,confadapt@0.99
KMAX=ar$(for k in 4 8 16; do for t in 0.8 0.9 0.95; do printf ",confadapt@%s:%s" "$t" "$k"; done; done)

# convert NAME "TRAIN OPTIONS" "METHODS [PROMPTS]"...: train NAME from the teacher, then bench it, one process per
# methods list, side by side (each with its own ar, the reference of its speedups), as bench_NAME.1.json, ...
convert() {
  local name=$1 options=$2 part=0 methods n pids=(); shift 2
  run "convert_$name" timeout "$(left)" "$PY" train.py $CONVERT $options --out "$RUNS/$name" || return 1
  cp "$RUNS/$name.log.jsonl" "$RESULTS/"
  for spec in "$@"; do
    read -r methods n <<< "$spec"
    part=$((part + 1))
    bench "$name.$part" --init_from "$RUNS/$name" --methods "$methods" --num_prompts "${n:-$PROMPTS}" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || return 1; done
}

# everything from here runs at once: the small model leaves the GPU mostly idle, so accuracy and tokens per forward
# are as measured alone, but speedups are measured under this shared load (the table says so)
pids=()
bench teacher --init_from "$RUNS/teacher" --methods ar & pids+=($!)
convert gated "$GATED" ar,static@2,static@3,static@4 ar,verified@4 "ar,$LO" "ar,$HI" "$KMAX $SWEEP_PROMPTS" &
pids+=($!)
for lr in 3e-5 1e-4; do
  convert "full_lr$lr" "--lr $lr --schedule constant" ar,static@3,verified@4 "ar,$LO" "ar,$HI" & pids+=($!)
done
for ablation in "soft:--target soft" "data:--target data" "fixedk:--k_fixed" "distinct:--distinct_masks"; do
  convert "ablation_${ablation%%:*}" "$GATED ${ablation#*:}" ar,static@3,confadapt@0.9,confadapt@0.95,verified@4 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done

run table "$PY" config/papera_table.py "$RESULTS"
cat "$RESULTS/papera_table.md"
echo "all took $(elapsed) s"
exit $failed
