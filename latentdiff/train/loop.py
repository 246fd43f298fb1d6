"""The training loop: flat, top to bottom, over accelerate (DDP / FSDP / DeepSpeed / one CPU).

    setup -> data check -> models -> trainee (what is trained and its loss) -> optimizer -> resume -> prepare ->
    for each micro-batch: trainee.loss -> backward -> (every grad_accum) clip, step, EMA, log, validate, save
    -> export the EMA weights as one .safetensors that latentdiff.load opens.

What is trained is the trainee's business (objective.Trainee): the full U-Net fine-tune (objective.py), the
VAE (vae.py), or an adapter on the frozen model (lora.py, embedding.py); make_trainee picks it from tc.mode and
tc.network, and this file has one path for all of them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from latentdiff.config import ModelConfig

from . import checkpoint, data, dreambooth, webdata
from .config import TrainConfig
from .ema import EMA
from .embedding import EmbeddingTrainer
from .lora import LoRATrainer
from .model import build_model, measure_peak_flops
from .objective import Trainee, UNetTrainer, adamw
from .vae import VAETrainer
from .validate import ema_weights, sync_check, validate

log = logging.getLogger("latentdiff.train")


def lr_at(tc: TrainConfig, step: int, time_frac: float = 0.0) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio at the last step (a factor on each group's base lr);
    with a time budget, at the end of the budget if that comes first (time_frac = spent / budget)."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    progress = max((step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps), time_frac)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cpu_threads(local_processes: int) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise (it counts physical cores, and a 2-vCPU VM
    has one), which halves CPU training speed. Give each local process its share of the usable cores instead;
    LATENTDIFF_NUM_THREADS overrides."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    n = int(os.environ.get("LATENTDIFF_NUM_THREADS", 0)) or max(cores // local_processes, 1)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("CPU threads per process: %d", n)


def make_trainee(tc: TrainConfig, cfg: ModelConfig, modules: dict, acc: Accelerator, dataset: data.ImageDataset,
                 bucket_of: list[int] | None) -> Trainee:
    """The trainee of tc.mode (or of tc.network, an adapter on the frozen model), over the models of build_model."""
    if tc.mode == "vae":
        return VAETrainer(tc, cfg, modules, acc, dataset)
    if tc.network is not None:
        trainer = EmbeddingTrainer if tc.network.type == "embedding" else LoRATrainer
        return trainer(tc, cfg, modules, acc, dataset, bucket_of)
    return UNetTrainer(tc, cfg, modules, acc, dataset, bucket_of)


def plan_data(tc: TrainConfig, acc: Accelerator, records: list, skipped: int, shards: list | None,
              multiple: int) -> tuple[list[tuple[int, int]], list[int] | None]:
    """(buckets, bucket_of): the (H, W) bucket sizes, multiples of `multiple` (the VAE's and the U-Net's
    downsampling together), and each record's bucket (None for shards, bucketed as they stream); raises if a
    process would get no batch."""
    if tc.resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} for this model, got {tc.resolution}")
    buckets = (data.make_buckets(tc.resolution, multiple, tc.bucket_max_ratio) if tc.buckets
               else [(tc.resolution, tc.resolution)])
    if shards is not None:
        if acc.is_main_process:
            log.info("data: %d WebDataset shards, streamed by %d process(es)", len(shards), acc.num_processes)
        return buckets, None
    bucket_of = [data.assign_bucket(r.size, buckets) for r in records]
    per_rank = len(data.epoch_batches(bucket_of, tc.batch_size, tc.seed, 0, acc.process_index, acc.num_processes))
    if per_rank == 0:
        raise data.DataError(f"dataset {tc.data} has {len(records)} images: too few for one batch of "
                             f"{tc.batch_size} per process on {acc.num_processes} process(es) in every bucket")
    if acc.is_main_process:
        log.info("data: %d images (%d unreadable skipped), %d buckets, %d batches per process per epoch",
                 len(records), skipped, len(buckets), per_rank)
    return buckets, bucket_of


def train(tc: TrainConfig) -> dict:
    """Run (or resume) a training run; returns {"losses": [...], "export": path or None, "step": int}."""
    acc = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                      log_with="tensorboard" if tc.tensorboard else None, project_dir=str(tc.run_dir))
    main, device = acc.is_main_process, acc.device
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(levelname)s %(message)s")
    if device.type == "cpu":
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # set by torchrun / accelerate for DDP
    run_dir, ckpt_dir = tc.run_dir, tc.run_dir / "checkpoints"
    if main:
        log.info("training config: %s", tc.to_json())

    # --- resume target and data: every error here comes before any model is built --------------------------
    resume = checkpoint.find_resume(tc.resume, ckpt_dir)
    shards = webdata.shard_list(tc.data)  # WebDataset tar shards are streamed, not listed (webdata.py)
    if shards is not None:
        records, skipped = webdata.first_records(shards, tc, acc.num_processes), 0
    else:
        records, skipped = data.load_records(tc.data, tc.builtin_size, tc.seed)

    # --- models, what trains, optimizer, EMA ------------------------------------------------------------------
    cfg, modules = build_model(tc)
    if tc.class_prompt is not None:  # DreamBooth: the class images follow the instance images
        if shards is not None:
            raise ValueError("class_prompt (prior preservation) needs an image folder or builtin data, not shards")
        records = records + dreambooth.class_records(tc, cfg, modules, acc)
    multiple = cfg.vae.downsample * 2 ** (len(cfg.unet.channel_mult) - 1)
    buckets, bucket_of = plan_data(tc, acc, records, skipped, shards, multiple)
    dataset = data.ImageDataset(records, buckets, tc.seed, tc.random_crop, tc.random_flip)
    trainee = make_trainee(tc, cfg, modules, acc, dataset, bucket_of)
    optimizer = adamw(tc, [{**g, "base_lr": g["lr"]} for g in trainee.param_groups()])
    ema = EMA(trainee.params, tc.ema_decay) if tc.ema_decay else None
    step, epoch, position = 0, 0, 0
    if resume is not None:  # into the unwrapped modules, before prepare
        state = checkpoint.load(resume)
        step, epoch, position = checkpoint.restore(state, tc, trainee, optimizer, ema, acc)
        if main:
            checkpoint.remove_partial(ckpt_dir)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, step, epoch, position)

    # --- FLOPs per sample and the peak they are compared with -------------------------------------------------
    flops_per_sample = trainee.flops_per_sample()
    peak = tc.peak_tflops * 1e12 or measure_peak_flops(device, trainee.weight_dtype)
    if main:
        log.info("model: %s (%s), %.3f GFLOP per training sample, peak %.1f TFLOP/s per device (%s)", cfg.name,
                 cfg.prediction_type, flops_per_sample / 1e9, peak / 1e12,
                 "given" if tc.peak_tflops else "measured matmul")

    # --- accelerate ------------------------------------------------------------------------------------------
    optimizer = trainee.prepare(optimizer)
    if resume is not None and acc.scaler is not None and "scaler" in state:
        acc.scaler.load_state_dict(state["scaler"])
    if tc.tensorboard:
        acc.init_trackers(tc.run_name, config={k: str(v) for k, v in tc.to_dict().items()})
    stream = None if shards is None else webdata.ShardStream(shards, tc.resolution, tc.seed, tc.random_crop,
                                                             tc.random_flip, acc.process_index, acc.num_processes)

    # --- the loop ----------------------------------------------------------------------------------------------
    log_path = run_dir / "log.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(tc.to_dict(), indent=1))
    losses, interval_loss, interval_steps, t0, samples = [], 0.0, 0, time.perf_counter(), 0
    stop = min(tc.steps, tc.stop_at_step or tc.steps)
    bar = tqdm(total=stop, initial=step, disable=not main, desc=tc.run_name, dynamic_ncols=True)
    t_start, time_frac, out_of_time = time.perf_counter(), 0.0, False
    while step < stop:
        if stream is not None:
            loader = webdata.epoch_loader(stream, epoch, tc.batch_size, tc.num_workers, position, acc)
        else:
            plan = data.epoch_batches(bucket_of, tc.batch_size, tc.seed, epoch, acc.process_index, acc.num_processes)
            # its own generator: a loader started from the global RNG would shift it on resume (network dropout)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan[position:], collate_fn=data.collate,
                                                 num_workers=tc.num_workers,
                                                 generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch))
        for batch in loader:
            if tc.time_budget_min:  # rank 0's clock, so every rank uses the same LR and stops at the same step
                spent = torch.tensor([(time.perf_counter() - t_start) / (60 * tc.time_budget_min)], device=device)
                time_frac = broadcast(spent).item()
            factor = lr_at(tc, step, time_frac)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            with acc.accumulate(*trainee.wrapped):
                loss = trainee.loss(batch, step)
                acc.backward(loss)
                if acc.sync_gradients and tc.max_grad_norm:
                    acc.clip_grad_norm_(list(trainee.params.values()), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                trainee.after_step(factor)
            position += 1
            interval_loss += loss.detach().float() / tc.grad_accum
            samples += len(batch["caption"]) * acc.num_processes
            if not acc.sync_gradients:
                continue
            # --- one optimizer step done ---
            step += 1
            interval_steps += 1
            if ema is not None:
                ema.update(trainee.params, step)
            fp = sync_check(acc, trainee.params, ema, step) if tc.check_sync else None
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_avg = acc.gather(interval_loss[None]).mean().item() / interval_steps  # over ranks and steps
                dt = time.perf_counter() - t0
                rate = samples / dt
                rec = {"step": step, "epoch": epoch, "loss": loss_avg, "lr": tc.lr * factor, "samples_per_s": rate,
                       "mfu": rate * flops_per_sample / (peak * acc.num_processes),
                       "skipped_images": skipped if stream is None else stream.skipped}
                if fp is not None:
                    rec["weights_fingerprint"] = fp
                losses.append(loss_avg)
                if main:
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{rec['lr']:.2e}", mfu=f"{rec['mfu']:.1%}")
                    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                                        if k != "weights_fingerprint"))
                acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
                interval_loss, interval_steps, t0, samples = 0.0, 0, time.perf_counter(), 0
            if tc.validate_every and step % tc.validate_every == 0 and main:
                validate(trainee, ema, run_dir, step)
            if time_frac >= 1 and acc.sync_gradients:
                out_of_time, stop = True, step
                log.info("time budget of %.1f min spent at step %d", tc.time_budget_min, step)
            if (tc.save_every and step % tc.save_every == 0) or step == stop:
                state = checkpoint.collect(acc, tc, cfg, trainee, optimizer, ema, step, epoch, position, skipped,
                                           lr_at(tc, step))
                if state is not None:
                    log.info("saved %s", checkpoint.save(ckpt_dir, step, state, tc.keep_last))
            if step >= stop:
                break
        else:
            epoch, position = epoch + 1, 0
            continue
        if stream is None and position == len(plan):
            epoch, position = epoch + 1, 0
    bar.close()

    # --- export: the EMA weights as one single file that latentdiff.load opens --------------------------------
    export = run_dir / trainee.export_name if step == tc.steps or out_of_time else None
    if main and export is not None:
        with ema_weights(ema, trainee.params):
            trainee.export(export, {"training_steps": str(step), "training_run": tc.run_name})
        log.info("exported %s weights to %s", "EMA" if ema is not None else "final", export)
    acc.wait_for_everyone()
    acc.end_training()
    return {"losses": losses, "export": export, "step": step}
