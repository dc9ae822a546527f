"""One N:M straight-through layer's forward + backward against the same dense layer: where the 2:4 step's cost is.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_nm_layer.py [--repeats 7] [--threads 1] [--lambda-w 0]

Layers: Linear 1280x5120 (SD-1.5's feed-forward down projection) on 64 tokens, and Conv 1280x1280x3x3 on an 8x8
map (the UNet's middle resolution at 256 px), at one thread. Three versions of each, run round-robin: dense,
"before" (the pre-kernel implementation, rebuilt here: S(W) from whole-tensor comparisons, W⊙keep saved for
backward) and "now" (surgeon.inject's NMMask: the rank kernel, S(W) recomputed in backward). Reported: the median
CPU time of this thread per forward + backward (time.thread_time: the machine is shared), its excess over dense,
and the bytes saved for backward beyond dense's (a saved-tensors probe around the forward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

import surgeon
from surgeon.sparsity.patterns import _nm_mask_by_ops


class _Before(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, lambda_w):
        keep = _nm_mask_by_ops(w, 2, 4)
        ctx.save_for_backward(w if lambda_w > 0 else None, keep if lambda_w > 0 else None)
        ctx.lambda_w = lambda_w
        return w * keep

    @staticmethod
    def backward(ctx, grad):
        w, keep = ctx.saved_tensors
        return (grad + ctx.lambda_w * w * ~keep if ctx.lambda_w > 0 else grad), None


class _BeforeMask(nn.Module):
    def __init__(self, lambda_w: float):
        super().__init__()
        self.lambda_w = lambda_w

    def forward(self, w):
        return _Before.apply(w, self.lambda_w)


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "linear 1280x5120": (nn.Linear(5120, 1280), torch.randn(64, 5120, generator=g).requires_grad_()),
        "conv 1280x1280x3x3": (
            nn.Conv2d(1280, 1280, 3, padding=1),
            torch.randn(1, 1280, 8, 8, generator=g).requires_grad_(),
        ),
    }


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lambda-w", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, (dense, x) in layers().items():
        before = type(dense)(*_args(dense))
        now = type(dense)(*_args(dense))
        for m in (before, now):
            m.load_state_dict(dense.state_dict())
        parametrize.register_parametrization(before, "weight", _BeforeMask(args.lambda_w), unsafe=True)
        surgeon.inject(now, surgeon.plan(now, nm="2:4"), lambda_w=args.lambda_w)
        runs = {"dense": dense, "before": before, "now": now}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.repeats + 1):
            for label, module in runs.items() if i % 2 else reversed(runs.items()):
                start = time.thread_time()
                module(x).sum().backward()
                if i:
                    times[label].append(time.thread_time() - start)
                module.zero_grad(set_to_none=True)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        extra = {k: saved_bytes(runs[k], x) - saved_bytes(dense, x) for k in ("before", "now")}
        print(
            f"{name}: dense {ms['dense']:.1f} ms | before {ms['before']:.1f} ms (+{ms['before'] - ms['dense']:.1f}, "
            f"saved +{extra['before'] / 2**20:.1f} MiB) | now {ms['now']:.1f} ms (+{ms['now'] - ms['dense']:.1f}, "
            f"saved +{extra['now'] / 2**20:.1f} MiB)"
        )


def _args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features)
    return (layer.in_channels, layer.out_channels, layer.kernel_size, 1, layer.padding)


if __name__ == "__main__":
    main()
