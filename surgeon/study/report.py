"""The report of ``surgeon reproduce``: markdown tables, the paper's findings checked on the numbers, plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from surgeon.evaluation.tables import format_flops, format_kid, markdown_table

MAIN_P, LOW_P = 0.5, 0.05  # the paper's main drop fraction, and the one it recommends


def _ratio(x: float | None, ref: float | None) -> str:
    if x is None or not ref:
        return "n/a"
    return f"{format_flops(x)} ({x / ref:.2f}×)"


def _fid(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def study_table(rows) -> str:
    dense = next((r for r in rows if r.spec.algorithm == "dense"), None)
    d_inf = dense.scores.get("flops_forward") if dense else None
    d_train = dense.summary.get("flops_train") if dense else None
    header = [
        "run",
        "method",
        "S",
        "p",
        "FID",
        "KID",
        "held-out loss",
        "params kept",
        "inference FLOPs",
        "training FLOPs",
        "train time",
    ]
    body = []
    for r in rows:
        s, sc = r.spec, r.scores
        body.append(
            [
                r.spec.name,
                s.algorithm,
                f"{sc['sparsity']:.2f}",
                "" if s.p is None else f"{s.p:g}",
                _fid(sc.get("fid")),
                format_kid(sc.get("kid_mean"), sc.get("kid_std")),
                "n/a" if sc.get("heldout_loss") is None else f"{sc['heldout_loss']:.4f}",
                f"{sc['params_kept']:,} / {sc['params_total']:,}",
                _ratio(sc.get("flops_forward"), d_inf),
                _ratio(r.summary.get("flops_train"), d_train),
                f"{r.summary.get('seconds', 0):.0f}s",
            ]
        )
    return markdown_table(header, body)


def _get(rows, algorithm: str, s: float, p: float | None = None):
    for r in rows:
        if r.spec.algorithm == algorithm and math.isclose(r.spec.sparsity, s) and (p is None or r.spec.p == p):
            return r
    return None


TIE = 0.02  # FIDs closer than 2 % are called a tie: with a few hundred samples they are within sampling noise


def _beats(a: float, b: float) -> bool:
    return a < b * (1 - TIE)


def _verdict(wins: int, losses: int) -> str:
    return "holds" if wins > losses else "does not hold" if losses > wins else "mixed (as many wins as losses)"


def findings(rows) -> list[str]:
    """The paper's three findings, each checked on this study's FIDs; differences under 2 % count as ties."""

    dense = _get(rows, "dense", 0.0)
    fid = lambda r: None if r is None else r.scores.get("fid")  # noqa: E731
    out = []
    if dense is None or fid(dense) is None:
        return ["no dense run: nothing to compare with"]
    d = fid(dense)
    low = [
        r
        for r in rows
        if r.spec.algorithm != "dense" and r.spec.sparsity <= 0.5 and fid(r) is not None and r.spec.p in (None, MAIN_P)
    ]
    if low:
        ratios = ", ".join(f"{r.spec.name} {fid(r) / d:.2f}×" for r in low)
        near = sum(fid(r) <= 1.1 * d for r in low)
        out.append(
            f"**Sparse ≈ dense at S = 0.25–0.5** (paper: yes). FID relative to dense ({d:.2f}): {ratios}. "
            f"{near} of {len(low)} within 10 % of dense or better: "
            f"{'holds' if near >= len(low) / 2 else 'does not hold'} here."
        )
    wins = ties = total = 0
    detail = []
    for s in sorted({r.spec.sparsity for r in rows if r.spec.algorithm == "static"}):
        st = fid(_get(rows, "static", s))
        for algo in ("rigl", "magran"):
            dy = fid(_get(rows, algo, s, MAIN_P))
            if st is not None and dy is not None:
                total += 1
                wins += _beats(dy, st)
                ties += not _beats(dy, st) and not _beats(st, dy)
                detail.append(f"{algo} {dy:.2f} vs static {st:.2f} at S = {s:g}")
    if total:
        out.append(
            f"**Dynamic ≥ static** (paper: mostly, and clearly with p = 0.05 at high sparsity). Dynamic better "
            f"in {wins}, tied (within 2 %) in {ties}, worse in {total - wins - ties} of {total} pairs "
            f"({'; '.join(detail)}): {_verdict(wins, total - wins - ties)} here."
        )
    pairs = []
    for algo in ("rigl", "magran"):
        lo, hi = fid(_get(rows, algo, 0.9, LOW_P)), fid(_get(rows, algo, 0.9, MAIN_P))
        if lo is not None and hi is not None:
            pairs.append((algo, lo, hi))
    if pairs:
        better = sum(_beats(lo, hi) for _, lo, hi in pairs)
        text = "; ".join(f"{a}: p = {LOW_P:g} {lo:.2f} vs p = {MAIN_P:g} {hi:.2f}" for a, lo, hi in pairs)
        verdict = (
            "holds"
            if better == len(pairs)
            else f"holds for {better} of {len(pairs)}"
            if better
            else "does not hold (differences under 2 % count as ties)"
        )
        out.append(f"**p = {LOW_P:g} better than p = {MAIN_P:g} at S = 0.9** (paper: yes). {text}: {verdict} here.")
    return out


def _grid_panels(rows):
    from PIL import Image

    panels = []
    for r in rows:
        path = Path(r.run_dir) / "samples.png"
        if path.is_file():
            with Image.open(path) as im:
                panels.append((f"{r.spec.name}\nFID {_fid(r.scores.get('fid'))}", np.asarray(im.convert("L"))))
    return panels


def write_plots(out: Path, rows, study: str, label: str) -> dict[str, Path]:
    from surgeon.evaluation.plots import grids_side_by_side, loss_curves, metric_vs

    sub = [r for r in rows if r.spec.study == study]
    if not sub:
        return {}
    folder = out / study
    plots = {
        "samples": grids_side_by_side(_grid_panels(sub), folder / "samples_side_by_side.png", title=label),
        "loss": loss_curves(
            [
                (r.spec.name, Path(r.run_dir) / "metrics.jsonl")
                for r in sub
                if (Path(r.run_dir) / "metrics.jsonl").is_file()
            ],
            folder / "loss_curves.png",
            title=f"{study}: training loss",
        ),
    }
    dense = next((r.scores.get("fid") for r in sub if r.spec.algorithm == "dense"), None)
    points = [
        {
            "method": r.spec.method,
            "sparsity": r.scores["sparsity"],
            "flops": r.scores.get("flops_forward"),
            "fid": r.scores.get("fid"),
        }
        for r in sub
        if r.spec.algorithm != "dense"
    ]
    if points:
        plots["fid_vs_sparsity"] = metric_vs(
            points, "sparsity", "fid", folder / "fid_vs_sparsity.png", "sparsity S", label, dense=dense, title=study
        )
        plots["fid_vs_flops"] = metric_vs(
            points,
            "flops",
            "fid",
            folder / "fid_vs_flops.png",
            "inference FLOPs per denoiser call",
            label,
            dense=dense,
            title=study,
        )
    return plots


def write_report(out: Path, plan, rows, elapsed: float) -> Path:
    from surgeon.io.atomic import atomic_path

    label = next((r.scores.get("metric_label") for r in rows if r.scores.get("metric_label")), "FID")
    lines = [
        "# surgeon reproduce: sparse-to-sparse training of diffusion models on KanjiVG",
        "",
        f"Budget {plan.budget_minutes:g} min; this invocation took {elapsed / 60:.1f} min (a resumed study counts only "
        f"its last invocation). Image runs: `{plan.image_model}`, {plan.image_steps} steps each; ChiroDiff runs: "
        f"`{plan.chiro_model}`, {plan.chiro_steps} steps each; batch {plan.batch_size}, {plan.updates} mask updates "
        f"per run, n = {plan.n} samples per model ({plan.sample_steps} DDIM steps).",
        "",
        f"Metric: {label}. KID is mean ± std over subsets. FLOPs after Evci et al.: inference = one denoiser call on "
        "one example; training = the whole run; ratios are to the dense run of the same study.",
        "",
    ]
    for study, title in (("images", "Glyph images (UNet)"), ("strokes", "Strokes (ChiroDiff), rendered")):
        sub = [r for r in rows if r.spec.study == study]
        if not sub:
            continue
        plots = write_plots(out, rows, study, label)
        lines += [f"## {title}", "", study_table(sub)]
        lines += [f"![{name}]({p.relative_to(out)})" for name, p in plots.items()] + [""]
    lines += ["## The paper's findings, checked on these numbers", ""]
    lines += [f"- {f}" for f in findings([r for r in rows if r.spec.study == "images"])] + [""]
    path = out / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
