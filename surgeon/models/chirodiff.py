"""ChiroDiff's score network (Das et al., ICLR 2023), written from the paper and the seed paper's appendix B.1.

What is diffused: the *absolute* representation, every point as (x, y, pen), with the pen bit treated as a
continuous channel like the coordinates and thresholded only when drawing. ChiroDiff prefers absolute points to
velocities because noise on velocities accumulates into drift once they are integrated back into positions; its
reference configuration (``repr: threeseqabs``) diffuses all three channels.

The velocities are still given to the network, as the paper's "spatial coordinates, their point-wise velocities"
says: they are computed *from the noisy points* inside ``forward`` (first differences of the coordinate channels,
the first point's velocity measured from the origin), so the noised data stays ``[B, L, 3]``.

Per point the backbone sees ``[x_t (D), velocity (coords), time embedding (time_features)]``. The diffusion step
is embedded with random Fourier features: fixed Gaussian frequencies (a seeded buffer), ``t`` scaled to
``(t + 1) / T``. A bidirectional GRU gives every point the whole sequence as context; a linear layer projects
both directions to ``hidden``, and the head maps ``[hidden, time embedding]`` to ε for every point.

Padding never reaches real points: each direction of each layer is its own one-layer ``nn.GRU`` run on the padded
batch, the backward one on every sequence reversed *within its length*, so in both directions the real points come
first and the trailing padding can only influence padding. This is the bidirectional GRU of the paper, computed
exactly. It replaces ``pack_padded_sequence``, whose slow CPU backward made a training step at batch 128 about 3x
slower with 100-point sequences and 1.3x with 30-100 points. Velocities look only backwards; padded outputs are 0.

A diffusers model (``ModelMixin`` + ``ConfigMixin``): ``save_pretrained``/``from_pretrained`` give a diffusers
folder, and surgeon records it by ``_class_name`` like every diffusers model.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from surgeon.errors import SurgeonError
from surgeon.seeding import generator


class BiGRULayer(nn.Module):
    """One bidirectional layer: ``fwd`` reads each sequence left to right, ``bwd`` right to left, both from its ends."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        self.fwd = nn.GRU(n_in, hidden, batch_first=True)
        self.bwd = nn.GRU(n_in, hidden, batch_first=True)

    def forward(self, h: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """h [B, L, n_in] → [B, L, 2·hidden]; flip [B, L, 1] reverses each row's real points (an involution)."""
        out_f, _ = self.fwd(h)
        out_b, _ = self.bwd(h.gather(1, flip.expand_as(h)))
        return torch.cat([out_f, out_b.gather(1, flip.expand_as(out_b))], dim=-1)


class ChiroDiffNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        features: int = 3,
        coords: int = 2,
        hidden: int = 96,
        layers: int = 3,
        time_features: int = 8,
        fourier_scale: float = 4.0,
        num_train_timesteps: int = 1000,
        dropout: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < coords <= features:
            raise SurgeonError(
                f"coords={coords} must be in 1..features={features}", "coords counts leading x, y channels"
            )
        if time_features <= 0 or time_features % 2:
            raise SurgeonError(
                f"time_features={time_features} must be a positive even number", "it holds sin/cos pairs"
            )
        gen = generator(seed)
        # seeded, so from_config alone rebuilds the same embedding; persistent, so a state_dict carries it anyway
        self.register_buffer("fourier_freqs", torch.randn(time_features // 2, generator=gen) * fourier_scale)
        n_in = features + coords + time_features
        self.rnn = nn.ModuleList(BiGRULayer(n_in if i == 0 else 2 * hidden, hidden) for i in range(layers))
        self.out_proj = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden + time_features, features)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, which drops unknown keys with a warning: here they are an error."""
        known = set(inspect.signature(cls.__init__).parameters)
        unknown = sorted(k for k in {**dict(config or {}), **kwargs} if not k.startswith("_") and k not in known)
        if unknown:
            raise SurgeonError(
                f"invalid ChiroDiffNet config (unknown {', '.join(unknown)})", "use a config from ChiroDiffNet.config"
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """[B] long → [B, time_features]."""
        s = (t.float() + 1.0) / self.config["num_train_timesteps"]
        proj = 2 * math.pi * s[:, None] * self.fourier_freqs[None, :]
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def velocities(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] → [B, L, coords]: backward first differences, from the origin for the first point."""
        pos = x[..., : self.config["coords"]]
        return torch.cat([pos[:, :1], pos[:, 1:] - pos[:, :-1]], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x_t.shape  # noqa: N806
        if D != self.config["features"] or t.shape != (B,) or mask.shape != (B, L):
            raise SurgeonError(
                f"ChiroDiffNet got x_t {list(x_t.shape)}, t {list(t.shape)}, mask {list(mask.shape)}",
                f"expected x_t [B, L, {self.config['features']}], t [B], mask [B, L]",
            )
        mask = mask.bool()
        lengths, pos = mask.sum(1, keepdim=True), torch.arange(L, device=mask.device)[None, :]  # [B, 1], [1, L]
        if not torch.equal(mask, pos < lengths):
            raise SurgeonError("mask is not a prefix mask", "pad sequences at the end (collate_sequences does)")
        flip = torch.where(mask, lengths - 1 - pos, pos)[..., None]  # [B, L, 1]; padding stays put
        temb = self.time_embedding(t)[:, None, :].expand(B, L, -1)  # [B, L, time_features]
        hid = torch.cat([x_t, self.velocities(x_t), temb.to(x_t.dtype)], dim=-1)
        for i, layer in enumerate(self.rnn):
            if i:  # between layers, as nn.GRU(dropout=...) does
                hid = F.dropout(hid, self.config["dropout"], self.training)
            hid = layer(hid, flip)  # [B, L, 2*hidden]
        eps = self.head(torch.cat([self.out_proj(hid), temb.to(hid.dtype)], dim=-1))  # [B, L, D]
        return eps * mask[..., None].to(eps.dtype)
