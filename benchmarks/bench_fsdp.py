"""FSDP2 against DDP on two CPU processes (gloo): memory per rank, masks replicated or sharded, and step time.

    .venv/bin/python benchmarks/bench_fsdp.py [--repeats 10] [--layers 4] [--write-results]

Relaunches itself with ``accelerate launch --multi_gpu --num_processes 2`` (Accelerate runs the two ranks on CPU
over gloo). The model is the DiT of bench_export.py (hidden 768, 4 blocks, 47M parameters) with a uniform S = 0.5
mask, trained as the loop does: forward, backward, AdamW step, batch 4 per rank.

Memory: bytes of the live tensors on rank 0 after a step, counted from the tensors themselves (a shard counts its
local part): weights, gradients, AdamW moments and the EMA the loop keeps, and the masks, which surgeon replicates
(a bool buffer per masked weight on every rank) against what sharding them with their weights would hold.
Time: one training step of the sharded model / the DDP one, interleaved repeats, medians. On CPU FSDP2 gathers
every weight before its forward and again before its backward, so expect it to be slower; on GPUs that traffic
overlaps compute.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from results import Run, Table, add_arguments, report
from timing import interleaved, medians

HERE = Path(__file__).resolve().parent


def _relaunch(args: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(port), __file__, *args]
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.call(cmd, env=env)


def _bytes(t: torch.Tensor) -> int:
    from surgeon.masking.shards import local

    t = local(t)
    return t.numel() * t.element_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    add_arguments(ap)
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(_relaunch(sys.argv[1:]))
    run = Run.start(device="cpu", argv=[__file__, *sys.argv[1:]])

    from accelerate import Accelerator
    from bench_export import dit
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import surgeon
    from surgeon.masking.surgery import sites
    from surgeon.training.ema import EMA

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    world = acc.num_processes

    def build():
        model = dit(layers=args.layers)
        return surgeon.inject(model, surgeon.plan(model, sparsity=0.5, distribution="uniform"), init="magnitude")

    ddp_model = build()
    ddp = DistributedDataParallel(ddp_model)
    fsdp_model = build()
    mesh = init_device_mesh("cpu", (world,))
    # one FSDP unit per block, but block 0 stays in the root's: DiT's output layer calls its norm1.emb directly,
    # outside the block's forward, where FSDP2 would not have gathered it
    for block in fsdp_model.transformer_blocks[1:]:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)

    gen = torch.Generator().manual_seed(acc.process_index)
    x = torch.randn(4, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    labels = torch.randint(0, 10, (4,), generator=gen)
    runs = {}
    for name, module, owner in (("ddp", ddp, ddp_model), ("fsdp", fsdp_model, fsdp_model)):
        opt = torch.optim.AdamW(owner.parameters(), lr=1e-4)
        ema = EMA(owner, 0.999)

        def step(module=module, opt=opt, ema=ema, owner=owner):
            out = module(x, timestep=t, class_labels=labels).sample
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(owner)

        step()
        state = sum(_bytes(p) for p in owner.parameters()) * 2  # weights, and their gradients during a step
        state += sum(_bytes(v) for s in opt.state.values() for v in s.values() if v.dim())
        state += sum(_bytes(v) for v in ema.shadow.values())
        masked = sum(s.parametrization.mask.numel() for s in sites(owner).values())
        runs[name] = {"step": step, "state": state, "masked": masked}
    times = medians(interleaved({k: v["step"] for k, v in runs.items()}, args.repeats, args.warmup, lambda: None))
    if not acc.is_main_process:
        return
    params = sum(p.numel() for p in ddp_model.parameters())
    f, d = runs["fsdp"], runs["ddp"]
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    memory = Table(
        f"DiT {params / 1e6:.1f}M parameters ({f['masked'] / 1e6:.1f}M masked, S = 0.5), {world} CPU ranks over gloo,"
        " bytes per rank",
        ("what", "MB", "/ sharded state"),
        [
            ("DDP: weights, gradients, AdamW moments, EMA", mb(d["state"]), ""),
            ("DDP: masks (bool, whole)", mb(d["masked"]), ""),
            ("FSDP2: weights, gradients, AdamW moments, EMA (shards)", mb(f["state"]), "1.000"),
            ("FSDP2: masks replicated (what surgeon does)", mb(f["masked"]), f"{f['masked'] / f['state']:.3f}"),
            (
                "FSDP2: masks sharded with their weights (not built)",
                mb(f["masked"] // world),
                f"{f['masked'] / world / f['state']:.3f}",
            ),
        ],
        align="lrr",
    )
    step = Table(
        f"Training step, batch 4 per rank, median of {args.repeats} interleaved",
        ("what", "ratio", "ms"),
        [
            (
                "FSDP2 step / DDP step",
                f"{times['fsdp'] / times['ddp']:.2f}",
                f"{times['fsdp'] * 1e3:.0f} / {times['ddp'] * 1e3:.0f}",
            )
        ],
        align="lrr",
    )
    heading = "FSDP2 against DDP, two CPU ranks (`bench_fsdp.py`)"
    report(run, "bench_fsdp", heading, [memory, step], write=args.write_results, path=args.results_file, threads=1)


if __name__ == "__main__":
    main()
