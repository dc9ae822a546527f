"""Input statistics of target layers, accumulated by forward hooks during calibration passes (float64).

Each target weight is pruned as a matrix ``[rows, columns]`` that multiplies one column vector of inputs per output
position. What a column is, per kind of layer:

Linear   ``[out, in]``: the last dimension of the input, one row per token
Conv     ``[out, in, *k]`` viewed as ``[out, *k, in]`` flattened (NHWC, the order N:M groups use): the input patches
         (``F.unfold``), reordered so that the M input channels of one kernel position are adjacent
GRU/LSTM ``weight_ih_l{k}``: the input of layer k in that direction; ``weight_hh_l{k}``: the hidden states that
         layer and direction feed back, h_{τ-1} at step τ (h_0 first), from the same pass. Each layer and
         direction is replayed on its own from the module's current weights, so layer k's input is what the
         layers before it compute.

Padded sequence positions (a ``[B, L]`` mask of real positions) never enter: Linear inputs and RNN steps whose
leading dimensions are the mask's ``[B, L]`` keep only real rows, as do stride-1 Conv1d outputs of length L.
Per-example weights (the ``weighted`` timestep scheme) scale each row's contribution.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from surgeon.errors import SurgeonError
from surgeon.masking.targets import Target

_ROW_CHUNK = 8192  # rows per float64 accumulation, to bound the temporary copies
_RNN_NAME = re.compile(r"^weight_(ih|hh)_l(\d+)(_reverse)?$")


class InputStats:
    """Σ w·x_j² per column (Wanda's ‖X_j‖²) and, when asked, Σ w·x xᵀ (SparseGPT's H = 2XXᵀ / n), in float64."""

    def __init__(self, columns: int, hessian: bool):
        self.sq = torch.zeros(columns, dtype=torch.float64)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float64) if hessian else None
        self.count = 0.0

    def add(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """``rows`` ``[n, columns]``; ``weight`` ``[n]`` or None (all 1)."""
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            x = rows[start : start + _ROW_CHUNK].detach().to("cpu", torch.float64)
            if weight is not None:
                w = weight[start : start + _ROW_CHUNK].detach().to("cpu", torch.float64)
                x = x * w.sqrt()[:, None]
                self.count += float(w.sum())
            else:
                self.count += x.shape[0]
            self.sq += (x * x).sum(0)
            if self.xtx is not None:
                self.xtx.addmm_(x.T, x)

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    def hessian(self) -> torch.Tensor:
        if self.xtx is None:
            raise ValueError("these statistics were collected with hessian=False")
        return self.xtx * (2.0 / max(self.count, 1e-300))


def columns_of(target: Target) -> int:
    """How many input columns the target's weight matrix has."""
    shape = target.shape
    return shape[1] * (int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1)


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight as ``[out, columns]`` in the column order of :func:`conv_columns` (a view-free copy for convs)."""
    return w.movedim(1, -1).reshape(w.shape[0], -1) if w.dim() > 2 else w


def from_matrix(m: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`as_matrix`."""
    shape = tuple(shape)
    if len(shape) > 2:
        return m.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return m.reshape(shape)


def conv_columns(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches of a Conv1d/Conv2d as ``[B, positions, in·Πk]``, columns in ``[*k, in]`` order, so that
    ``conv_columns(m, x) @ as_matrix(m.weight).T`` is the convolution (without bias) at every output position."""
    if module.groups != 1:
        raise SurgeonError(
            f"calibrated pruning of grouped convolutions is not supported (groups={module.groups})",
            "exclude the layer with --exclude, or use --method magnitude",
        )
    one_d = x.dim() == 3
    if x.dim() not in (3, 4):
        raise SurgeonError(
            f"calibrated pruning supports Conv1d and Conv2d, got an input of {x.dim()} dimensions",
            "exclude the layer with --exclude, or use --method magnitude",
        )
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if one_d:
        x, kernel, stride, dilation = x[:, :, None, :], (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, in·kh·kw, P], in slowest
    b, _, p = cols.shape
    cols = cols.view(b, x.shape[1], -1, p).transpose(1, 2)  # [B, kh·kw, in, P]: in fastest, as N:M groups
    return cols.reshape(b, -1, p).transpose(1, 2)  # [B, P, kh·kw·in]


class _Context:
    """What the running calibration batch says about its rows: real positions and per-example weights."""

    padding: torch.Tensor | None = None  # [B, L] bool
    weights: torch.Tensor | None = None  # [B]


def _select(x: torch.Tensor, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` ``[B, ..., C]`` → (rows ``[n, C]``, weights ``[n]`` or None), padded positions dropped."""
    c = x.shape[-1]
    p, w = ctx.padding, ctx.weights
    if p is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(p.shape):
        rows = x[p.to(x.device)].reshape(-1, c)  # [n_real·..., C]
        per = rows.shape[0] // max(int(p.sum()), 1)
        if w is None:
            return rows, None
        ww = w.to(x.device)[:, None].expand(p.shape)[p.to(x.device)]
        return rows, ww.repeat_interleave(per)
    rows = x.reshape(-1, c)
    if w is None or x.dim() < 2 or x.shape[0] != w.shape[0]:
        return rows, None  # no batch dimension to attribute the weights to: every row at weight 1
    return rows, w.to(x.device).repeat_interleave(rows.shape[0] // x.shape[0])


def _conv_rows(module: nn.Module, x: torch.Tensor, ctx: _Context):
    cols = conv_columns(module, x)  # [B, P, columns]
    p = ctx.padding
    if p is not None and x.dim() == 3 and cols.shape[1] != p.shape[1]:
        p = None  # a strided Conv1d: its outputs are not the sequence's positions
    saved, ctx.padding = ctx.padding, p
    try:
        return _select(cols, ctx)
    finally:
        ctx.padding = saved


# --- recurrent layers ------------------------------------------------------------------------------------------


def _rnn_inputs(module: nn.RNNBase, args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | tuple | None]:
    """(batch-first input ``[B, L, F]``, real positions ``[B, L]``, initial state or None) of one RNN call."""
    x, hx = args[0], args[1] if len(args) > 1 else None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=True)
        real = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        return x, real.to(x.device), hx
    if x.dim() == 2:  # unbatched
        x = x[None]
        if hx is not None:
            hx = tuple(h[:, None] for h in hx) if isinstance(hx, tuple) else hx[:, None]
    elif not module.batch_first:
        x = x.transpose(0, 1)
    return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), hx


def _flip_within(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Reverse each row's real positions (padding at the end stays put); an involution."""
    lengths = real.sum(1, keepdim=True)
    pos = torch.arange(x.shape[1], device=x.device)[None, :]
    idx = torch.where(real, lengths - 1 - pos, pos)
    return x.gather(1, idx[..., None].expand_as(x))


def _hidden_out(module: nn.RNNBase) -> int:
    """The size of the hidden state a layer feeds back and passes on (LSTM: its projection, when it has one)."""
    return getattr(module, "proj_size", 0) or module.hidden_size


def _one_layer(module: nn.RNNBase, layer: int, reverse: bool) -> nn.RNNBase:
    """A one-layer, one-direction copy of ``module``'s layer, with its current (effective) weights."""
    kwargs: dict = {"batch_first": True, "bias": module.bias}
    if module.mode == "LSTM":
        base, kwargs["proj_size"] = nn.LSTM, module.proj_size
    elif module.mode == "GRU":
        base = nn.GRU
    else:
        base, kwargs["nonlinearity"] = nn.RNN, module.nonlinearity
    n_in = module.input_size if layer == 0 else _hidden_out(module) * (2 if module.bidirectional else 1)
    copy = base(n_in, module.hidden_size, num_layers=1, **kwargs)
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    with torch.no_grad():
        for name in copy._flat_weights_names:
            getattr(copy, name).copy_(getattr(module, name.replace("_l0", suffix)))
    return copy.to(next(module.parameters()).device)


def _initial_state(module: nn.RNNBase, hx, idx: int, batch: int, device) -> tuple[torch.Tensor, object]:
    """(h_0 ``[1, B, h]`` of layer-direction ``idx``, the state to start the one-layer copy with)."""
    h_all, c_all = hx if isinstance(hx, tuple) else (hx, None)
    h0 = h_all[idx : idx + 1] if h_all is not None else torch.zeros(1, batch, _hidden_out(module), device=device)
    if module.mode != "LSTM":
        return h0, h0
    c0 = c_all[idx : idx + 1] if c_all is not None else torch.zeros(1, batch, module.hidden_size, device=device)
    return h0, (h0, c0)


def rnn_columns(module: nn.RNNBase, args: tuple, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """For each wanted ``weight_(ih|hh)_l{k}[_reverse]`` of ``module``: (name, inputs ``[B, L, columns]`` in
    processing order, real positions ``[B, L]`` in that order), replaying one layer and direction at a time."""
    x, real, hx = _rnn_inputs(module, args)
    dirs = 2 if module.bidirectional else 1
    deepest = max(int(_RNN_NAME.match(n).group(2)) for n in wanted)
    for layer in range(deepest + 1):
        outs = []
        for d in range(dirs):
            reverse = d == 1
            seq = _flip_within(x, real) if reverse else x  # the real points first, in the order this direction reads
            copy = _one_layer(module, layer, reverse)
            h0, state = _initial_state(module, hx, layer * dirs + d, x.shape[0], x.device)
            out, _ = copy(seq.to(copy.weight_ih_l0.dtype), state)  # [B, L, h], processing order
            suffix = f"_l{layer}" + ("_reverse" if reverse else "")
            if f"weight_ih{suffix}" in wanted:
                yield f"weight_ih{suffix}", seq, real
            if f"weight_hh{suffix}" in wanted:
                prev = torch.cat([h0.transpose(0, 1).to(out.dtype), out[:, :-1]], dim=1)  # h_{τ-1} at step τ
                yield f"weight_hh{suffix}", prev, real
            outs.append(_flip_within(out, real) if reverse else out)
        x = torch.cat(outs, dim=-1)


# --- the collector ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a forward hook to end a calibration pass once the block of interest has run."""


@contextmanager
def collecting(targets: Mapping[str, Target], hessian: bool) -> Iterator[tuple[dict[str, InputStats], _Context]]:
    """Forward hooks on the modules of ``targets`` that accumulate :class:`InputStats` per target FQN."""
    stats = {fqn: InputStats(columns_of(t), hessian) for fqn, t in targets.items()}
    ctx = _Context()
    by_module: dict[int, list[Target]] = {}
    for t in targets.values():
        by_module.setdefault(id(t.module), []).append(t)
    handles = []

    def hook_for(group: list[Target]):
        module = group[0].module

        def hook(mod, args, kwargs, output):
            if not args:
                args = tuple(kwargs.values())
            if group[0].kind == "rnn":
                wanted = {t.tensor_name: t for t in group}
                for name, cols, real in rnn_columns(mod, args, set(wanted)):
                    outer = ctx.padding
                    same = outer is not None and tuple(outer.shape) == tuple(real.shape)
                    saved, ctx.padding = outer, outer.to(real.device) & real if same else real
                    try:
                        stats[wanted[name].fqn].add(*_select(cols, ctx))
                    finally:
                        ctx.padding = saved
                return
            x = args[0]
            rows, w = _conv_rows(mod, x, ctx) if group[0].kind == "conv" else _select(x, ctx)
            stats[group[0].fqn].add(rows, w)

        return module.register_forward_hook(hook, with_kwargs=True)

    for group in by_module.values():
        handles.append(hook_for(group))
    try:
        yield stats, ctx
    finally:
        for h in handles:
            h.remove()


@contextmanager
def stop_after(module: nn.Module | None) -> Iterator[None]:
    """End each forward as soon as ``module`` has run (nothing after it is needed for its statistics)."""
    if module is None:
        yield
        return

    def hook(mod, args, output):
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_pass(model: nn.Module, calibration, ctx: _Context | None, stop: nn.Module | None = None) -> None:
    """One calibration pass: every batch through ``calibration.predict``, ended early after ``stop``."""
    with torch.no_grad(), stop_after(stop):
        for inputs, padding, weights in zip(calibration.batches, calibration.padding, calibration.weights):
            if ctx is not None:
                ctx.padding, ctx.weights = padding, weights
            try:
                calibration.predict(model, inputs)
            except _Stop:
                pass


def _fresh(value):
    """A copy of every tensor in a nested call signature, so that a block that writes into its inputs in place
    cannot change the cached ones."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def capture_inputs(model: nn.Module, calibration, block: nn.Module) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of ``block``'s first call in each calibration batch; each pass ends right there."""
    captured: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_pass(model, calibration, None)
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], calibration, ctx: _Context) -> None:
    """Run ``block`` alone on its captured inputs, batch by batch, with each batch's padding and weights."""
    with torch.no_grad():
        for (args, kwargs), padding, weights in zip(inputs, calibration.padding, calibration.weights):
            ctx.padding, ctx.weights = padding, weights
            block(*_fresh(args), **_fresh(kwargs))
