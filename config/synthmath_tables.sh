#!/usr/bin/env bash
# The miniature paper tables on synthetic math, one GPU (~15 minutes on an H100): Paper B (plain MTP vs MTP-D,
# looped extension 1 -> 2 -> 4) and Paper A (mask-token conversion, tau sweep, ablations). Run from the project root;
# bench tables go to out/tables/. These are the commands whose output the README reports.
set -u
OUT=${OUT:-out/tables}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
t0=$(date +%s)
python data/prepare.py synthmath --out data/synthmath --seed 0 --overwrite | tail -2
S="--config config/synthmath_scratch.json --overwrite --max_steps 2000 --eval_every 1000"
python train.py $S --n_mtp_heads 4 --beta 1 --out out/sm_mtpd4 | tail -1
python train.py $S --n_mtp_heads 4 --beta 0 --out out/sm_mtp4 | tail -1
python train.py $S --n_mtp_heads 1 --beta 1 --out out/sm_mtpd1 | tail -1
E="--config config/synthmath_scratch.json --overwrite --mode extend --max_steps 600 --eval_every 600 --warmup 50 --lr 0.0005"
python train.py $E --init_from out/sm_mtpd1 --n_mtp_heads 1 --out out/sm_ext2 | tail -1
python train.py $E --init_from out/sm_ext2 --n_mtp_heads 2 --out out/sm_ext4 | tail -1
echo "training took $(( $(date +%s) - t0 )) s"
B="--prompts data/synthmath/test_prompts.jsonl --num_prompts 24 --max_new_tokens 200 --json"
for run in sm_mtpd4 sm_mtp4; do
  python bench.py --init_from out/$run --methods ar,mtp@1,mtp@2,mtp@3,mtp@4 $B > $OUT/bench_$run.txt 2>&1; tail -9 $OUT/bench_$run.txt | head -7
done
python bench.py --init_from out/sm_mtpd1 --methods ar,mtp@1,mtp@2,mtp@4 $B > $OUT/bench_sm_mtpd1.txt 2>&1; tail -8 $OUT/bench_sm_mtpd1.txt | head -6
python bench.py --init_from out/sm_ext2 --methods ar,mtp@2,mtp@4 $B > $OUT/bench_sm_ext2.txt 2>&1; tail -7 $OUT/bench_sm_ext2.txt | head -5
python bench.py --init_from out/sm_ext4 --methods ar,mtp@4 $B > $OUT/bench_sm_ext4.txt 2>&1; tail -6 $OUT/bench_sm_ext4.txt | head -4
cat out/sm_*.log.jsonl | grep '"val"' > $OUT/train_logs.jsonl
echo "all took $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
M="--config config/synthmath_mask.json --overwrite"
python train.py $M | tail -1
for v in "soft:--target soft" "data:--target data" "fixedk:--k_fixed"; do
  python train.py $M --max_steps 400 --eval_every 400 --save_every 400 ${v#*:} --out out/sm_mask_${v%%:*} | tail -1
done
echo "training took $(( $(date +%s) - t0 )) s"
B="--prompts data/synthmath/test_prompts.jsonl --num_prompts 24 --max_new_tokens 200 --json"
python bench.py --init_from out/sm_mask --methods ar,static@2,static@3,static@4,confadapt@0.9,confadapt@0.8,confadapt@0.7,confadapt@0.6,verified@4 $B > $OUT/bench_sm_mask.txt 2>&1; tail -13 $OUT/bench_sm_mask.txt | head -11
for v in soft data fixedk; do
  python bench.py --init_from out/sm_mask_$v --methods ar,static@3,confadapt@0.9 $B > $OUT/bench_sm_mask_$v.txt 2>&1; tail -6 $OUT/bench_sm_mask_$v.txt | head -4
done
cat out/sm_mask*.log.jsonl | grep '"val"' > $OUT/mask_logs.jsonl
echo "all took $(( $(date +%s) - t0 )) s"
