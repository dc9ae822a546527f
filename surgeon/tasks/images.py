"""Images for any diffusers 2D denoiser (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, ...).

Pixel-space by default; latent diffusion when a frozen dense autoencoder (AutoencoderKL / VQModel) is given: the
denoiser works on latents scaled by the autoencoder's scaling factor and samples are decoded for grids and FID.
Noise schedule: the latent-diffusion paper's linear β from 0.0015 to 0.0195 over T = 1000 (seed paper, B.3).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .base import Task, ddpm_scheduler


def _config(model: nn.Module) -> dict:
    return dict(getattr(model, "config", {}) or {})


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
        # unconditional training of conditional architectures: an empty prompt / the null class
        self.cross_attention_dim = cfg.get("cross_attention_dim")
        self.needs_class = bool(cfg.get("num_class_embeds") or cfg.get("num_embeds_ada_norm"))
        self.data, self.limit = data, limit
        self.scheduler = ddpm_scheduler(1000, 0.0015, 0.0195, "linear")
        self._datasets: dict[str, Dataset | None] = {}

    def dataset(self, split: str = "train") -> Dataset | None:
        if split not in self._datasets:
            from ..data import resolve_image_data

            self._datasets[split] = resolve_image_data(self.data, self.image_size, self.image_channels, split=split, limit=self.limit)
        return self._datasets[split]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.vae is None:
            return images
        out = self.vae.encode(images)
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.sample(generator)
        else:  # VQModel returns latents before quantization
            z = out.latents
        return z * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.scaling).sample

    def conditioning(self, batch_size: int, device) -> dict:
        cond = {}
        if self.cross_attention_dim:
            cond["encoder_hidden_states"] = torch.zeros(batch_size, 1, int(self.cross_attention_dim), device=device)
        if self.needs_class:
            cond["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cond

    def noisy_batch(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        x0 = self.encode(batch, generator)  # [B, C, H, W]
        gdev = generator.device if generator is not None else x0.device
        T = self.scheduler.config.num_train_timesteps  # noqa: N806
        t = torch.randint(0, T, (x0.shape[0],), generator=generator, device=gdev).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
        x_t = self.scheduler.add_noise(x0, eps, t)
        return {"x_t": x_t, "t": t, **self.conditioning(x0.shape[0], x0.device)}, eps, None

    def predict(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        extra = {k: v for k, v in inputs.items() if k not in ("x_t", "t")}
        out = model(inputs["x_t"], inputs["t"], **extra)
        return out.sample if hasattr(out, "sample") else out

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """DDIM sampling (η = 0); returns images in [-1, 1], ``[n, C, H, W]``."""
        from diffusers import DDIMScheduler

        device = next(model.parameters()).device
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps or 50)
        x = torch.randn((n, self.latent_channels, self.latent_size, self.latent_size), generator=generator).to(device)
        cond = self.conditioning(n, device)
        was_training = model.training
        model.eval()
        for t in ddim.timesteps:
            eps = self.predict(model, {"x_t": x, "t": t.expand(n).to(device), **cond})
            x = ddim.step(eps, t, x).prev_sample
        model.train(was_training)
        return self.decode(x).clamp(-1, 1)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        return ((samples.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
