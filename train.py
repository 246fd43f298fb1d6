"""Train or fine-tune a latent diffusion model (or its VAE) with accelerate.

    # one CPU (also how CI runs it; a tiny model on a builtin dataset, under a minute)
    accelerate launch --cpu --num_processes 1 train.py --config configs/train/smoke.yaml
    # one GPU
    accelerate launch --config_file configs/accelerate/1gpu.yaml train.py --config configs/train/sd15-finetune.yaml
    # 8 GPUs on one node (DDP)
    accelerate launch --config_file configs/accelerate/8gpu.yaml train.py --config configs/train/sd15-finetune.yaml
    # 2 nodes x 8 GPUs: run on each node, with machine_rank 0 / 1 and the main node's address
    accelerate launch --config_file configs/accelerate/2nodes.yaml --machine_rank 0 --main_process_ip 10.0.0.1 \\
        train.py --config configs/train/sd15-finetune.yaml

Any option of latentdiff/train/config.py can be overridden: `--lr=5e-5 --steps=2000 --run_name=mine`.
Continue a stopped run exactly with `--resume latest` (or `--resume runs/<name>/checkpoints/ckpt-00001000.pt`).
Everything goes to runs/<run_name>/: log.jsonl, checkpoints/, samples/, final.safetensors (EMA weights, opens
with latentdiff.load); with a `network:` (configs/train/lora-*.yaml) the adapter instead: <run_name>.safetensors
in kohya's LoRA format, or <token>.safetensors, an A1111 embedding.
"""
from latentdiff.train import main

if __name__ == "__main__":
    main()
