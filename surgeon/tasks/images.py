"""Images for any diffusers 2D denoiser (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, ...).

Pixel-space by default; latent diffusion when a frozen dense autoencoder (AutoencoderKL / VQModel) is given: the
denoiser works on latents scaled by the autoencoder's scaling factor and samples are decoded for grids and FID.
Noise schedule: the latent-diffusion paper's linear β from 0.0015 to 0.0195 over T = 1000 (seed paper, B.3).

Class-conditional models (a class embedding table: ``num_class_embeds`` for UNets, ``num_embeds_ada_norm`` with
``ada_norm_zero`` for DiT) train on the labels of a class-folder image set (``root/<class>/*.png``) and sample
the classes in turn; unconditional models ignore labels. Batches are ``{"images": [B, C, H, W], "labels": [B]}``
("labels" only when the data has classes); a bare image tensor is accepted as an unlabeled batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from surgeon.errors import SurgeonError
from surgeon.tasks.base import Task, ddpm_scheduler

_UNLIMITED = None  # a class embedding that takes any integer label (class_embed_type "timestep")


def _config(model: nn.Module) -> dict:
    return dict(getattr(model, "config", {}) or {})


def class_conditioning(model: nn.Module) -> tuple[bool, int | None, str]:
    """(conditional?, size of the class embedding table or None when any label works, the config key naming it)."""
    cfg = _config(model)
    if cfg.get("norm_type") == "ada_norm_zero" and cfg.get("num_embeds_ada_norm"):  # DiT
        return True, int(cfg["num_embeds_ada_norm"]), "num_embeds_ada_norm"
    kind = cfg.get("class_embed_type")
    if kind is None:
        n = cfg.get("num_class_embeds")
        return (True, int(n), "num_class_embeds") if n else (False, None, "")
    if kind == "timestep":  # labels go through the timestep projection: any integer is a valid input
        return True, _UNLIMITED, "class_embed_type"
    raise SurgeonError(
        f"{type(model).__name__} with class_embed_type={kind!r} is conditioned on vectors, not class labels",
        "train a model with num_class_embeds (a class embedding table) or class_embed_type 'timestep', or none",
    )


class ImageTask(Task):
    name = "images"

    def __init__(self, model: nn.Module, data: str = "kanjivg", vae: nn.Module | None = None, limit: int | None = None):
        cfg = _config(model)
        self.latent_size = int(cfg.get("sample_size") or 32)
        self.latent_channels = int(cfg.get("in_channels") or 3)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        if self.vae is not None:
            vcfg = _config(self.vae)
            self.image_size = self.latent_size * 2 ** (len(vcfg.get("block_out_channels", (1,))) - 1)
            self.image_channels = int(vcfg.get("in_channels", 3))
            self.scaling = float(vcfg.get("scaling_factor", 1.0))
        else:
            self.image_size, self.image_channels, self.scaling = self.latent_size, self.latent_channels, 1.0
        # unconditional training of text-conditional architectures: an empty prompt
        self.cross_attention_dim = cfg.get("cross_attention_dim")
        self.class_conditional, self.class_table, self._class_key = class_conditioning(model)
        self.classes: list[str] | None = None  # class names of the training data, once loaded
        self.data, self.limit = data, limit
        self.scheduler = ddpm_scheduler(1000, 0.0015, 0.0195, "linear")
        # pixel space: x₀ lies in [-1, 1], so sampling clips to it (DDPM/ADM practice); a latent has no fixed range
        self.clip_sample = self.vae is None
        self.clip_refused = (
            None
            if self.vae is None
            else "its x₀ is a latent of the autoencoder, which has no fixed range (decoded images are clamped)"
        )
        self._datasets: dict[str, Dataset | None] = {}

    def dataset(self, split: str = "train") -> Dataset | None:
        if split not in self._datasets:
            from surgeon.data import BUILTIN, resolve_image_data

            if self.class_conditional and self.data == BUILTIN:
                raise SurgeonError(
                    f"the model is class-conditional ({self._class_key}), but KanjiVG glyphs have no classes",
                    "train an unconditional model (e.g. tiny-unet, unet-kanji) or pass --data a folder with one "
                    "subfolder of images per class",
                )
            ds = resolve_image_data(self.data, self.image_size, self.image_channels, split=split, limit=self.limit)
            if split == "train" and ds is not None:
                self._check_classes(getattr(ds, "classes", None))
            self._datasets[split] = ds
        return self._datasets[split]

    def _check_classes(self, classes: list[str] | None) -> None:
        if not self.class_conditional:
            return
        if not classes:
            raise SurgeonError(
                f"the model is class-conditional ({self._class_key}), but {self.data} has no class folders",
                "put the images in one subfolder per class (DATA/<class>/*.png, or DATA/train/<class>/...) "
                "with no image directly in DATA, or train an unconditional model",
            )
        if self.class_table is not None and len(classes) > self.class_table:
            raise SurgeonError(
                f"{self.data} has {len(classes)} classes, but the model's class embedding has only "
                f"{self.class_table} ({self._class_key}={self.class_table})",
                f"use a model with {self._class_key} >= {len(classes)}, or fewer class folders",
            )
        self.classes = list(classes)

    @property
    def num_classes(self) -> int | None:
        """Classes to sample from: the training data's, else the model's table, else None (unconditional)."""
        if not self.class_conditional:
            return None
        if self.classes:
            return len(self.classes)
        return self.class_table or 1

    def collate(self, items: list) -> dict:
        """Images, or (image, label) pairs → ``{"images": [B, C, H, W], "labels": [B] long}``."""
        if isinstance(items[0], (tuple, list)):
            return {
                "images": torch.stack([it[0] for it in items]),
                "labels": torch.as_tensor([int(it[1]) for it in items], dtype=torch.long),
            }
        return {"images": torch.stack(list(items))}

    @staticmethod
    def _vae_on(vae: nn.Module, device) -> nn.Module:
        # the autoencoder is not part of the trained model, so nothing else moves it to the accelerator
        if next(vae.parameters()).device != torch.device(device):
            vae.to(device)
        return vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.vae is None:
            return images
        out = self._vae_on(self.vae, images.device).encode(images)
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.sample(generator)
        else:  # VQModel returns latents before quantization
            z = out.latents
        return z * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self._vae_on(self.vae, latents.device).decode(latents / self.scaling).sample

    def conditioning(self, batch_size: int, device, labels: torch.Tensor | None = None) -> dict:
        cond = {}
        if self.cross_attention_dim:
            cond["encoder_hidden_states"] = torch.zeros(batch_size, 1, int(self.cross_attention_dim), device=device)
        if self.class_conditional:
            if labels is None:
                raise SurgeonError(
                    f"the model is class-conditional ({self._class_key}), but the batch has no labels",
                    "train on a folder with one subfolder of images per class",
                )
            cond["class_labels"] = labels.to(device=device, dtype=torch.long)
        return cond

    def noisy_batch(
        self, batch: dict | torch.Tensor, generator: torch.Generator | None = None, t: torch.Tensor | None = None
    ):
        images, labels = (batch, None) if torch.is_tensor(batch) else (batch["images"], batch.get("labels"))
        x0 = self.encode(images, generator)  # [B, C, H, W]
        x_t, t, eps = self.add_noise(x0, generator, t)
        return {"x_t": x_t, "t": t, **self.conditioning(x0.shape[0], x0.device, labels)}, eps, None

    def predict(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        extra = {k: v for k, v in inputs.items() if k not in ("x_t", "t")}
        out = model(inputs["x_t"], inputs["t"], **extra)
        return out.sample if hasattr(out, "sample") else out

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """A balanced set of classes for ``n`` samples: 0, 1, ..., K-1, 0, 1, ... (None for unconditional models)."""
        k = self.num_classes
        return None if k is None else torch.arange(n) % k

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (η = ``self.eta``, 0 unless the recipe sets it), x₀ clipped to [-1, 1] at every step when
        ``clip_sample`` (pixel space, the default), with ε re-derived from the clipped x₀ as ADM's DDIM does;
        returns images in [-1, 1], ``[n, C, H, W]``. With η > 0 the step noise comes from ``generator`` too, drawn
        as diffusers' ``DDIMPipeline`` draws it.

        Class-conditional models sample ``labels`` (``[n]``), by default every class in turn (``sample_labels``).
        """
        from diffusers import DDIMScheduler

        device = next(model.parameters()).device
        ddim = self.sampling_scheduler(DDIMScheduler)
        ddim.set_timesteps(steps or 50)
        x = torch.randn((n, self.latent_channels, self.latent_size, self.latent_size), generator=generator).to(device)
        if self.class_conditional:
            labels = self.sample_labels(n) if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()
            if labels.numel() != n:
                raise SurgeonError(f"got {labels.numel()} labels for {n} samples", "give one label per sample")
        cond = self.conditioning(n, device, labels)
        was_training = model.training
        model.eval()
        try:
            for t in ddim.timesteps:
                eps = self.predict(model, {"x_t": x, "t": t.expand(n).to(device), **cond})
                step = ddim.step(
                    eps, t, x, eta=self.eta, use_clipped_model_output=self.clip_sample, generator=generator
                )
                x = step.prev_sample
        finally:
            model.train(was_training)
        return self.decode(x).clamp(-1, 1)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        return ((samples.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
