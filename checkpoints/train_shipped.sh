#!/usr/bin/env bash
# The exact recipe of the shipped models (checkpoints/emoji.safetensors, checkpoints/shapes.safetensors):
# for each, a VAE, then the U-Net + text encoder on the frozen VAE; both models train side by side on one GPU.
# Stage lengths are wall-clock budgets (time_budget_min in the configs). Run from the repository root:
#   bash checkpoints/train_shipped.sh [OUTPUT_DIR]
set -u
out=${1:-checkpoints}
export PYTHONUNBUFFERED=1
launch="accelerate launch --config_file configs/accelerate/1gpu.yaml train.py"
train() {
    $launch --config configs/train/$1-vae.yaml &&
    $launch --config configs/train/$1.yaml &&
    python3 -m latentdiff.cli convert runs/$1/final.safetensors "$out/$1.safetensors" --dtype fp16
}
mkdir -p "$out"
train emoji > "$out/emoji-train.log" 2>&1 &
train shapes > "$out/shapes-train.log" 2>&1 &
wait
# Then, on a CPU (commands in the model cards): the emoji VAE decoder was fine-tuned (checkpoints/emoji.md), and
# the shapes U-Net + text encoder trained on (configs/train/shapes-cpu.yaml), then became a v-prediction model
# (configs/train/shapes-v.yaml), then trained on with "left" / "right" split apart (configs/train/shapes-v5.yaml).
# Last, each model's preview decoder (`pipe.preview`), on the final files, on a CPU:
#   python -m latentdiff.train.preview --model emoji --data builtin:emoji --out checkpoints/emoji.preview.safetensors
#   python -m latentdiff.train.preview --model shapes --data builtin:shapes --out checkpoints/shapes.preview.safetensors --steps 1000
