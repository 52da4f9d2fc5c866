#!/bin/bash
# The chat pair again at 3.5x the steps (1.8M characters): does the MTP-D / MTP difference hold?
set -e
common="--mode scratch --n_layer 4 --n_head 4 --n_kv_head 4 --n_embd 128 --n_mtp_heads 4 --top_n 0
        --batch_size 8 --seq_len 256 --max_steps 900 --warmup 50 --lr 2e-3
        --eval_every 450 --eval_batches 4 --save_every 900 --device cpu --overwrite
        --data data/paperb_chat"
mkdir -p out/paperb
for beta in 0 1; do
    OMP_NUM_THREADS=1 .venv/bin/python train.py $common --out out/paperb/chat_long_beta$beta \
        --beta $beta \
        > out/paperb/chat_long_beta$beta.stdout 2>&1 &
done
wait
