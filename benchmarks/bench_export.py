"""Export formats side by side in one run: file bytes per format and dtype, and denoising-step time of the exports.

    .venv/bin/python benchmarks/bench_export.py [--threads 2] [--repeats 15] [--quick] [--tiny] [--write-results]

Models (built from configs, random weights: bytes and times do not depend on the values):

- ``dit``: a Linear-heavy DiTTransformer2DModel (hidden 768 = 12 heads x 64, 4 blocks, 16x16x4 latents, patch 2:
  64 tokens per image), class-conditional;
- ``chirodiff``: the ChiroDiff preset (3 bidirectional GRU layers, 96 hidden), 64 points per sequence.

Bytes: each format's file / the dense export's file in the same dtype. Unstructured rows use S = 0.9 (uniform per
layer); semi-structured rows a 2:4 model (the dense and packed bytes of that same 2:4 model are shown too).

CPU time: one denoising step (batch 4, the model's own input shapes; ``surgeon.formats.inputs.denoising_step``) of
the CSR export (``--layers auto``, measured choice, and ``--layers all``) and of the dense export, loaded back,
interleaved repeats: medians, and the fastest runs (steadier on a shared machine, where others only add time). GPU rows (2:4 on sparse tensor cores, fp16, DiT hidden 1024) run only where CUDA is
available; otherwise they print "not measured".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from results import Run, Table, add_arguments, report
from timing import interleaved, medians

import surgeon
from surgeon.formats.inputs import denoising_step


def dit(hidden_heads: int = 12, layers: int = 4) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=hidden_heads,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )


def chirodiff() -> torch.nn.Module:
    return surgeon.models.presets.build("chirodiff")


def tiny_dit() -> torch.nn.Module:
    return dit(hidden_heads=2, layers=1)


def tiny_chirodiff() -> torch.nn.Module:
    return surgeon.models.presets.build("tiny-chirodiff")


def masked(model: torch.nn.Module, nm: bool, sparsity: float = 0.9) -> torch.nn.Module:
    p = surgeon.plan(model, nm="2:4") if nm else surgeon.plan(model, sparsity=sparsity, distribution="uniform")
    return surgeon.inject(model, p, init="magnitude")


def byte_table(tmp: Path, build=dit) -> list[tuple]:
    rows = []
    for label, nm in (("S=0.9", False), ("2:4", True)):
        model = masked(build(), nm)
        for dtype in ("fp32", "fp16", "bf16"):
            formats = (
                ["dense", "packed"]
                + (["semi-structured"] if nm else [])
                + (["csr"] if dtype == "fp32" and not nm else [])
            )
            sizes = {}
            for fmt in formats:
                out = tmp / f"{label}-{dtype}-{fmt}.safetensors"
                r = surgeon.export(
                    model,
                    out,
                    format=fmt,
                    dtype=dtype,
                    layers="all" if fmt == "csr" else "auto",
                    progress=False,
                    force=True,
                )
                sizes[fmt] = r.file_bytes
            for fmt in formats[1:]:
                rows.append((f"dit {label} {dtype}", fmt, sizes[fmt] / sizes["dense"], sizes[fmt], sizes["dense"]))
    return rows


def step_times(name: str, build, tmp: Path, repeats: int) -> list[tuple]:
    model = masked(build(), nm=False)
    step = denoising_step(model, batch=4)
    paths, chosen = {}, 0
    for label, kwargs in (
        ("dense", {"format": "dense"}),
        ("csr auto", {"format": "csr"}),
        ("csr all", {"format": "csr", "layers": "all"}),
    ):
        paths[label] = tmp / f"{name}-{label.replace(' ', '-')}.safetensors"
        r = surgeon.export(model, paths[label], progress=False, force=True, **kwargs)
        if label == "csr auto":
            chosen = sum(row.storage == "csr" for row in r.rows)
            total = len(r.rows)
            faster_alone = sum("whole step not faster" in row.note for row in r.rows)
    loaded = {label: surgeon.load(p).eval() for label, p in paths.items()}
    loaded["dense again"] = surgeon.load(paths["dense"]).eval()  # A/A control: what the machine's noise alone does
    with torch.no_grad():
        times = interleaved(
            {k: (lambda m=m: step(m)) for k, m in loaded.items()}, repeats=repeats, warmup=2, sync=lambda: None
        )
    t, best = medians(times), {k: min(v) for k, v in times.items()}
    # the spread of the dense step itself says how much a ratio can move on this machine right now
    q = statistics.quantiles(times["dense"], n=4)
    spread = f"dense quartiles {q[0] * 1e3:.0f}-{q[2] * 1e3:.0f} ms"
    rows = [
        (
            f"{name} step, csr auto / dense",
            t["csr auto"] / t["dense"],
            f"{t['csr auto'] * 1e3:.1f} / {t['dense'] * 1e3:.1f} ms; converted {chosen} of {total} target weights"
            + (" (the same modules as dense)" if chosen == 0 else "")
            + (f", {faster_alone} faster alone but not in the whole step" if faster_alone else "")
            + f"; {spread}",
        )
    ]
    rows.append(
        (
            f"{name} step, csr all / dense",
            t["csr all"] / t["dense"],
            f"{t['csr all'] * 1e3:.1f} / {t['dense'] * 1e3:.1f} ms",
        )
    )
    rows.append((f"{name} step, dense again / dense (A/A)", t["dense again"] / t["dense"], "same model twice: noise"))
    rows += [
        (
            f"{name} step, {k} / dense, fastest runs",
            best[k] / best["dense"],
            f"{best[k] * 1e3:.1f} / {best['dense'] * 1e3:.1f} ms",
        )
        for k in ("csr auto", "csr all", "dense again")
    ]
    return rows


def gpu_rows(repeats: int) -> list[tuple]:
    if not torch.cuda.is_available():
        return [("dit(hidden 1024) 2:4 step / dense step, fp16, CUDA", None, "not measured: no CUDA device")]
    with tempfile.TemporaryDirectory() as d:
        model = masked(dit(hidden_heads=16, layers=8), nm=True)
        dense_path, semi_path = Path(d) / "dense.safetensors", Path(d) / "semi.safetensors"
        surgeon.export(model, dense_path, format="dense", dtype="fp16", progress=False)
        surgeon.export(model, semi_path, format="semi-structured", dtype="fp16", progress=False)
        dense, semi = surgeon.load(dense_path, device="cuda").eval(), surgeon.load(semi_path, device="cuda").eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, 16, 16, generator=g).to("cuda", torch.float16)
        t = torch.randint(0, 1000, (32,), generator=g).cuda()
        y = torch.zeros(32, dtype=torch.long, device="cuda")
        fns = {k: (lambda m=m: m(x, timestep=t, class_labels=y)) for k, m in (("dense", dense), ("2:4", semi))}
        with torch.no_grad():
            times = medians(interleaved(fns, repeats=repeats, warmup=3, sync=torch.cuda.synchronize))
    return [
        (
            "dit(hidden 1024) 2:4 step / dense step, fp16, CUDA",
            times["2:4"] / times["dense"],
            f"{times['2:4'] * 1e3:.2f} / {times['dense'] * 1e3:.2f} ms",
        )
    ]


def byte_rows(rows: list[tuple], tiny: bool) -> Table:
    cells = [(model, fmt, f"{ratio:.3f}", f"{size:,}", f"{dense:,}") for model, fmt, ratio, size, dense in rows]
    model = "a tiny DiT (hidden 128, 1 block)" if tiny else "the DiT (hidden 768, 4 blocks, 47M parameters)"
    title = f"File bytes / dense file bytes, same dtype, {model} (target: semi-structured fp16 <= 0.57)"
    return Table(title, ("model", "format", "ratio", "bytes", "dense bytes"), cells, align="llrrr")


def ratio_rows(title: str, rows: list[tuple]) -> Table:
    cells = [(label, "n/a" if ratio is None else f"{ratio:.3f}", detail) for label, ratio, detail in rows]
    return Table(title, ("measure", "ratio", "detail"), cells, align="lrl")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="bytes only, no timing")
    ap.add_argument("--tiny", action="store_true", help="tiny models: checks the script, measures nothing real")
    add_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run.start("cpu" + (", GPU rows on cuda" if torch.cuda.is_available() else ""))
    models = (
        (("dit", tiny_dit), ("chirodiff", tiny_chirodiff)) if args.tiny else (("dit", dit), ("chirodiff", chirodiff))
    )
    print("measuring file bytes", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tables = [byte_rows(byte_table(tmp, models[0][1]), args.tiny)]
        if not args.quick:
            print("measuring CPU denoising steps", flush=True)
            steps = [row for name, build in models for row in step_times(name, build, tmp, args.repeats)]
            title = (
                "CPU denoising step, batch 4, S = 0.9 (target: >= 1.3x faster where CSR is chosen; auto never slower)"
            )
            tables.append(ratio_rows(title, steps))
            tables.append(ratio_rows("GPU (target: <= 1 / 1.3 = 0.77)", gpu_rows(args.repeats)))
    report(run, "bench_export", "Export formats (`bench_export.py`)", tables, args.write_results, args.results_file)


if __name__ == "__main__":
    main()
