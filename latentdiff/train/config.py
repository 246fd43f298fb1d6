"""TrainConfig: every option of a training run, as one frozen dataclass.

Sources, later ones win: the defaults below, a YAML file (`--config configs/train/x.yaml`, flat keys), then
command-line overrides `--key=value` or `--key value` (values parsed as YAML, so `--lr=1e-4`, `--buckets=true`,
`--validation_prompts='[a cat, a dog]'` work). The resolved config is logged and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class NetworkConfig:
    """An adapter trained on a frozen model (the `network:` mapping of a training config; train/adapters.py).

    lora: kohya's LoRA (sd-scripts networks/lora.py) on the Linear / 1x1 children of the U-Net's transformer
        blocks (and the text encoders' attention / MLP); locon: also the ResBlocks and down / up samplers, their
        3x3 convs with conv_rank / conv_alpha (kohya's conv_dim / conv_alpha); embedding: textual inversion of
        `vectors` new token vectors called `token`, started from the token embeddings of the words `init`."""
    type: str = "lora"  # lora | locon | embedding
    rank: int = 4  # kohya's network_dim
    alpha: float = 1.0  # scale = alpha / rank (kohya's network_alpha)
    conv_rank: int = 0  # locon: rank of the 3x3 convs; 0 = rank
    conv_alpha: float | None = None  # locon: None = alpha
    targets: tuple[str, ...] = ("unet",)  # unet and / or text_encoder
    dropout: float = 0.0  # on the down projection's output while training (kohya's network_dropout)
    token: str = ""  # embedding: the word that stands for it in prompts and captions
    vectors: int = 1  # embedding: token positions it takes
    init: str = "*"  # embedding: words whose token embeddings start the vectors (cycled over the n vectors)


NETWORK_FIELDS = {f.name for f in dataclasses.fields(NetworkConfig)}


@dataclass(frozen=True)
class TrainConfig:
    # --- run ---
    run_name: str = "run"
    output_dir: str = "runs"  # everything goes to <output_dir>/<run_name>/
    seed: int = 0
    mode: str = "unet"  # unet: the diffusion model (and optionally the text encoder) | vae: the autoencoder
    resume: str | None = None  # "latest" or a checkpoint path

    # --- model ---
    model: str = "tiny-sd15"  # preset name or model YAML (configs/models/); ignored when init_from is set
    init_from: str | None = None  # fine-tune: a single file (.safetensors / .ckpt) or a diffusers folder
    vae_from: str | None = None  # take the (frozen) VAE from this single file, e.g. a VAE-mode export
    prediction_type: str | None = None  # epsilon | v_prediction; None = the model's
    train_text_encoder: bool = False

    # --- data ---
    data: str = "builtin:shapes"  # builtin:shapes | builtin:emoji | an image folder | WebDataset shards (.tar)
    builtin_size: int = 256  # images taken from a builtin dataset
    resolution: int = 64  # square side; with buckets, the area of every bucket is about resolution**2
    buckets: bool = False  # aspect-ratio bucketing
    bucket_max_ratio: float = 2.0
    random_crop: bool = False  # else center crop
    random_flip: bool = False
    num_workers: int = 0
    cache_dir: str | None = None  # cache VAE posteriors (and text embeddings unless train_text_encoder) here, reused

    # --- objective (unet mode) ---
    caption_dropout: float = 0.1  # train on the empty prompt this often, so classifier-free guidance works
    min_snr_gamma: float = 0.0  # 0 = off; Hang et al. 2023 use 5
    offset_noise: float = 0.0  # 0 = off; 0.05-0.1 typical (Guttenberg 2023)
    timestep_shift: float = 1.0  # > 1: draw high-noise timesteps more often (t = T s u / (1 + (s - 1) u))
    zero_terminal_snr: bool | None = None  # Lin et al. 2023, needs v_prediction; None = the model's (stored in it)

    # --- adapters (train/adapters.py): a LoRA / LoCon or an embedding on the frozen model ---
    network: NetworkConfig | None = None  # YAML mapping {type: lora, rank: 16, ...}; --network.rank=8 overrides
    save_format: str = "kohya"  # kohya: lora_unet_* keys + ss_* metadata | diffusers: PEFT keys
    save_precision: str = "fp32"  # fp32 | fp16 | bf16: the dtype of the adapter file's tensors
    instance_prompt: str | None = None  # every image is trained with this caption (DreamBooth: "a photo of sks dog")

    # --- objective (vae mode) ---
    vae_recon: str = "l1"  # l1 | l2
    vae_kl_weight: float = 1e-6
    vae_disc_weight: float = 0.0  # 0 = no patch discriminator
    # VAE mode: train only the decoder (+ post_quant_conv); the latents, and any U-Net trained on them, stay
    # valid (how Stability fine-tuned sd-vae-ft-mse). Use with init_from.
    vae_decoder_only: bool = False
    vae_disc_start: int = 0  # optimizer step at which the adversarial loss starts

    # --- optimisation ---
    steps: int = 40  # optimizer steps (the LR schedule spans these)
    stop_at_step: int = 0  # stop early at this step with a checkpoint, e.g. to fit a job time limit; 0 = steps
    # > 0: end the run (checkpoint + export) after this many minutes of training; the cosine LR then follows the
    # spent fraction of the budget whenever it is ahead of the step fraction. Not bitwise reproducible.
    time_budget_min: float = 0.0
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None = lr
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    compile: bool = False
    ema_decay: float = 0.9999  # 0 = no EMA (the export is then the raw weights)

    # --- checkpoints, logging, validation ---
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    log_every: int = 10
    tensorboard: bool = False
    peak_tflops: float = 0.0  # per device, for model FLOP utilisation; 0 = measure a matmul at startup
    validate_every: int = 0  # 0 = off
    validation_prompts: tuple[str, ...] = ("a red circle", "a blue square")
    validation_steps: int = 10
    check_sync: bool = False  # debug: after every optimizer step, assert all ranks hold identical weights

    @property
    def text_trains(self) -> bool:
        """The text encoders' output changes while training (full fine-tune, a LoRA on them, an embedding), so
        text embeddings cannot be cached."""
        n = self.network
        return self.train_text_encoder or (n is not None and (n.type == "embedding" or "text_encoder" in n.targets))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def from_dict(d: dict) -> TrainConfig:
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; allowed: {sorted(FIELDS)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    if isinstance(d.get("network"), dict):
        d["network"] = network_from_dict(d["network"])
    if d.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        d["mixed_precision"] = "no"
    for k, v in d.items():
        # YAML reads "1e-4" as a string (it wants "1.0e-4"); float options take it anyway
        if "float" in str(FIELDS[k].type) and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                d[k] = float(v)
            except ValueError:
                raise ValueError(f"{k} must be a number, got {v!r}") from None
    cfg = TrainConfig(**d)
    check(cfg)
    return cfg


def network_from_dict(d: dict) -> NetworkConfig:
    unknown = set(d) - NETWORK_FIELDS
    if unknown:
        raise ValueError(f"unknown network option(s) {sorted(unknown)}; allowed: {sorted(NETWORK_FIELDS)}")
    d = {k: tuple(v) if isinstance(v, list) else (v,) if k == "targets" and isinstance(v, str) else v
         for k, v in d.items()}
    for k in ("alpha", "conv_alpha", "dropout"):
        if isinstance(d.get(k), (int, str)) and not isinstance(d[k], bool):
            try:
                d[k] = float(d[k])
            except ValueError:
                raise ValueError(f"network.{k} must be a number, got {d[k]!r}") from None
    return NetworkConfig(**d)


def check_network(n: NetworkConfig) -> None:
    if n.type not in ("lora", "locon", "embedding"):
        raise ValueError(f"network.type must be one of ('lora', 'locon', 'embedding'), got {n.type!r} (LoHa / "
                         "LoKr files load, see adapters/lycoris.py, but are not trained here)")
    for name in ("rank", "vectors"):
        if not isinstance(getattr(n, name), int) or getattr(n, name) < 1:
            raise ValueError(f"network.{name} must be an integer >= 1, got {getattr(n, name)!r}")
    if not isinstance(n.conv_rank, int) or n.conv_rank < 0:
        raise ValueError(f"network.conv_rank must be an integer >= 0 (0 = rank), got {n.conv_rank!r}")
    if not n.targets or set(n.targets) - {"unet", "text_encoder"}:
        raise ValueError(f"network.targets must be a non-empty list of unet / text_encoder, got {list(n.targets)}")
    if not 0 <= n.dropout < 1:
        raise ValueError(f"network.dropout must be in [0, 1), got {n.dropout}")
    if n.type == "embedding" and not n.token.strip():
        raise ValueError("network.token must name the embedding (the word used in prompts), e.g. token: mytoken")


def check(c: TrainConfig) -> None:
    """Reject bad values before any work starts; each message names the option and what is allowed."""
    choices = {"mode": ("unet", "vae"), "mixed_precision": ("no", "fp16", "bf16"), "vae_recon": ("l1", "l2"),
               "prediction_type": (None, "epsilon", "v_prediction"), "save_format": ("kohya", "diffusers"),
               "save_precision": ("fp32", "fp16", "bf16")}
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(c, name)!r}")
    for name in ("steps", "batch_size", "grad_accum", "resolution", "keep_last", "log_every", "builtin_size"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(c, name)!r}")
    if not 0 <= c.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1], got {c.caption_dropout}")
    if not c.timestep_shift > 0:
        raise ValueError(f"timestep_shift must be > 0, got {c.timestep_shift}")
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
    if c.network is not None:
        check_network(c.network)
        if c.mode != "unet" or c.train_text_encoder:
            raise ValueError("network trains an adapter on a frozen model: it needs mode unet and "
                             "train_text_encoder false (put text_encoder in network.targets instead)")
    if c.instance_prompt is not None and c.cache_dir and not c.text_trains:
        raise ValueError("instance_prompt replaces the captions the text cache would hold: unset cache_dir")
    if c.cache_dir and (c.random_crop or c.random_flip):
        raise ValueError("cache_dir caches one encoding per image: it needs random_crop=false and random_flip=false")


def load_train_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """YAML file (flat keys) + `--key=value` / `--key value` overrides -> TrainConfig."""
    d = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
    for k, v in parse_overrides(overrides).items():
        if k.startswith("network."):  # one option of the network mapping
            d["network"] = {**(d.get("network") or {}), k.split(".", 1)[1]: v}
        else:
            d[k] = v
    return from_dict(d)


def parse_overrides(args: list[str]) -> dict:
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"expected --key=value, got {a!r}")
        if "=" in a:
            key, value = a[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = a[2:], args[i + 1]
            i += 1
        else:
            key, value = a[2:], "true"  # a bare flag
        key = key.replace("-", "_")
        if key.startswith("network.") and key.split(".", 1)[1] in NETWORK_FIELDS:
            pass
        elif key not in FIELDS:
            raise ValueError(f"unknown training option --{key}; allowed: {sorted(FIELDS)}")
        out[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out
