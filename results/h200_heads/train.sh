#!/usr/bin/env bash
# Round 1 on the H200: head-1 variants at equal steps, the long head-1 run, MTP vs MTP-D on stdlib text.
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 NANOMTP_SMOLLM2=/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/../.."
R=/root/runs; mkdir -p $R out
H="--config config/smollm2_heads.json --compile --overwrite"
run() { name=$1; shift; python3 train.py $H --out out/$name --export out/$name.safetensors "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/done; }
run main  --max_steps 4000 --eval_every 400 --save_every 4000 &
sleep 20
run base  --max_steps 1500 --eval_every 500 --save_every 1500 &
run alltok --max_steps 1500 --eval_every 500 --save_every 1500 --config .device/job/alltok.json &
run top1k --max_steps 1500 --eval_every 500 --save_every 1500 --top_n 1000 &
run rev   --max_steps 1500 --eval_every 500 --save_every 1500 --kl_direction reverse &
run h3scratch --max_steps 1500 --eval_every 500 --save_every 1500 --n_mtp_heads 3 &
sleep 90; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv > $R/smi.txt
wait
