"""The training loop: flat, top to bottom, over accelerate (DDP / FSDP / DeepSpeed / one CPU).

    setup -> data check -> models -> optimizer -> resume -> prepare ->
    for each micro-batch: draw noise -> loss -> backward -> (every grad_accum) clip, step, EMA, log, save
    -> export the EMA weights as one .safetensors that latentdiff.load opens.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from tqdm.auto import tqdm

from latentdiff import weights
from latentdiff.models.text import Tokenizer
from latentdiff.sampling import schedules

from . import checkpoint, data, webdata
from .config import TrainConfig
from .ema import EMA
from . import cache as cache_mod
from .model import (UNetWithText, build_model, enable_gradient_checkpointing, encode_ids, forward_flops,
                    measure_peak_flops, size_cond, tokenize)
from latentdiff.models.unet import sdxl_vector
from .objective import PatchDiscriminator, VAEForward, draw, hinge_d_loss, unet_loss, vae_losses

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
    resume = None
    if tc.resume:
        resume = checkpoint.latest(ckpt_dir) if tc.resume == "latest" else Path(tc.resume)
        if resume is None or not resume.is_file():
            raise FileNotFoundError(f"--resume {tc.resume}: no checkpoint found (looked in {ckpt_dir})")
    shards = webdata.shard_list(tc.data)  # WebDataset tar shards are streamed, not listed (webdata.py)
    if shards is not None:
        records, skipped = webdata.first_records(shards, tc, acc.num_processes), 0
    else:
        records, skipped = data.load_records(tc.data, tc.builtin_size, tc.seed)

    # --- models ---------------------------------------------------------------------------------------------
    cfg, modules = build_model(tc)
    unet, vae, encoders = modules["unet"], modules["vae"], modules["text_encoders"]
    multiple = cfg.vae.downsample * 2 ** (len(cfg.unet.channel_mult) - 1)
    if tc.resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} for this model, got {tc.resolution}")
    buckets = (data.make_buckets(tc.resolution, multiple, tc.bucket_max_ratio) if tc.buckets
               else [(tc.resolution, tc.resolution)])
    if shards is None:
        bucket_of = [data.assign_bucket(r.size, buckets) for r in records]
        per_rank = len(data.epoch_batches(bucket_of, tc.batch_size, tc.seed, 0, acc.process_index, acc.num_processes))
        if per_rank == 0:
            raise data.DataError(f"dataset {tc.data} has {len(records)} images: too few for one batch of "
                                 f"{tc.batch_size} per process on {acc.num_processes} process(es) in every bucket")
        if main:
            log.info("data: %d images (%d unreadable skipped), %d buckets, %d batches per process per epoch",
                     len(records), skipped, len(buckets), per_rank)
    elif main:
        log.info("data: %d WebDataset shards, streamed by %d process(es)", len(shards), acc.num_processes)

    vae_mode = tc.mode == "vae"
    if vae_mode:
        trained = {"vae": vae}
    else:
        trained = {"unet": unet, **({"text_encoders": encoders} if tc.train_text_encoder else {})}
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    for name, m in modules.items():
        m.requires_grad_(name in trained).train(name in trained)
        if not vae_mode or name == "vae":
            m.to(device, torch.float32 if name in trained else weight_dtype)  # frozen parts run in the mixed dtype

    def freeze_encoder() -> None:
        if vae_mode and tc.vae_decoder_only:
            vae.encoder.requires_grad_(False).eval()
            vae.quant_conv.requires_grad_(False)

    freeze_encoder()
    if tc.gradient_checkpointing and not vae_mode:
        enable_gradient_checkpointing(unet)
    named = {f"{k}.{n}": p for k, m in trained.items() for n, p in m.named_parameters() if p.requires_grad}
    groups = [{"params": [p for n, p in named.items() if not n.startswith("text_encoders.")], "lr": tc.lr}]
    if tc.train_text_encoder and not vae_mode:
        groups.append({"params": list(encoders.parameters()), "lr": tc.text_encoder_lr or tc.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    adamw = dict(betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay)
    optimizer = torch.optim.AdamW(groups, **adamw)
    ema = EMA(named, tc.ema_decay) if tc.ema_decay else None
    disc = disc_opt = None
    if vae_mode and tc.vae_disc_weight:
        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.lr, **adamw)
    T = cfg.num_train_timesteps
    alphas_cumprod = schedules.model_alphas_cumprod(cfg)

    # --- resume state (into the unwrapped modules, before prepare) -----------------------------------------
    step, epoch, position = 0, 0, 0
    if resume is not None:
        state = checkpoint.load(resume)
        if state["config"] != tc.to_dict() and main:
            changed = {k: (state["config"].get(k), v) for k, v in tc.to_dict().items()
                       if state["config"].get(k) != v and k != "resume"}
            if changed:
                log.warning("resuming with changed options (checkpoint value, now): %s", changed)
        for k, m in trained.items():
            m.load_state_dict(state["model"][k])
        # load_state_dict also restores each group's hyperparameters; the current config's win (a resume with
        # a new lr or weight decay uses them, as the warning above says)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for g, h in zip(optimizer.param_groups, hyper):
            g.update(h)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
        if main:
            checkpoint.remove_partial(ckpt_dir)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, step, epoch, position)

    # --- FLOPs per sample (forward x3 = forward + backward) and the peak they are compared with ------------
    h = w = tc.resolution // cfg.vae.downsample
    with torch.no_grad():
        if vae_mode:
            x1 = torch.zeros(1, 3, tc.resolution, tc.resolution, device=device)
            flops_per_sample = 3 * forward_flops(lambda: vae.decode(vae.encode(x1).mean))
        else:
            ctx1 = torch.zeros(1, 77, cfg.unet.context_dim, device=device)
            y1 = torch.zeros(1, cfg.unet.adm_in_channels, device=device) if cfg.unet.adm_in_channels else None
            z1 = torch.zeros(1, cfg.unet.in_channels, h, w, device=device)
            flops_per_sample = 3 * forward_flops(lambda: unet(z1, torch.zeros(1, device=device), ctx1, y1))
    peak = tc.peak_tflops * 1e12 or measure_peak_flops(device, weight_dtype)
    if main:
        log.info("model: %s (%s), %.3f GFLOP per training sample, peak %.1f TFLOP/s per device (%s)", cfg.name,
                 cfg.prediction_type, flops_per_sample / 1e9, peak / 1e12,
                 "given" if tc.peak_tflops else "measured matmul")

    # --- accelerate ------------------------------------------------------------------------------------------
    if vae_mode:
        model = VAEForward(vae)
        if tc.compile:
            model = torch.compile(model)
        model, optimizer = acc.prepare(model, optimizer)
        if disc is not None:
            disc, disc_opt = acc.prepare(disc, disc_opt)
        wrapped = [model] + ([disc] if disc is not None else [])
    else:
        model = UNetWithText(unet, encoders) if tc.train_text_encoder else unet
        if tc.compile:
            model = torch.compile(model)
        model, optimizer = acc.prepare(model, optimizer)
        wrapped = [model]
    if resume is not None and acc.scaler is not None and "scaler" in state:
        acc.scaler.load_state_dict(state["scaler"])
    if tc.tensorboard:
        acc.init_trackers(tc.run_name, config={k: str(v) for k, v in tc.to_dict().items()})

    tokenizer = Tokenizer()
    dataset = data.ImageDataset(records, buckets, tc.seed, tc.random_crop, tc.random_flip)
    stream = None if shards is None else webdata.ShardStream(shards, tc.resolution, tc.seed, tc.random_crop,
                                                             tc.random_flip, acc.process_index, acc.num_processes)
    cache = None
    if tc.cache_dir and not vae_mode:
        cache = cache_mod.build(tc, cfg, acc, dataset, bucket_of, vae, encoders, tokenizer, weight_dtype)
        dataset.load_pixels = False
    f = cfg.vae.downsample

    def unet_loss_of(batch) -> torch.Tensor:
        hw = batch["hw"][0]
        latent_shape = (cfg.vae.z_channels, hw[0] // f, hw[1] // f)
        r = {k: v.to(device) for k, v in draw(batch["key"], tc.seed, latent_shape, T, tc.timestep_shift).items()}
        drop = (r["drop"] < tc.caption_dropout).tolist()  # caption dropout: train on the empty prompt
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        with torch.no_grad():
            if cache is not None:
                mean, std = cache.posterior(batch["index"].tolist(), device)
            else:
                posterior = vae.encode(batch["pixels"].to(device, weight_dtype))
                mean, std = posterior.mean.float(), posterior.std.float()
            latents = (mean + std * r["vae_eps"]) * cfg.vae.scaling_factor  # (B, 4, h, w)
        size = size_cond(batch["orig_size"], batch["crop"], hw, device) if cfg.unet.adm_in_channels else None
        if tc.train_text_encoder:
            ids = tokenize(tokenizer, encoders, captions, device)
            predict = lambda x, t: model(x, t, ids, size)  # noqa: E731
        else:
            with torch.no_grad():
                if cache is not None:
                    context, pooled = cache.text(batch["index"].tolist(), drop, device)
                else:
                    context, pooled = encode_ids(encoders, tokenize(tokenizer, encoders, captions, device))
            y = sdxl_vector(pooled.float(), size, cfg.unet.adm_in_channels) if size is not None else None
            predict = (lambda x, t: model(x, t, context, y)) if y is not None else (lambda x, t: model(x, t, context))
        noise = r["noise"] + tc.offset_noise * r["offset"]  # offset noise (Guttenberg 2023)
        with acc.autocast():
            return unet_loss(predict, latents, noise, r["t"], alphas_cumprod, cfg.prediction_type, tc.min_snr_gamma)

    def vae_loss_of(batch) -> torch.Tensor:
        x = batch["pixels"].to(device)  # (B, 3, H, W)
        hw = batch["hw"][0]
        r = draw(batch["key"], tc.seed, (cfg.vae.z_channels, hw[0] // f, hw[1] // f), T)
        with acc.autocast():
            recon, kl = model(x, r["vae_eps"].to(device))
            rec, kl = vae_losses(x, recon, kl, tc.vae_recon)
            loss = rec + tc.vae_kl_weight * kl
            if disc is not None and step >= tc.vae_disc_start:
                raw = acc.unwrap_model(disc).requires_grad_(False)
                loss = loss - tc.vae_disc_weight * raw(recon).float().mean()  # generator's hinge term
                raw.requires_grad_(True)
        acc.backward(loss)
        if disc is not None:
            disc_opt.zero_grad(set_to_none=True)  # the discriminator learns only from its own loss
            with acc.autocast():
                logits = disc(torch.cat([x, recon.detach()])).float()
                d_loss = hinge_d_loss(*logits.chunk(2))
            acc.backward(d_loss)
        return loss

    def sync_check() -> list[float]:
        """A fingerprint of the trained weights and EMA on every rank; raises if any rank differs."""
        params = [p.detach().double() for p in named.values()]
        if ema is not None:
            params += [s.double() for s in ema.shadow.values()]
        fp = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).to(device)
        every = acc.gather(fp[None]).cpu()  # (ranks, 2)
        if not (every == every[0]).all():
            raise RuntimeError(f"ranks hold different weights after step {step}: {every.tolist()}")
        return every[0].tolist()

    def save_checkpoint() -> None:
        rngs = gather_object([checkpoint.rng_state()])  # every rank's RNG states
        full = acc.get_state_dict(wrapped[0])  # every rank takes part (FSDP / ZeRO gather the full weights)
        if not main:
            return
        full = {n.removeprefix("_orig_mod."): v for n, v in full.items()}  # torch.compile's wrapper
        prefixes = ({"vae": "vae."} if vae_mode else {"unet": "unet.", "text_encoders": "text_encoders."}
                    if tc.train_text_encoder else {"unet": ""})
        model_sd = {k: {n[len(p):]: v for n, v in full.items() if n.startswith(p)} for k, p in prefixes.items()}
        state = {"step": step, "epoch": epoch, "position": position, "config": tc.to_dict(),
                 "model_config": cfg.to_json(), "model": model_sd, "optimizer": optimizer.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "rng": rngs, "skipped_images": skipped,
                 "lr_schedule": {"kind": "warmup+cosine", "warmup_steps": tc.warmup_steps, "steps": tc.steps,
                                 "min_lr_ratio": tc.min_lr_ratio, "factor": lr_at(tc, step)}}
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        if disc is not None:
            state["disc"] = acc.unwrap_model(disc).state_dict()
            state["disc_optimizer"] = disc_opt.state_dict()
        path = checkpoint.save(ckpt_dir, step, state, tc.keep_last)
        log.info("saved %s", path)

    def plain_tensor(r) -> torch.Tensor:
        """A record as (3, H, W) in [-1, 1], center-cropped, not flipped (validation and the latent scale)."""
        image = r.source if not isinstance(r.source, str) else data.Image.open(r.source)
        return data.to_tensor(image, buckets[0], False, False, torch.Generator())[0]

    def with_ema_weights(fn):
        """Run fn with the EMA weights in the (unwrapped) trained modules, then put the live weights back."""
        if ema is None:
            return fn()
        live = {n: p.detach().clone() for n, p in named.items()}
        ema.copy_to(named)
        try:
            return fn()
        finally:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(live[n])

    def validate() -> None:
        from latentdiff.images import image_grid
        from latentdiff.pipeline import Pipeline

        def run():
            pipe = Pipeline(cfg, unet, vae, encoders, device=device, dtype=torch.float32, source=tc.run_name)
            images = pipe(list(tc.validation_prompts), steps=tc.validation_steps, seed=0, progress=False,
                          height=tc.resolution, width=tc.resolution)
            out = run_dir / "samples" / f"step-{step:08d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images).save(out)
            return out

        if vae_mode:  # the autoencoder's reconstructions of the first images instead
            x = torch.stack([plain_tensor(r) for r in records[:8]])
            with torch.no_grad():
                recon = with_ema_weights(lambda: vae.decode(vae.encode(x.to(device)).mean)).float().cpu()
            grid = torch.cat([torch.cat(list(x), -1), torch.cat(list(recon), -1)], -2)  # originals over recons
            out = run_dir / "samples" / f"step-{step:08d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            data.Image.fromarray(arr).save(out)
        else:
            out = with_ema_weights(run)
        for name, m in trained.items():  # the Pipeline froze them
            m.requires_grad_(True).train()
        freeze_encoder()
        log.info("validation grid: %s", out)

    @torch.no_grad()
    def latent_scale(n: int = 2048) -> float:
        """1 / std of posterior samples of up to n training images: the rule behind SD's 0.18215, so the
        U-Net sees unit-variance latents."""
        lat = []
        for i in range(0, min(n, len(records)), 64):
            x = torch.stack([plain_tensor(r) for r in records[i:i + 64]])
            lat.append(vae.encode(x.to(device)).sample(torch.Generator(device).manual_seed(i)).float().cpu())
        return 1.0 / torch.cat(lat).std().item()

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
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan[position:], collate_fn=data.collate,
                                                 num_workers=tc.num_workers)
        for batch in loader:
            if tc.time_budget_min:  # rank 0's clock, so every rank uses the same LR and stops at the same step
                spent = torch.tensor([(time.perf_counter() - t_start) / (60 * tc.time_budget_min)], device=device)
                time_frac = broadcast(spent).item()
            factor = lr_at(tc, step, time_frac)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            if disc_opt is not None:
                for g in disc_opt.param_groups:
                    g["lr"] = tc.lr * factor
            with acc.accumulate(*wrapped):
                if vae_mode:
                    loss = vae_loss_of(batch)
                else:
                    loss = unet_loss_of(batch)
                    acc.backward(loss)
                if acc.sync_gradients and tc.max_grad_norm:
                    acc.clip_grad_norm_(list(named.values()), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if disc_opt is not None:
                    disc_opt.step()
                    disc_opt.zero_grad(set_to_none=True)
            position += 1
            interval_loss += loss.detach().float() / tc.grad_accum
            samples += len(batch["caption"]) * acc.num_processes
            if not acc.sync_gradients:
                continue
            # --- one optimizer step done ---
            step += 1
            interval_steps += 1
            if ema is not None:
                ema.update(named, step)
            fp = sync_check() if tc.check_sync else None
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
                validate()
            if time_frac >= 1 and acc.sync_gradients:
                out_of_time, stop = True, step
                log.info("time budget of %.1f min spent at step %d", tc.time_budget_min, step)
            if (tc.save_every and step % tc.save_every == 0) or step == stop:
                save_checkpoint()
            if step >= stop:
                break
        else:
            epoch, position = epoch + 1, 0
            continue
        if stream is None and position == len(plan):
            epoch, position = epoch + 1, 0
    bar.close()

    # --- export: the EMA weights as one single file that latentdiff.load opens --------------------------------
    export = run_dir / "final.safetensors" if step == tc.steps or out_of_time else None
    if main and export is not None and vae_mode and not tc.vae_decoder_only:  # a frozen encoder keeps its scale
        cfg = replace(cfg, vae=replace(cfg.vae, scaling_factor=with_ema_weights(latent_scale)))
        log.info("VAE scaling_factor = %.5f (1 / std of the training latents)", cfg.vae.scaling_factor)
    if main and export is not None:
        with_ema_weights(lambda: weights.save_single_file(
            export, cfg, {"unet": unet, "vae": vae, "text_encoders": encoders},
            extra_metadata={"training_steps": str(step), "training_run": tc.run_name}))
        log.info("exported %s weights to %s", "EMA" if ema is not None else "final", export)
    acc.wait_for_everyone()
    acc.end_training()
    return {"losses": losses, "export": export, "step": step}
