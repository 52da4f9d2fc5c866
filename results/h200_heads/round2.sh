#!/usr/bin/env bash
# Round 2: once head 1 (main) is done, its looped extension, then bench on the H200.
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 NANOMTP_SMOLLM2=/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/../.."
R=/root/runs
until grep -q "^main rc" $R/done 2>/dev/null; do sleep 2; done
python3 train.py --config config/smollm2_extend.json --init_from out/main --out out/ext --export out/ext.safetensors \
  --max_steps 1000 --eval_every 250 --save_every 1000 --compile --overwrite > $R/ext.log 2>&1; echo "ext rc=$?" >> $R/done
P="--init_from smollm2 --prompts data/chat_prompts.jsonl --num_prompts 16 --max_new_tokens 128 --json"
python3 bench.py $P --heads out/main.safetensors,out/ext.safetensors \
  --methods ar,mtp@1,mtp@3,mtp@4,tree@3x4,tree@4x4 > $R/bench_new.txt 2>&1
python3 bench.py $P --methods ar,mtp@1,mtp@3,tree@3x4 > $R/bench_old.txt 2>&1
python3 bench.py --init_from smollm2 --prompts data/chat_prompts.jsonl --num_prompts 80 --max_new_tokens 128 --json \
  --dtype float32 --heads out/main.safetensors,out/ext.safetensors --methods ar,mtp@1,mtp@2,mtp@3,mtp@4,tree@3x4,tree@4x4 \
  > $R/bench_fp32_80.txt 2>&1
echo "bench rc=$?" >> $R/done
