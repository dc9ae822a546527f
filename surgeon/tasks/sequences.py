"""Chirographic sequences (ChiroDiff): variable-length [L, 3] point sequences of (x, y, pen), zero-padded in batches.

Batches and samples share one format, ``{"points": [B, L, 3], "mask": [B, L] bool}``, so samples can be rendered
and compared like data. Noise schedule from the seed paper (appendix B.3): T = 1000, linear β from 1e-4 to 2e-2,
ε-prediction; sampling with DDIM, 50 steps (section 3.3.2), or ancestral DDPM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.utils.data import Dataset

from surgeon.errors import SurgeonError
from surgeon.tasks.base import Task, draw_device

SAMPLERS = ("ddim", "ddpm")
_FALLBACK_LENGTH = 64  # used when neither lengths nor a loaded training set say otherwise


class SequenceTask(Task):
    name = "sequences"

    def __init__(
        self, data: str = "kanjivg", limit: int | None = None, max_points: int | None = None, image_size: int = 64
    ):
        self.data, self.limit, self.max_points, self.image_size = data, limit, max_points, int(image_size)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear", clip_sample=False
        )
        # points span [-1, 1] and pen is 0/1, so clipping can be asked for; ChiroDiff samples without it
        self.clip_sample, self.clip_refused = False, None
        self.lengths: torch.Tensor | None = None  # training lengths, the default length distribution of samples
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str = "train") -> Dataset:
        if split not in self._datasets:
            from surgeon.data import resolve_sequence_data

            self._datasets[split] = resolve_sequence_data(
                self.data, split=split, limit=self.limit, max_points=self.max_points
            )
        return self._datasets[split]

    def collate(self, items: list) -> dict:
        from surgeon.data.kanjivg import collate_sequences

        return collate_sequences(items)

    def noisy_batch(
        self, batch: dict, generator: torch.Generator | None = None, t: torch.Tensor | None = None
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        x0, mask = batch["points"], batch["mask"].bool()  # [B, L, D], [B, L]
        x_t, t, eps = self.add_noise(x0, generator, t)
        return {"x_t": x_t, "t": t, "mask": mask}, eps, mask[..., None]

    def padding(self, inputs: dict) -> torch.Tensor:
        return inputs["mask"]

    def predict(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(inputs["x_t"], inputs["t"], inputs["mask"])

    def _default_lengths(self) -> torch.Tensor | None:
        if self.lengths is None and "train" in self._datasets:
            ds = self._datasets["train"]
            lengths = getattr(ds, "lengths", None)
            if lengths is None:
                lengths = [len(ds[i]) for i in range(len(ds))]
            self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        return self.lengths

    def _sample_lengths(self, n: int, lengths, generator: torch.Generator | None) -> torch.Tensor:
        if lengths is None:
            pool = self._default_lengths()
            if pool is None or len(pool) == 0:
                return torch.full((n,), self.max_points or _FALLBACK_LENGTH, dtype=torch.long)
            gdev = draw_device(generator, torch.device("cpu"))
            return pool[torch.randint(0, len(pool), (n,), generator=generator, device=gdev).cpu()]
        out = torch.as_tensor(lengths, dtype=torch.long).flatten().cpu()
        if out.numel() == 1:
            out = out.expand(n).clone()
        if out.numel() != n or bool((out < 1).any()):
            raise SurgeonError(f"lengths must be one positive length or {n} of them", "e.g. lengths=64 or [30, 50]")
        return out

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        lengths: int | Sequence[int] | torch.Tensor | None = None,
        sampler: str = "ddim",
        eta: float | None = None,
    ) -> dict:
        """Generate ``n`` sequences: ``{"points": [n, Lmax, 3], "mask": [n, Lmax]}``, padding zeroed.

        lengths: one length, ``n`` lengths, or None to draw them from the training lengths (``self.lengths``,
        filled from the training set once it is loaded), else ``max_points`` or 64 points. eta: DDIM's η, by default
        the task's (``self.eta``, a recipe's ``diffusion.eta``).
        """
        if n < 1:
            raise SurgeonError(f"cannot sample n={n} sequences", "ask for at least one")
        if sampler not in SAMPLERS:
            raise SurgeonError(f"unknown sampler {sampler!r}", f"choose one of: {', '.join(SAMPLERS)}")
        T = self.scheduler.config.num_train_timesteps  # noqa: N806
        steps = (50 if sampler == "ddim" else T) if steps is None else steps
        if not 1 <= steps <= T:
            raise SurgeonError(f"steps={steps} out of range", f"use 1..{T}")
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        # trailing spacing: the first step is t = T-1, where x_T ~ N(0, I) really is the marginal
        sched = self.sampling_scheduler(cls, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        param = next(model.parameters())
        lens = self._sample_lengths(n, lengths, generator)
        mask = (torch.arange(int(lens.max()))[None, :] < lens[:, None]).to(param.device)  # [n, Lmax]
        features = getattr(model, "config", {}).get("features", 3)
        shape = (n, mask.shape[1], features)
        x = torch.randn(shape, generator=generator, device=draw_device(generator, param.device))
        x = x.to(param.device, param.dtype)
        # DDPM's posterior mean already follows the clipped x₀; DDIM's direction term must be told to
        eta = self.eta if eta is None else eta
        extra = {"eta": eta, "use_clipped_model_output": self.clip_sample} if sampler == "ddim" else {}
        was_training = model.training
        model.eval()
        try:
            for t in sched.timesteps:
                eps = model(x, torch.full((n,), int(t), dtype=torch.long, device=x.device), mask)
                x = sched.step(eps, t, x, generator=generator, **extra).prev_sample
        finally:
            model.train(was_training)
        return {"points": x * mask[..., None].to(x.dtype), "mask": mask}

    def to_images(self, samples: dict | torch.Tensor) -> torch.Tensor:
        """Render each sequence (pen bit thresholded at 0.5) → uint8 ``[n, H, W, 1]``; a bare tensor is unpadded."""
        from surgeon.data.render import render_sequence

        if isinstance(samples, torch.Tensor):
            samples = {"points": samples, "mask": torch.ones(samples.shape[:2], dtype=torch.bool)}
        images = []
        for seq, m in zip(samples["points"].detach().float().cpu(), samples["mask"].cpu()):
            seq = seq[m.bool()].clone()
            seq[:, -1] = (seq[:, -1] > 0.5).float()
            images.append(torch.as_tensor(render_sequence(seq, self.image_size), dtype=torch.uint8))
        return torch.stack(images)[..., None]
