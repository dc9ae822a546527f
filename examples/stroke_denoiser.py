"""Bring your own sequence denoiser: any nn.Module with ChiroDiff's forward signature works with surgeon.

    forward(x_t: [B, L, 3] float, t: [B] long, mask: [B, L] bool) -> ε̂: [B, L, 3]

x_t holds noisy (x, y, pen) points, t the diffusion step, mask the real (non-padded) points. surgeon finds the
LSTM's weight_ih/weight_hh (all layers, both directions) and the Linear layers as sparsification targets.

From the command line (the class must build with no arguments):

    surgeon sparsify examples/stroke_denoiser.py:StrokeLSTM --data kanjivg --recipe rigl --s 0.5 --steps 200

or run this file to do the same through the Python API on a few hundred characters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StrokeLSTM(nn.Module):
    def __init__(self, hidden: int = 48, layers: int = 2, time_dim: int = 16):
        super().__init__()
        self.time_dim = time_dim
        self.lstm = nn.LSTM(3 + time_dim, hidden, layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 3)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)[:, None, :].expand(-1, x_t.shape[1], -1)
        hidden, _ = self.lstm(torch.cat([x_t, temb], dim=-1))  # [B, L, 2*hidden]
        return self.head(hidden) * mask[..., None]  # padded points predict nothing


if __name__ == "__main__":
    from surgeon.recipe import load_recipe
    from surgeon.training.run import sparsify

    recipe = load_recipe("rigl").override(
        **{
            "sparsity": 0.5,
            "training.steps": 100,
            "training.batch_size": 32,
            "optimizer.lr": 1e-3,
            "dst.delta_t": 25,
        }
    )
    summary = sparsify(f"{__file__}:StrokeLSTM", recipe, "kanjivg", "runs/example-stroke-lstm", limit=512, force=True)
    print(summary)
