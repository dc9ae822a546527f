"""Modules that compute with compressed-sparse-row weights on CPU (``torch.sparse.mm``, fp32).

Each takes the place of a dense module and gives its outputs (up to summation order): :class:`CSRLinear` for
``nn.Linear``, :class:`CSRConv1x1` for 1×1 convolutions, :class:`CSRRecurrent` for GRU/LSTM, whose input
projections (one matmul over the whole sequence) use CSR while the recurrence stays dense. The recurrence then
runs step by step in Python instead of torch's fused kernel, so a CSR GRU/LSTM only pays off where the input
projections dominate; the export measures that per layer before choosing it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


@contextmanager
def _quiet():
    """torch warns on every CSR construction that its CSR support is beta; surgeon tests what it relies on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


def to_csr(w: torch.Tensor) -> torch.Tensor:
    """A 2-D dense weight as CSR with int32 indices (half the index bytes of int64; MKL takes both)."""
    with _quiet():
        c = w.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), c.shape)


def from_parts(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A CSR tensor from stored parts, its invariants checked (a damaged file raises, never reads out of bounds)."""
    with _quiet():
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=True)


def csr_parts(w: torch.Tensor) -> dict[str, torch.Tensor]:
    c = to_csr(w.reshape(w.shape[0], -1))
    return {"crow": c.crow_indices(), "col": c.col_indices(), "values": c.values()}


def csr_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for CSR ``w [out, in]`` and any ``x [..., in]``."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.sparse.mm(w, flat.t()).t().reshape(*x.shape[:-1], w.shape[0])


class CSRLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = csr_matmul(self.weight, x)
        return y if self.bias is None else y + self.bias


class CSRConv1x1(CSRLinear):
    """A 1×1 convolution (stride 1, no padding, one group) of any spatial rank, as a CSR matmul over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)  # channels last, then back


def is_plain_1x1(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and all(k == 1 for k in m.kernel_size)
        and all(s == 1 for s in m.stride)
        and all(p == 0 for p in m.padding)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def is_plain_recurrent(m: nn.Module) -> bool:
    """GRU/LSTM without projections: what :class:`CSRRecurrent` reproduces."""
    return isinstance(m, (nn.GRU, nn.LSTM)) and getattr(m, "proj_size", 0) == 0


class CSRRecurrent(nn.Module):
    """GRU or LSTM (any layers, directions, batch_first) with CSR input projections; eval-mode semantics."""

    def __init__(self, rnn: nn.GRU | nn.LSTM, csr: dict[str, torch.Tensor]):
        super().__init__()
        self.mode = "GRU" if isinstance(rnn, nn.GRU) else "LSTM"
        self.num_layers, self.hidden_size = rnn.num_layers, rnn.hidden_size
        self.directions = 2 if rnn.bidirectional else 1
        self.batch_first = rnn.batch_first
        for name, value in rnn.named_parameters():
            if name.startswith("weight_ih_l"):
                self.register_buffer(name, csr[name] if name in csr else to_csr(value))
            else:
                self.register_buffer(name, value.detach())

    def _tensor(self, kind: str, layer: int, direction: int) -> torch.Tensor | None:
        return getattr(self, f"{kind}_l{layer}{'_reverse' if direction else ''}", None)

    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_hh, b_hh):
        gh = F.linear(h, w_hh, b_hh)
        if self.mode == "GRU":
            ir, iz, in_ = gi.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            return (1 - z) * n + z * h, None
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError("CSR recurrent layers take padded tensors, not PackedSequence")
        unbatched = x.dim() == 2  # [L, in], whatever batch_first says
        x = x.unsqueeze(1) if unbatched else x.transpose(0, 1) if self.batch_first else x  # [L, B, in]
        steps, batch = x.shape[0], x.shape[1]
        shape = (self.num_layers * self.directions, batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(shape)
            c0 = x.new_zeros(shape) if self.mode == "LSTM" else None
        else:
            h0, c0 = hx if self.mode == "LSTM" else (hx, None)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                gi = csr_matmul(self._tensor("weight_ih", layer, d), x)  # [L, B, G]: all steps at once
                b_ih = self._tensor("bias_ih", layer, d)
                gi = gi if b_ih is None else gi + b_ih
                w_hh, b_hh = self._tensor("weight_hh", layer, d), self._tensor("bias_hh", layer, d)
                h, c = h0[k], None if c0 is None else c0[k]
                seq = [None] * steps
                for t in range(steps - 1, -1, -1) if d else range(steps):
                    h, c = self._cell(gi[t], h, c, w_hh, b_hh)
                    seq[t] = h
                outs.append(torch.stack(seq))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, -1) if self.directions == 2 else outs[0]
        out = x.squeeze(1) if unbatched else x.transpose(0, 1) if self.batch_first else x
        h_n = torch.stack(h_n)
        state = (h_n, torch.stack(c_n)) if self.mode == "LSTM" else h_n
        if unbatched:
            state = tuple(s.squeeze(1) for s in state) if self.mode == "LSTM" else state.squeeze(1)
        return out, state
