#!/bin/sh
# Main-head preservation (Paper B): the same small scratch model trained with no heads, 4 heads
# of plain MTP (--beta 0) and 4 heads of MTP-D (--beta 1), at equal steps on the CPU; then the main
# head's accuracy (ar).
set -e
export OMP_NUM_THREADS=1
[ -d data/synthmath ] || python data/prepare.py synthmath --out data/synthmath --seed 0
SMALL="--n_layer 4 --n_embd 128 --n_head 4 --n_kv_head 4 --batch_size 16 --max_steps 240 --warmup 24
       --eval_every 80 --eval_batches 8 --save_every 240"
python train.py --config config/synthmath_scratch.json $SMALL --n_mtp_heads 0 --out out/main_head/h0
python train.py --config config/synthmath_scratch.json $SMALL --n_mtp_heads 4 --beta 0 \
  --out out/main_head/h4_b0
python train.py --config config/synthmath_scratch.json $SMALL --n_mtp_heads 4 --beta 1 \
  --out out/main_head/h4_b1
for run in h0 h4_b0 h4_b1; do
  cp out/main_head/$run.log.jsonl results/main_head/
done
# the main head alone (ar) on the first 100 synthmath test problems
for run in h0 h4_b0 h4_b1; do
  python bench.py --init_from out/main_head/$run --methods ar \
    --prompts data/synthmath/test_prompts.jsonl --num_prompts 100 --max_new_tokens 96 \
    --device cpu --json | tail -1 > results/main_head/bench_$run.json
done
