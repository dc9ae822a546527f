"""Pruning time and peak memory of ``surgeon prune`` per method, pattern and thread count.

Models: ``dit`` (DiTTransformer2DModel, hidden 768 = 12 heads x 64, 4 blocks, 16x16x4 latents, patch 2: 64
tokens, class-conditional; 39 target weights) and ``unet-kanji`` (the demo's UNet, 32x32 glyphs). Calibration:
``--calib`` random inputs of the model's own shapes and conditioning, uniform timesteps (the time does not depend on
the values). Each (model, method, pattern, threads) runs in its own process, sequential mode, so its peak resident
memory (``ru_maxrss``) is its own; ``base`` is a process that builds the model and the calibration and prunes
nothing, so ``peak - base`` is what pruning adds. Times are wall-clock seconds of ``prune_model`` alone, and the
ratio column divides each by magnitude's time in the same model, pattern and thread count.

    OMP_NUM_THREADS=1 python benchmarks/bench_prune.py            # every combination (minutes on 2 cores)
    python benchmarks/bench_prune.py --models dit --threads 1 --calib 16 [--write-results]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from results import Run, Table, add_arguments, report

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("2:4", "0.5")


def build(name: str) -> torch.nn.Module:
    if name == "dit":
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(
            num_attention_heads=12,
            attention_head_dim=64,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            sample_size=16,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_type="ada_norm_zero",
        )
    from surgeon.models import presets

    return presets.build(name)


def calibration(model: torch.nn.Module, n: int, batch: int):
    from surgeon.algorithms.calibration import Calibration
    from surgeon.tasks.images import ImageTask

    task = ImageTask(model, data="")
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.randn(b, task.latent_channels, task.latent_size, task.latent_size, generator=g)
        labels = torch.zeros(b, dtype=torch.long) if task.class_conditional else None
        t = torch.randint(0, 1000, (b,), generator=g)
        batches.append({"x_t": x, "t": t, **task.conditioning(b, "cpu", labels)})
    return Calibration(batches, task.predict, info={"examples": n})


def child(model_name: str, method: str, pattern: str, threads: int, n: int, batch: int) -> dict:
    torch.set_num_threads(threads)
    from surgeon.algorithms.oneshot import prune_model
    from surgeon.masking.plan import plan
    from surgeon.training.prune import make_pruner

    model = build(model_name).eval()
    calib = calibration(model, n, batch)
    seconds = None
    if method != "base":
        p = plan(model, nm=pattern) if ":" in pattern else plan(model, sparsity=float(pattern), distribution="uniform")
        start = time.perf_counter()
        prune_model(model, p, make_pruner(method), calib if method != "magnitude" else None, progress=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(calib: int, batch: int, rows: list[tuple]) -> Table:
    """One row per (model, threads, pattern, method): seconds, x magnitude, peak MiB and peak - base."""
    cells = [
        (model, threads, pattern, method, f"{seconds:.2f}", f"{ratio:.1f}", f"{peak:.0f}", f"{peak - base:.0f}")
        for model, threads, pattern, method, seconds, ratio, peak, base in rows
    ]
    title = f"Calibration: {calib} random examples, batch {batch}; sequential mode; seconds of prune_model"
    columns = ("model", "threads", "pattern", "method", "seconds", "× magnitude", "peak MiB", "− base")
    return Table(title, columns, cells, align="lrllrrrr")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dit", "unet-kanji"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child", nargs=6, metavar=("MODEL", "METHOD", "PATTERN", "THREADS", "CALIB", "BATCH"))
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.child:
        m, method, pattern, threads, n, batch = args.child
        print(json.dumps(child(m, method, pattern, int(threads), int(n), int(batch))))
        return
    run = Run.start("cpu")
    rows = []
    for model in args.models:
        for threads in args.threads:
            base = run_child(model, "base", "2:4", threads, args.calib, args.batch)["peak_mib"]
            for pattern in PATTERNS:
                results = {m: run_child(model, m, pattern, threads, args.calib, args.batch) for m in METHODS}
                for m, r in results.items():
                    ratio = r["seconds"] / results["magnitude"]["seconds"]
                    label = pattern if ":" in pattern else f"S={pattern}"
                    rows.append((model, threads, label, m, r["seconds"], ratio, r["peak_mib"], base))
                    print(f"  {model} {threads} thread(s) {label} {m}: {r['seconds']:.2f} s", flush=True)
    threads = " and ".join(map(str, args.threads)) + " (each child; see the table)"
    tables = [table(args.calib, args.batch, rows)]
    heading = "Pruning time and peak memory (`bench_prune.py`)"
    report(run, "bench_prune", heading, tables, args.write_results, args.results_file, threads=threads)


if __name__ == "__main__":
    main()
