#!/usr/bin/env bash
# Paper A in miniature on synthetic math, one GPU call of under 10 minutes (issues 14, 23):
#   1. data: synthetic GSM8K-style problems, 512 held-out test problems;
#   2. teacher: a 6-layer, 256-wide Llama trained from scratch (char tokenizer, no MTP heads);
#   3. seven conversions to a mask-token model from that teacher, side by side, 800 steps each: gated LoRA (hard
#      teacher targets, random k in [2, 8], one shared mask; its next-token predictions are the teacher's, so k=1
#      cannot be damaged), full fine-tuning at lr 3e-5 and 1e-4 (Paper A's own recipe: the same weights decode with
#      no gate), and Paper A's four ablations, each one change to the gated run: soft or ground-truth targets,
#      fixed k = k_max, distinct mask tokens;
#   4. benches on the 512 test problems, in priority order, a few at once: ar of the teacher (beside the
#      trainings); for gated ar, static@2/3/4, verified@4 and ConfAdapt at tau 0.5..0.99; the same less static@2/4
#      for the full fine-tune of lower validation loss; ar, static@3, confadapt@0.9/0.95, verified@4 for each
#      ablation and the other full fine-tune; a k_max sweep (4, 8, 16) of the gated model on 128 problems;
#   5. config/papera_table.py: the table beside Paper A's numbers, and the accuracy/tokens-per-forward plot.
# Raw logs and bench JSON go to $RESULTS (default results/papera) as each step ends. Steps still running when
# BUDGET_S (default 540) is spent are stopped, those not started are skipped, both with a printed line, and the
# table is made from what finished. Bench decodes in float32: the tiny model is launch-bound, and in float32
# "exact" compares against plain ar itself (bf16 would need an ar@Q run per query length).
#
#   bash config/papera_synthmath.sh                          # on a GPU machine, from the project root
#   RESULTS=/tmp/papera bash config/papera_synthmath.sh      # results elsewhere
#   BENCH_SLOTS=12 bash config/papera_synthmath.sh           # more benches at once (e.g. under CUDA MPS)
#   bash config/papera_synthmath.sh --cpu                    # a smaller miniature on 2 CPU cores, about an hour
#   bash config/papera_synthmath.sh --smoke                  # the same pipeline, tiny, on the CPU
set -euo pipefail
source "$(dirname "$0")/papera_lib.sh"
case $SCALE in
  gpu)
    BUDGET_S=${BUDGET_S:-540}; SIZES="--n_test 512"; MODEL="--n_layer 6 --n_head 8 --n_kv_head 8 --n_embd 256"
    TEACHER_STEPS=2000; CONVERT_STEPS=800; EVAL=200; BATCH=64; PROMPTS=512; SWEEP_PROMPTS=128; NEW=64 ;;
  cpu)  # the same pipeline on a 2-core machine in about an hour: a smaller teacher, fewer and smaller steps
    BUDGET_S=${BUDGET_S:-6000}; SIZES="--n_test 512"; MODEL="--n_layer 4 --n_head 4 --n_kv_head 4 --n_embd 128"
    TEACHER_STEPS=4000; CONVERT_STEPS=400; EVAL=100; BATCH=16; PROMPTS=512; SWEEP_PROMPTS=128; NEW=64
    BENCH_SLOTS=${BENCH_SLOTS:-2}; SIDE_THREADS=1 ;;
  smoke)
    BUDGET_S=${BUDGET_S:-100000}; SIZES="--n_train 200 --n_val 40 --n_test 8"
    MODEL="--n_layer 2 --n_head 2 --n_kv_head 2 --n_embd 32"
    TEACHER_STEPS=2; CONVERT_STEPS=2; EVAL=2; BATCH=4; PROMPTS=3; SWEEP_PROMPTS=2; NEW=16 ;;
esac
mkdir -p "$RESULTS" "$RUNS"
run prepare "$PY" data/prepare.py synthmath --out "$DATA" --seed 0 $SIZES --overwrite

run train_teacher "$PY" train.py --mode scratch --data "$DATA" --out "$RUNS/teacher" --overwrite --device "$DEV" \
  $MODEL --n_mtp_heads 0 --batch_size "$BATCH" --seq_len 256 --max_steps "$TEACHER_STEPS" --lr 1e-3 --warmup 200 \
  --schedule cosine --eval_every "$TEACHER_STEPS" --save_every "$TEACHER_STEPS"
cp "$RUNS/teacher.log.jsonl" "$RESULTS/"

# processes run side by side below: cap each one's CPU threads so that together they fit the machine (16 cores
# beside the GPU, 2 for --cpu)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SIDE_THREADS:-2}}
CONVERT="--mode mask_tokens --init_from $RUNS/teacher --data $DATA --device $DEV --overwrite --k_max 8 --target hard
  --batch_size $BATCH --seq_len 256 --max_steps $CONVERT_STEPS --warmup 100 --eval_every $EVAL
  --save_every $CONVERT_STEPS"
GATED="--lora_rank 64 --gated --lr 1e-3 --schedule cosine --weight_decay 0"
ABLATIONS=("soft:--target soft" "data:--target data" "fixedk:--k_fixed" "distinct:--distinct_masks")
# a failed step stops its branch only; the script still makes the table of what finished, then exits 1
failed=0
# reap: wait for the next background step to end; returns 1 once none is left
reap() { local rc=0; wait -n || rc=$?; (( rc == 1 )) && failed=1; (( rc != 127 )); }

# the seven conversions and the teacher's bench at once: the small model leaves the GPU mostly idle
convert() {
  run "convert_$1" timeout "$(left)" "$PY" train.py $CONVERT $2 --out "$RUNS/$1" && cp "$RUNS/$1.log.jsonl" "$RESULTS/"
}
bench teacher --init_from "$RUNS/teacher" --methods ar &
convert gated "$GATED" &
for lr in 3e-5 1e-4; do convert "full_lr$lr" "--lr $lr --schedule constant" & done
for a in "${ABLATIONS[@]}"; do convert "ablation_${a%%:*}" "$GATED ${a#*:}" & done
while reap; do :; done
# both full fine-tunes are benched; the one of lower final validation loss (hard CE against the teacher over all k
# positions) gets the whole tau sweep, the other the ablations' methods
FULL=$("$PY" -c '
import json, sys
def val_loss(run):
    lines = [json.loads(l) for l in open(f"{sys.argv[1]}/{run}.log.jsonl") if "\"val\"" in l]
    return lines[-1]["val"]["loss"] if lines else float("inf")
print(min(sys.argv[2:], key=val_loss))' "$RUNS" full_lr3e-5 full_lr1e-4) || FULL=full_lr1e-4
OTHER=$([[ $FULL == full_lr1e-4 ]] && echo full_lr3e-5 || echo full_lr1e-4)
echo "full fine-tune of lower validation loss: $FULL" | tee "$RESULTS/chosen.txt"

# the benches, most wanted first, at most BENCH_SLOTS at once: processes share the GPU by time slices, and a few
# already keep it busy, so more at once gain little and would all be cut half done when the budget runs out; this
# way the budget cuts the end of the list. Lists are short for the same reason. Each process has its own ar (its
# speedups' reference), and its speedups are measured under the load of the others.
SLOTS=${BENCH_SLOTS:-4}
# queue NAME MODEL METHODS [PROMPTS]: bench MODEL as bench_NAME once a slot is free (skipped if MODEL did not train)
queue() {
  if [[ ! -f $RUNS/$2/config.json ]]; then echo "skipped: bench_$1, no model $RUNS/$2"; return; fi
  while (( $(jobs -rp | wc -l) >= SLOTS )); do reap; done
  bench "$1" --init_from "$RUNS/$2" --methods "$3" --num_prompts "${4:-$PROMPTS}" &
}
HI=ar,confadapt@0.9,confadapt@0.95,confadapt@0.99
LO=ar,confadapt@0.5,confadapt@0.6,confadapt@0.7,confadapt@0.8
SHORT=ar,static@3,confadapt@0.9,confadapt@0.95,verified@4
queue gated.1 gated ar,static@2,static@3,static@4,verified@4
queue gated.2 gated "$HI"
queue gated.3 gated "$LO"
queue "$FULL.1" "$FULL" ar,static@3,verified@4
queue "$FULL.2" "$FULL" "$HI"
queue "$FULL.3" "$FULL" "$LO"
for a in "${ABLATIONS[@]}"; do queue "ablation_${a%%:*}" "ablation_${a%%:*}" "$SHORT"; done
queue "$OTHER" "$OTHER" "$SHORT"
queue gated_kmax gated "ar$(for k in 4 8 16; do printf ",confadapt@%s:$k" 0.8 0.9 0.95; done)" "$SWEEP_PROMPTS"
while reap; do :; done

run table "$PY" config/papera_table.py "$RESULTS"
cat "$RESULTS/papera_table.md"
echo "all took $(elapsed) s"
exit $failed
