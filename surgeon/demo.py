"""``make demo``: a small UNet on KanjiVG glyphs, trained dense and with RigL at S = 0.5, side by side.

Everything is embedded: the model is built from a config (preset ``unet-kanji``), the glyphs are rendered from the
pip package ``kanjivg``; nothing is downloaded. Outputs go to ``runs/demo/``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

STEPS = int(os.environ.get("SURGEON_DEMO_STEPS", "300"))
LIMIT = 2048  # glyphs used for training


def run() -> None:
    from surgeon.tables import print_summary
    from surgeon.recipe import load_recipe
    from surgeon.run import sparsify

    console = Console()
    out = Path("runs/demo")
    console.print(f"[bold]surgeon demo[/]: UNet2DModel (preset unet-kanji, 32×32) on KanjiVG glyphs, {STEPS} steps each")
    summaries = []
    for name, sparsity in (("dense", None), ("rigl", 0.5)):
        recipe = load_recipe(name).override(**{
            "sparsity": sparsity, "training.steps": STEPS, "training.batch_size": 16, "optimizer.lr": 1e-3,
            "dst.delta_t": 50, "dst.p": 0.2, "training.checkpoint_every": STEPS, "training.num_samples": 16,
            "diffusion.sample_steps": 25,
        })
        console.print(f"\n[bold]{name}[/]" + (f" at S = {sparsity}" if sparsity else ""))
        summaries.append(sparsify("unet-kanji", recipe, "kanjivg", out / name, limit=LIMIT, force=True))
    print_summary(summaries)
    console.print(f"Outputs: {out}/<run>/model (packed masks), samples.png, metrics.jsonl, summary.json")


if __name__ == "__main__":
    from surgeon.cli.common import print_error

    try:
        run()
    except Exception as err:  # noqa: BLE001 - the demo reports errors like the CLI does
        sys.exit(print_error(err))
