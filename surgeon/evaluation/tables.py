"""Result tables shared by the CLI, ``make demo`` and ``surgeon reproduce``: rich tables and markdown."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def format_flops(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_kid(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None or std is None else f"{mean:.4f} ± {std:.4f}"


def format_fraction(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _params(kept: int, total: int) -> str:
    return f"{kept / 1e6:.3f}M / {total / 1e6:.3f}M"


def wide_console(**kwargs) -> Console:
    """A console at least 120 columns wide (160 when piped): piped output (80 columns by default) would squeeze the
    tables' first column to nothing, and the demo's table of runs and scores needs about 150."""
    probe = Console()
    return Console(width=max(120 if probe.is_terminal else 160, probe.width), **kwargs)


def summary_table(summaries, title: str = "surgeon sparsify") -> Table:
    """One row per training run (``RunSummary``): losses, kept parameters, sparsity, FLOPs, speed."""
    table = Table(title=title)
    table.add_column("run", overflow="fold", min_width=8)
    for col in ("train loss", "held-out", "params kept", "sparsity", "fwd FLOPs", "train FLOPs", "s/step", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in summaries:
        table.add_row(
            s.recipe,
            f"{s.final_loss:.4f}",
            _loss(s.val_loss),
            _params(s.params_kept, s.params_total),
            f"{s.sparsity:.3f}",
            format_flops(getattr(s, "flops_forward", None)),
            format_flops(getattr(s, "flops_train", None)),
            f"{s.seconds_per_step:.2f}",
            f"{s.seconds:.0f}s",
        )
    return table


def print_summary(summaries, console: Console | None = None, title: str = "surgeon sparsify") -> None:
    console = console or wide_console()
    console.print(summary_table(summaries, title))
    for s in summaries:
        console.print(f"{s.recipe}: {s.out_dir}", soft_wrap=True)


def eval_table(result) -> Table:
    """One row per evaluated model (``Evaluation``); the title names the feature extractor in words."""
    table = Table(
        title=f"surgeon eval — {result.label}",
        caption=f"{result.data}, n = {result.n} samples, {result.sample_steps} sampling steps; FLOPs per denoiser call",
    )
    table.add_column("model", overflow="fold", min_width=10)
    cols = ("FID", "KID", "precision", "recall", "held-out", "params kept", "sparsity", "fwd FLOPs", "train FLOPs")
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    for r in result.rows:
        table.add_row(
            r.name,
            "n/a" if r.fid is None else f"{r.fid:.2f}",
            format_kid(r.kid_mean, r.kid_std),
            format_fraction(r.precision),
            format_fraction(r.recall),
            _loss(r.heldout_loss),
            _params(r.params_kept, r.params_total),
            f"{r.sparsity:.3f}",
            format_flops(r.flops_forward),
            format_flops(r.flops_train),
        )
    return table


def comparison_table(summaries, result, title: str = "surgeon") -> Table:
    """Training runs (``RunSummary``) next to their scores (``Evaluation`` of the same runs, in the same order)."""
    table = Table(
        title=f"{title} — {result.label}",
        caption=f"n = {result.n} samples per model, "
        f"{result.sample_steps} DDIM steps; FLOPs after Evci et al. (fwd: one denoiser call)",
    )
    table.add_column("run", overflow="fold", min_width=6)
    cols = ("FID", "KID", "precision", "recall", "train loss", "held-out", "params kept", "fwd FLOPs", "train FLOPs")
    for col in (*cols, "time"):
        table.add_column(col, justify="right", no_wrap=True)
    for s, r in zip(summaries, result.rows):
        table.add_row(
            s.recipe,
            "n/a" if r.fid is None else f"{r.fid:.2f}",
            format_kid(r.kid_mean, r.kid_std),
            format_fraction(r.precision),
            format_fraction(r.recall),
            f"{s.final_loss:.4f}",
            _loss(s.val_loss),
            _params(s.params_kept, s.params_total),
            format_flops(s.flops_forward),
            format_flops(s.flops_train),
            f"{s.seconds:.0f}s",
        )
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def group_line(result) -> str:
    """``surgeon eval --group``: every metric as mean ± std over the models of one configuration."""
    from surgeon.evaluation.stats import format_mean_std

    g = result.group or {}
    parts = []
    for key, label, digits in (
        ("fid", "FID", 2),
        ("kid_mean", "KID", 4),
        ("precision", "precision", 3),
        ("recall", "recall", 3),
        ("heldout_loss", "held-out", 4),
    ):
        if key in g:
            parts.append(f"{label} {format_mean_std(g[key]['mean'], g[key]['std'], digits)}")
    return f"mean ± std over {g.get('models', 0)} models: " + ", ".join(parts)
