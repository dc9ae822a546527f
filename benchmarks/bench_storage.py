"""Packed storage and mask overhead, measured side by side in one run; prints ratios against their targets.

    .venv/bin/python benchmarks/bench_storage.py [--batch 4] [--repeats 7] [--threads N] [--device cpu] [--tiny]
                                                 [--write-results]

Model: a diffusers UNet2DModel built from a config (16.7M parameters, DDPM-style, 32x32 RGB), masked with the
default ERK plan. Compared, each pair run interleaved (A B A B ...) so that load from other processes hits both
alike, after a warm-up, reporting the median:

- bytes of the packed file (surgeon.save) / bytes of the dense model in plain safetensors, fp32, S = 0.5 and 0.9
- surgeon.save / safetensors save_file of the dense state_dict
- surgeon.load_into / load_file + load_state_dict, both into an already built plain model
- one masked forward+backward / one dense forward+backward on the same input (same weights, dense kernels)

A fixed mask costs one select per masked weight in the backward (the stored weight is already 0 where pruned, so
the forward reads it as it is), whatever the batch, so the
fwd+bwd ratio falls towards 1 as the batch (or the resolution) grows.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from results import Run, Table, add_arguments, report
from safetensors.torch import load_file, save_file
from timing import interleaved, medians

import surgeon

CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
TINY = dict(CONFIG, block_out_channels=(8, 16, 16, 16), norm_num_groups=8)  # checks the script, measures nothing


def build(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**config)


def storage_ratios(dense: torch.nn.Module, tmp: Path) -> list[tuple[str, float, str, str]]:
    save_file(dense.state_dict(), tmp / "dense.safetensors")
    dense_bytes = (tmp / "dense.safetensors").stat().st_size
    rows = []
    for s, target in ((0.5, 0.54), (0.9, 0.14)):
        model = copy.deepcopy(dense)
        surgeon.inject(model, surgeon.plan(model, sparsity=s))
        surgeon.save(model, tmp / f"s{s}", force=True)
        packed = (tmp / f"s{s}" / "model.safetensors").stat().st_size
        rows.append(
            (
                f"file bytes, S={s}",
                packed / dense_bytes,
                f"<= {target}",
                f"{packed / 2**20:.1f} / {dense_bytes / 2**20:.1f} MiB",
            )
        )
    return rows


def io_ratios(dense: torch.nn.Module, tmp: Path, repeats: int) -> list[tuple[str, float, str, str]]:
    masked = copy.deepcopy(dense)
    surgeon.inject(masked, surgeon.plan(masked, sparsity=0.9))
    state = dense.state_dict()
    save_t = medians(
        interleaved(
            {
                "plain": lambda: save_file(state, tmp / "plain.safetensors"),
                "surgeon": lambda: surgeon.save(masked, tmp / "packed", force=True),
            },
            repeats,
            warmup=1,
            sync=lambda: None,
        )
    )

    targets = [copy.deepcopy(dense) for _ in range(2)]  # plain models: load_into refuses one that has masks

    def surgeon_load():
        surgeon.remove(targets[0])
        surgeon.load_into(targets[0], tmp / "packed")

    load_t = medians(
        interleaved(
            {
                "plain": lambda: targets[1].load_state_dict(load_file(tmp / "plain.safetensors")),
                "surgeon": surgeon_load,
            },
            repeats,
            warmup=1,
            sync=lambda: None,
        )
    )
    return [
        (
            "save time, S=0.9",
            save_t["surgeon"] / save_t["plain"],
            "",
            f"{save_t['surgeon'] * 1e3:.0f} / {save_t['plain'] * 1e3:.0f} ms",
        ),
        (
            "load time, S=0.9",
            load_t["surgeon"] / load_t["plain"],
            "",
            f"{load_t['surgeon'] * 1e3:.0f} / {load_t['plain'] * 1e3:.0f} ms",
        ),
    ]


def train_step_ratio(
    dense: torch.nn.Module, batch: int, repeats: int, device: str
) -> list[tuple[str, float, str, str]]:
    masked = copy.deepcopy(dense)
    surgeon.inject(masked, surgeon.plan(masked, sparsity=0.5))
    dense, masked = dense.to(device).train(), masked.to(device).train()
    g = torch.Generator().manual_seed(0)
    size = dense.config.sample_size
    x = torch.randn(batch, dense.config.in_channels, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def step(model):
        def run():
            model(x, t).sample.pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    secs = medians(interleaved({"dense": step(dense), "masked": step(masked)}, repeats, warmup=2, sync=sync))
    return [
        (
            "fwd+bwd time, S=0.5",
            secs["masked"] / secs["dense"],
            "<= 1.05",
            f"{secs['masked'] * 1e3:.0f} / {secs['dense'] * 1e3:.0f} ms, batch {batch}",
        )
    ]


def table(title: str, rows: list[tuple[str, float, str, str]]) -> Table:
    cells = [(name, f"{ratio:.3f}", target, detail) for name, ratio, target, detail in rows]
    return Table(title, ("measured (surgeon / plain)", "ratio", "target", "detail"), cells, align="lrll")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="a small UNet: checks the script, measures nothing real")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        # on a busy machine, OpenMP threads spin-waiting for each other can slow parallel ops by 10x or more
        torch.set_num_threads(args.threads)
    run = Run.start(args.device)

    dense = build(TINY if args.tiny else CONFIG)
    n = sum(p.numel() for p in dense.parameters())
    print(f"UNet2DModel {n / 1e6:.1f}M params; measuring", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = storage_ratios(dense, tmp) + io_ratios(dense, tmp, args.repeats)
    rows += train_step_ratio(dense, args.batch, args.repeats, args.device)
    heading = "Packed storage and mask overhead (`bench_storage.py`)"
    title = (
        f"UNet2DModel{' (tiny config)' if args.tiny else ''}, {n / 1e6:.1f}M parameters, 32x32 RGB, the default ERK "
        f"plan; {args.repeats} interleaved repeats after a warm-up, medians"
    )
    report(run, "bench_storage", heading, [table(title, rows)], args.write_results, args.results_file)


if __name__ == "__main__":
    main()
