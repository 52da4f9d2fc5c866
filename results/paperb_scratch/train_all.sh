#!/bin/bash
# The six trainings of the from-scratch MTP / MTP-D comparison: two texts x {plain MTP, MTP-D,
# KL only}, all at the same model, batch, steps and seed (equal compute), two at a time on 2 cores.
set -e
common="--mode scratch --n_layer 4 --n_head 4 --n_kv_head 4 --n_embd 128 --n_mtp_heads 4 --top_n 0
        --batch_size 8 --seq_len 256 --max_steps 260 --warmup 20 --lr 2e-3
        --eval_every 130 --eval_batches 4 --save_every 260 --device cpu --overwrite"
train() {  # text name, extra options
    OMP_NUM_THREADS=1 .venv/bin/python train.py $common --data data/paperb_$1 \
        --out out/paperb/$1_$2 "${@:3}" \
        > out/paperb/$1_$2.stdout 2>&1
}
mkdir -p out/paperb
train chat beta0 --beta 0 & train chat beta1 --beta 1 & wait
train stdlib beta0 --beta 0 & train stdlib beta1 --beta 1 & wait
train chat alpha0 --alpha 0 --beta 1 & train stdlib alpha0 --alpha 0 --beta 1 & wait
