"""What a Pipeline loads into itself beside its model: LoRA / LyCORIS files, textual-inversion embeddings, a
standalone VAE, a preview (TAESD) decoder. `Loading` is a base class of Pipeline (pipeline.py), which keeps
generation; the state it works on (cfg, unet, vae, text_encoders, adapters, caches) is the Pipeline's."""
from __future__ import annotations

import logging

import torch
from PIL import Image

from . import speed
from .adapters.embeddings import check, load_dir, read_embedding
from .images import to_pil

log = logging.getLogger("latentdiff")


class Loading:
    def load_lora(self, path, weight: float = 1.0, *, text_encoder_weight: float | None = None,
                  strict: bool = True) -> str:
        """Merge a LoRA / LyCORIS file (kohya, diffusers / PEFT, LoHa, LoKr, full, DoRA; adapters/lora.py) into the
        weights: no cost per step. `weight` scales the U-Net part, `text_encoder_weight` (default: weight) the text
        encoders'. Returns its name (the file stem). A key that matches no module is an error naming the keys and
        the architecture the file was made for; strict=False applies the rest and logs them. Several LoRAs stack;
        loading a name again replaces it."""
        f = self.adapters.lora_file(path)
        self.adapters.stack.add(f, f.path.stem, weight, text_encoder_weight, strict)
        self._weights_changed()
        return f.path.stem

    def unload_lora(self, name: str | None = None) -> None:
        """Undo one LoRA (None: all); the weights come back bit for bit."""
        self.adapters.stack.remove(name)
        self._weights_changed()

    @property
    def loras(self) -> dict[str, tuple[float, float]]:
        """Loaded LoRAs: name -> (text-encoder weight, U-Net weight), in merge order."""
        return self.adapters.stack.weights

    @property
    def embeddings(self) -> dict:
        """Loaded textual-inversion embeddings: token -> Embedding."""
        return self.adapters.embeddings

    def _weights_changed(self) -> None:
        self._prompt_cache.clear()  # the text encoders may have changed
        self._compiled_unet = None  # it holds the weights it was compiled with

    def load_embedding(self, path, token: str | None = None) -> str:
        """A textual-inversion embedding (A1111 `.pt` / `.safetensors`, diffusers `learned_embeds`, SDXL
        `clip_l` + `clip_g`), usable in prompts and negatives as `token` (default: the file stem), also inside
        emphasis `(token:1.2)`. Returns the token. A file of the wrong width raises and changes nothing."""
        emb = read_embedding(path, token)
        check(emb, self.cfg.text)
        self.adapters.embeddings[emb.token] = emb
        self._prompt_cache.clear()
        return emb.token

    def load_embeddings_dir(self, directory) -> list[str]:
        """Every embedding in `directory` that fits this model, by file stem (A1111's embeddings folder; files
        for another model family are skipped with a warning)."""
        found = load_dir(directory, self.cfg.text)
        self.adapters.embeddings.update(found)
        self._prompt_cache.clear()
        return sorted(found)

    def load_vae(self, path) -> None:
        """Replace the VAE's weights with a standalone VAE file: original keys (`encoder.*`, `decoder.*`, ...), the
        same under `first_stage_model.`, a `.ckpt` / `.pt` of either, or a diffusers `vae/` folder or its file
        (weights/vae.py). The scaling factor stays the model's. A bad file raises and leaves the VAE as it was."""
        from .weights.vae import read_vae

        sd = read_vae(path, self.cfg.vae, self.vae, self.dtype, "cpu" if self.offload else self.device)
        speed.unpack_conv_weights(self.vae)
        self.vae.load_state_dict(sd, strict=True, assign=True)
        self.vae.eval().requires_grad_(False)
        log.info("VAE weights from %s", path)

    def load_preview(self, path) -> None:
        """Read a preview decoder: ours, written by `python -m latentdiff.train.preview` (latentdiff.load() does
        this on its own for `<model>.preview.safetensors` next to the model file), or a released TAESD decoder
        (`taesd_decoder.safetensors` for SD 1.x / 2.x, `taesdxl_decoder.safetensors` for SDXL)."""
        from .weights.preview import read_preview
        from .weights import CheckpointError

        model = read_preview(path)
        if model.latent_channels != self.cfg.vae.z_channels:
            raise CheckpointError(f"{path}: preview decoder for {model.latent_channels} latent channels, this "
                                  f"model's VAE has {self.cfg.vae.z_channels}")
        self.preview_decoder = model

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 4, h, w) as the sampler holds them (e.g. in a callback) -> rough PIL images, from the tiny
        preview decoder instead of the VAE (shipped emoji model: see checkpoints/emoji.md for its PSNR and cost)."""
        if self.preview_decoder is None:
            raise RuntimeError(f"{self.source or self.cfg.name} has no preview decoder: train one with "
                               "`python -m latentdiff.train.preview` or take a released TAESD decoder "
                               "(taesd_decoder.safetensors), and call pipe.load_preview(path)")
        with torch.inference_mode():
            where = next(self.preview_decoder.parameters()).device  # the CPU, or the pipeline's device after a decode
            return to_pil(self.preview_decoder(latents.detach().float().to(where)))
