"""N:M fine-tuning step cost, measured side by side in one run: STE / dense and STE + teacher / dense.

Model: presets.build("unet-kanji") (diffusers UNet2DModel, 32x32, 1 channel), one fixed noisy batch. Each setup
runs the loop's step (objective forward, backward, AdamW step) on its own copy:

- dense:          the plain ε-objective, no masks (the teacher as it was trained);
- ste:            2:4 NMMask on every convertible layer, S(W) recomputed every forward, SR-STE λ_W = 2e-4 in the
                  backward (recipe sr-ste), ε-objective;
- ste + teacher:  the same plus SparseDM's distillation: a frozen dense teacher's forward on the same x_t, t
                  (recipe sparsedm).

Target: ste / dense ≤ 1.15 (the straight-through projection costs a sort of |W| per group each forward). With the
teacher, the extra forward adds roughly a third of a dense step; the ratio is reported, without a target.

    python benchmarks/bench_finetune.py [--batch 16] [--repeats 20] [--threads 1] [--device cpu] [--tiny]
                                        [--write-results]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from results import Run, Table, add_arguments, report
from timing import interleaved, step_parser

from surgeon.masking.surgery import sites
from surgeon.models import presets
from surgeon.recipe import load_recipe
from surgeon.tasks.images import ImageTask
from surgeon.training.loop import make_optimizer
from surgeon.training.objectives import DistillLoss, EpsilonLoss
from surgeon.training.run import prepare


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = step_parser(__doc__.splitlines()[0], "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--tiny", action="store_true", help="the tiny-unet preset: checks the script, measures nothing real"
    )
    add_arguments(ap)
    return ap.parse_args(argv)


class Setup:
    """One student (dense or N:M), its objective and AdamW, and a fixed noisy batch."""

    def __init__(self, recipe_name: str | None, batch: int, device: str, preset: str = "unet-kanji"):
        model = presets.build(preset, seed=0)
        task = ImageTask(model, data="unused")
        if recipe_name is None:
            self.objective = EpsilonLoss(task)
            recipe = load_recipe("dense")
        else:
            recipe = load_recipe(recipe_name)
            teacher = presets.build(preset, seed=0).to(device) if recipe.distill else None
            prepare(model, recipe, init="pretrained")
            self.objective = DistillLoss(task, teacher) if teacher is not None else EpsilonLoss(task)
        self.model = model.to(device).train()
        self.optimizer, _ = make_optimizer(self.model, recipe)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(batch, task.image_channels, task.image_size, task.image_size, generator=g) * 2 - 1
        inputs, target, _ = task.noisy_batch(x0, g)
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self.target = target.to(device)

    def step(self) -> None:
        self.objective(self.model, self.inputs, self.target, None).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    return Table(title, ("measure", "value", "target"), rows, align="lrl")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run.start(args.device)
    preset = "tiny-unet" if args.tiny else "unet-kanji"
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    setups = {
        "dense": Setup(None, args.batch, device, preset),
        "ste": Setup("sr-ste", args.batch, device, preset),
        "ste + teacher": Setup("sparsedm", args.batch, device, preset),
    }
    nm = sites(setups["ste"].model)
    n_params = sum(p.numel() for p in setups["dense"].model.parameters())
    times = interleaved({k: s.step for k, s in setups.items()}, args.repeats, args.warmup, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = {k: statistics.median(a / d for a, d in zip(times[k], times["dense"])) for k in ("ste", "ste + teacher")}

    ratio = med["ste"] / med["dense"]
    rows = [
        ("dense training step", f"{med['dense'] * 1e3:.2f} ms", ""),
        ("N:M STE training step", f"{med['ste'] * 1e3:.2f} ms", ""),
        ("N:M STE + teacher forward", f"{med['ste + teacher'] * 1e3:.2f} ms", ""),
        ("STE / dense", f"{ratio:.3f}", f"≤ 1.15 {'ok' if ratio <= 1.15 else 'ABOVE TARGET'}"),
        ("↳ median of per-pair ratios", f"{pairs['ste']:.3f}", ""),
        ("STE + teacher / dense", f"{med['ste + teacher'] / med['dense']:.3f}", "(reported)"),
        ("↳ median of per-pair ratios", f"{pairs['ste + teacher']:.3f}", ""),
    ]
    title = (
        f"{preset} ({n_params / 1e6:.2f}M params; {len(nm)} tensors at 2:4, SR-STE λ_W = 2e-4); batch {args.batch}, "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up, medians"
    )
    heading = "N:M fine-tuning step (`bench_finetune.py`)"
    report(run, "bench_finetune", heading, [table(title, rows)], args.write_results, args.results_file)


if __name__ == "__main__":
    main()
