"""Training-step overhead of masks and the amortized cost of mask updates, measured side by side in one run.

    .venv/bin/python benchmarks/bench_training.py [--batch 16] [--repeats 20] [--warmup 3] [--threads N] [--device cpu]
                                                   [--profile] [--tiny] [--write-results]

Model: presets.build("unet-kanji") (diffusers UNet2DModel, 32x32, 1 channel), trained with the loop's own pieces
(ImageTask noising, EpsilonLoss, surgeon.training.loop.make_optimizer = AdamW, zero_optimizer_state). The masked model is
the rigl recipe's plan (S = 0.5, ERK). All timed functions run round-robin (A B C D A B C D ...) after a warm-up, so
load from other processes on a shared machine hits them alike; medians are reported.

(a) masked training step / dense training step (forward + backward + AdamW step). Target ≤ 1.05.
(b) amortized cost of one mask update at ΔT_e = 100: (update step − plain masked step) / (100 × plain masked step),
    where the RigL update step includes its dense-gradient capture in forward/backward, the cross-process reduce,
    the drop/grow and the optimizer-state zeroing; MagRan's has no capture. Target ≤ 1 %.
--profile prints torch.profiler tables of one dense and one masked step (where the difference comes from).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results import Run, Table, add_arguments, report
from timing import interleaved, step_parser

from surgeon.algorithms import MagRan, RigL
from surgeon.masking.surgery import sites
from surgeon.models import presets
from surgeon.recipe import load_recipe
from surgeon.tasks.images import ImageTask
from surgeon.training.loop import make_optimizer, zero_optimizer_state
from surgeon.training.objectives import EpsilonLoss
from surgeon.training.run import prepare

DELTA_T = 100


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = step_parser(__doc__.splitlines()[0], "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--tiny", action="store_true", help="the tiny-unet preset: checks the script, measures nothing real"
    )
    add_arguments(ap)
    return ap.parse_args(argv)


class Setup:
    """One model (dense or masked) with its optimizer and a fixed noisy batch."""

    def __init__(self, recipe, masked: bool, batch: int, device: str, preset: str = "unet-kanji"):
        model = presets.build(preset, seed=0)
        dense = load_recipe("dense").override(**{"init": recipe.init, "training.seed": recipe.training.seed})
        prepare(model, recipe if masked else dense)
        self.model = model.to(device).train()
        self.task = ImageTask(model, data="unused")
        self.objective = EpsilonLoss(self.task)
        self.optimizer, _ = make_optimizer(self.model, recipe)
        g = torch.Generator().manual_seed(0)
        x0 = (
            torch.rand(batch, self.task.image_channels, self.task.image_size, self.task.image_size, generator=g) * 2 - 1
        )
        inputs, target, weight = self.task.noisy_batch(x0, g)
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self.target = target.to(device)

    def forward_backward(self) -> None:
        loss = self.objective(self.model, self.inputs, self.target, None)
        loss.backward()

    def step(self) -> None:
        """One training step as surgeon.training.loop runs it between mask updates."""
        self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Updater:
    """Runs the loop's update step for one algorithm: begin_step → fwd/bwd → after_backward → AdamW → update → zeroing."""

    def __init__(self, setup: Setup, cls, recipe, accelerator):
        self.setup = setup
        self.algorithm = cls(recipe, total_steps=10**9)
        self.algorithm.setup(setup.model, accelerator)
        self.step_no = 0
        self.update_seconds: list[float] = []  # drop/grow + optimizer-state zeroing alone
        self.sync = lambda: None

    def __call__(self) -> None:
        a, s = self.algorithm, self.setup
        self.step_no += DELTA_T
        a.begin_step(self.step_no)
        assert a.updating
        s.forward_backward()
        a.after_backward(self.step_no)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        self.sync()
        start = time.perf_counter()
        resets = a.after_optimizer_step(self.step_no)
        for fqn, positions in resets.items():
            zero_optimizer_state(s.optimizer, a.sites[fqn].original, positions)
        self.sync()
        self.update_seconds.append(time.perf_counter() - start)


def profile(setup: Setup, label: str, device: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for _ in range(2):
        setup.step()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            setup.step()
    key = "cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\n--- profile: {label} (3 steps) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    return Table(title, ("measure", "value", "target"), rows, align="lrl")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    run = Run.start(args.device)
    preset = "tiny-unet" if args.tiny else "unet-kanji"
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    recipe = load_recipe("rigl").override(
        **{
            "training.batch_size": args.batch,
            "dst.delta_t": DELTA_T,
            "dst.p_decay": "constant",
            "dst.stop_fraction": 1.0,
        }
    )
    acc = Accelerator(cpu=device == "cpu")
    dense = Setup(recipe, masked=False, batch=args.batch, device=device, preset=preset)
    masked = Setup(recipe, masked=True, batch=args.batch, device=device, preset=preset)
    rigl_model = Setup(recipe, masked=True, batch=args.batch, device=device, preset=preset)
    magran_model = Setup(recipe, masked=True, batch=args.batch, device=device, preset=preset)
    rigl = Updater(rigl_model, RigL, recipe, acc)
    magran = Updater(magran_model, MagRan, recipe.override(algorithm="magran"), acc)
    rigl.sync = magran.sync = sync

    n_params = sum(p.numel() for p in dense.model.parameters())
    masked_sites = sites(masked.model)
    n_masked = sum(s.mask.numel() for s in masked_sites.values())
    n_kept = sum(int(s.mask.sum()) for s in masked_sites.values())

    times = interleaved(
        {"dense": dense.step, "masked": masked.step, "rigl": rigl, "magran": magran}, args.repeats, args.warmup, sync
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [m / d for m, d in zip(times["masked"], times["dense"])]
    ratio = med["masked"] / med["dense"]
    upd = {
        "rigl": statistics.median(rigl.update_seconds[args.warmup :]),
        "magran": statistics.median(magran.update_seconds[args.warmup :]),
    }
    extra = {k: med[k] - med["masked"] for k in ("rigl", "magran")}
    amortized = {k: extra[k] / (DELTA_T * med["masked"]) for k in extra}

    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    verdict = lambda ok: "ok" if ok else "ABOVE TARGET"  # noqa: E731
    rows = [
        ("dense training step", ms(med["dense"]), ""),
        ("masked training step", ms(med["masked"]), ""),
        ("(a) masked / dense step", f"{ratio:.3f}", f"≤ 1.05 {verdict(ratio <= 1.05)}"),
        ("↳ median of per-pair ratios", f"{statistics.median(pair_ratios):.3f}", ""),
        ("RigL update step", ms(med["rigl"]), ""),
        ("↳ drop/grow + state zeroing", ms(upd["rigl"]), ""),
        ("↳ dense-gradient capture etc.", ms(extra["rigl"] - upd["rigl"]), ""),
        ("MagRan update step", ms(med["magran"]), ""),
        ("↳ drop/grow + state zeroing", ms(upd["magran"]), ""),
        (
            f"(b) RigL update, amortized at ΔT_e={DELTA_T}",
            f"{100 * amortized['rigl']:.3f} %",
            f"≤ 1 % {verdict(amortized['rigl'] <= 0.01)}",
        ),
        (
            f"(b) MagRan update, amortized at ΔT_e={DELTA_T}",
            f"{100 * amortized['magran']:.3f} %",
            f"≤ 1 % {verdict(amortized['magran'] <= 0.01)}",
        ),
    ]
    title = (
        f"{preset} ({n_params / 1e6:.2f}M params; {len(masked_sites)} masked tensors, {n_kept:,}/{n_masked:,} kept = "
        f"S {1 - n_kept / n_masked:.3f} over masked, rigl recipe ERK S=0.5); batch {args.batch}, "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up, medians"
    )
    heading = "Training step and mask updates (`bench_training.py`)"
    report(run, "bench_training", heading, [table(title, rows)], args.write_results, args.results_file)
    if args.profile:
        profile(dense, "dense", device)
        profile(masked, "masked", device)


if __name__ == "__main__":
    main()
