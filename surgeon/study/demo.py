"""``make demo``: a small UNet on KanjiVG glyphs, trained dense and with RigL at S = 0.5, then scored side by side.

Everything is embedded: the model is built from a config (preset ``unet-kanji``, 32×32 glyphs), the glyphs are
rendered from the pip package ``kanjivg``, and FID/KID/precision/recall use the offline EfficientNet-Lite0 extractor
(not comparable with Inception FID); nothing is downloaded. Samples clip x₀ to [-1, 1] at every DDIM step (pixel
space). Outputs go to ``runs/demo/``: each run's folder (model, samples.png: a seeded 8×8 grid, loss.png, metrics)
and ``eval/`` (the two sample grids side by side, results.json).

Sampling is DDIM with η = 1 (``diffusion.eta``): at η = 0 a third of the grid's tiles were over-inked tangles.
Sizes: ``SURGEON_DEMO_STEPS`` (default 1500) training steps per model, ``SURGEON_DEMO_N`` (default 192) samples
scored per model. The two runs train side by side, one process each (a model this small does not use two threads
well); 5 min 54 s on two idle cores (README, "Quality numbers").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STEPS = int(os.environ.get("SURGEON_DEMO_STEPS", "1500"))
N = int(os.environ.get("SURGEON_DEMO_N", "192"))
LIMIT = 2048  # glyphs used for training
OUT = Path("runs/demo")


def recipes(steps: int = STEPS) -> list:
    """(name, sparsity, recipe) of the two demo runs: the shipped recipes with short-run settings."""
    from surgeon.recipe import load_recipe

    out = []
    for name, sparsity in (("dense", None), ("rigl", 0.5)):
        out.append(
            (
                name,
                sparsity,
                load_recipe(name).override(
                    **{
                        "sparsity": sparsity,
                        "training.steps": steps,
                        "training.batch_size": 16,
                        "optimizer.lr": 2e-3,
                        "training.ema_decay": 0.995,
                        "training.checkpoint_every": steps,
                        "training.num_samples": 64,  # the seeded 8×8 grid in samples.png
                        "diffusion.sample_steps": 50,
                        # η = 1: deterministic DDIM (η = 0) commits to a short run's errors and draws a third of
                        # the tiles as over-inked tangles; DDPM's noise at every step corrects them (README)
                        "diffusion.eta": 1.0,
                        "training.log_every": max(1, steps // 60),
                        "dst.delta_t": max(1, steps // 10) if sparsity else None,  # mask updates: RigL only
                    }
                ),
            )
        )
    return out


def run(out: Path = OUT, steps: int = STEPS, n: int = N, progress: bool = True) -> None:
    from surgeon.evaluation.evaluate import evaluate
    from surgeon.evaluation.tables import comparison_table, wide_console
    from surgeon.study.side_by_side import train_side_by_side

    console = wide_console()
    console.print(
        f"[bold]surgeon demo[/]: UNet2DModel (preset unet-kanji, 32×32) on KanjiVG glyphs, {steps} steps "
        f"each, then FID/KID/precision/recall on {n} samples each"
    )
    runs = recipes(steps)
    for name, sparsity, _ in runs:
        console.print(f"[bold]{name}[/]" + (f" at S = {sparsity}" if sparsity else ""), end="  ")
    console.print("(trained side by side, one process each)")
    jobs = [
        dict(model="unet-kanji", recipe=recipe, data="kanjivg", out=out / name, limit=LIMIT, force=True)
        for name, _, recipe in runs
    ]
    summaries = train_side_by_side(jobs, [steps] * len(jobs), progress=progress)
    console.print("\n[bold]scoring[/] (sampling and feature extraction)")
    result = evaluate(
        [out / "dense", out / "rigl"],
        data="kanjivg",
        n=n,
        sample_steps=50,
        out=out / "eval",
        force=True,
        progress=progress,
    )
    console.print(comparison_table(summaries, result, title="surgeon demo"))
    console.print(
        f"Outputs: {out}/<run>/ (model with packed masks, samples.png, loss.png, metrics.jsonl, summary.json) "
        f"and {out}/eval/ (samples.png side by side, results.json)",
        soft_wrap=True,
    )


if __name__ == "__main__":
    from surgeon.errors import SurgeonError

    try:
        run()
    except SurgeonError as err:  # the demo reports errors the way the CLI does, without importing it
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
