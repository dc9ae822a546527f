"""Real-size checkpoints: masked training, mask updates, inject, save/load and export on 0.75-0.86B-parameter models.

    .venv/bin/python benchmarks/bench_scale.py [--model sd15,dit-xl] [--only step,rigl,inject,io,export]
                                               [--rounds 2] [--steps 2] [--warmup 1] [--device cpu|cuda]
                                               [--mem-cap-gb 17] [--wait-free-gb 18] [--tiny] [--write-results]

Models, built from their public configs with random weights (no downloads):
  sd15    UNet2DConditionModel(sample_size=64, cross_attention_dim=768): Stable Diffusion 1.5's UNet, 860M
  dit-xl  DiTTransformer2DModel with DiT-XL/2's config (28 layers, 16 heads x 72, patch 2, learned sigma), 750M
One thread on CPU (fp32), or CUDA with bf16 autocast when present; batch 1, latents 4x32x32 (77 text tokens).

Every measurement runs in its own child process (this script with ``--child``), so the peak memory of each
configuration is its own (peak RSS on CPU, ``max_memory_allocated`` on CUDA), and a child that passes
``--mem-cap-gb`` is stopped and reported as "over". Step times are ratios to the dense step: the dense and masked
children alternate (dense, masked, 2:4, dense, masked, 2:4, ...) for ``--rounds`` rounds so that load from other
processes hits each alike; each child reports the median of its ``--steps`` timed steps after ``--warmup``.

step    training step (forward, backward, AdamW) of dense, masked S=0.5 (random mask, as Static/RigL start) and
        2:4 straight-through (magnitude); peak memory of each. Targets <= 1.05x dense (time and memory).
rigl    one RigL update step (dense-gradient capture, drop/grow, optimizer-state zeroing) minus a plain masked step,
        amortized at ΔT_e = 100 (alternating plain and update steps in one process). Target <= 1 %.
inject  plan + inject with magnitude init (S = 0.5). Target <= 10 s.
io      surgeon.save vs safetensors save_file of the dense state (target <= 1.5x); surgeon.load vs diffusers
        from_pretrained of a save_pretrained folder, and surgeon.load_into vs load_file + load_state_dict into a
        built model (target <= 2x). Alternated, medians over --rounds.
export  export --format dense from the saved folder and from the live masked module: time, and peak memory above
        the process before the model existed, over the model's bytes (target <= 1.10).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results import Run, Table, add_arguments, report

DELTA_T = 100
SPARSITY = 0.5
GB = 1024**3
# the share of --wait-free-gb each child needs (a training step holds weights, gradients and AdamW's two moments)
NEEDS = {"step": 1.0, "rigl": 1.0, "inject": 0.5, "io": 0.7, "export": 0.6}


# --- the models ----------------------------------------------------------------------------------------------------


def build(name: str, tiny: bool):
    import torch

    torch.manual_seed(0)
    if name == "sd15":
        from diffusers import UNet2DConditionModel

        if tiny:
            return UNet2DConditionModel(
                sample_size=16,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                norm_num_groups=8,
                attention_head_dim=4,
                layers_per_block=1,
            )
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    from diffusers import DiTTransformer2DModel

    big = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72)
    small = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16)
    return DiTTransformer2DModel(
        **(small if tiny else big),
        in_channels=4,
        out_channels=8,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def batch(model, device):
    """One denoising-training batch: x_t, t, conditioning and the ε target (batch 1, latents 4x32x32)."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 32, 32, generator=g)
    eps = torch.randn(1, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    cond = {}
    cross = getattr(model.config, "cross_attention_dim", None)
    if cross:
        cond["encoder_hidden_states"] = torch.randn(1, 77, int(cross), generator=g)
    if getattr(model.config, "num_embeds_ada_norm", None):
        cond["class_labels"] = torch.randint(0, 1000, (1,), generator=g)
    return x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}, eps.to(device)


class Trainer:
    """The loop's training step on a fixed batch: forward, ε-loss, backward, AdamW (the loop's optimizer)."""

    def __init__(self, model, device: str):
        import torch

        from surgeon.recipe import load_recipe
        from surgeon.training.loop import make_optimizer

        self.model = model.to(device).train()
        self.device = device
        self.optimizer, _ = make_optimizer(model, load_recipe("rigl"))
        self.inputs = batch(model, device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.startswith("cuda")
            else torch.autocast("cpu", enabled=False)
        )

    def forward_backward(self) -> None:
        import torch.nn.functional as F

        x, t, cond, eps = self.inputs
        with self.autocast:
            out = self.model(x, t, **cond).sample[:, :4]
            loss = F.mse_loss(out.float(), eps)
        loss.backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# --- child processes -------------------------------------------------------------------------------------------------


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anonymous_rss() -> int:
    """Resident memory the process owns (RssAnon): pages of a memory-mapped file it reads are not counted, as the
    kernel can drop them."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return current_rss()


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


_ANON_PEAK = [0]  # the most anonymous memory the watcher saw since the last reset_anonymous_peak()


def reset_anonymous_peak() -> int:
    _ANON_PEAK[0] = anonymous_rss()
    return _ANON_PEAK[0]


def watch_memory(cap_gb: float) -> None:
    """Stop this process (exit 3) once its RSS passes the cap: a configuration "over" the cap is a result. Also
    records the peak of anonymous memory (sampled every 20 ms), which a mapped file's pages do not inflate."""

    def run() -> None:
        while True:
            now = anonymous_rss()
            _ANON_PEAK[0] = max(_ANON_PEAK[0], now)
            if now > cap_gb * GB:
                print(json.dumps({"over_cap_gb": cap_gb}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def child(args) -> dict:
    import torch

    import surgeon

    torch.set_num_threads(1)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if args.mem_cap_gb and not device.startswith("cuda"):
        watch_memory(args.mem_cap_gb)
    import diffusers  # noqa: F401 - imported before the clock starts: build_s is the model alone

    before = current_rss()
    out: dict = {}
    t0 = time.perf_counter()
    model = build(args.model, args.tiny)
    out["build_s"] = time.perf_counter() - t0
    out["params"] = sum(p.numel() for p in model.parameters())
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    kind = args.child

    if kind == "step":
        if args.config == "masked":
            surgeon.inject(model, surgeon.plan(model, sparsity=SPARSITY), init="random")
        elif args.config == "nm":
            surgeon.inject(model, surgeon.plan(model, nm="2:4"), init="magnitude")
        trainer = Trainer(model, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = [timed(trainer.step, sync) for _ in range(args.warmup + args.steps)][args.warmup :]
        out["step_s"] = statistics.median(times)
        out["peak_bytes"] = peak_bytes(device) - (0 if device.startswith("cuda") else before)

    elif kind == "rigl":
        from accelerate import Accelerator

        from surgeon.algorithms import RigL
        from surgeon.recipe import load_recipe
        from surgeon.training.loop import zero_optimizer_state

        surgeon.inject(model, surgeon.plan(model, sparsity=SPARSITY), init="random")
        trainer = Trainer(model, device)
        recipe = load_recipe("rigl").override(
            **{"dst.delta_t": DELTA_T, "dst.p_decay": "constant", "dst.stop_fraction": 1.0}
        )
        rigl = RigL(recipe, total_steps=10**9)
        rigl.setup(model, Accelerator(cpu=not device.startswith("cuda")))
        state = {"step": 0, "update": 0.0}

        def update_step() -> None:
            state["step"] += DELTA_T
            rigl.begin_step(state["step"])
            trainer.forward_backward()
            rigl.after_backward(state["step"])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            resets = rigl.after_optimizer_step(state["step"])
            for fqn, positions in resets.items():
                zero_optimizer_state(trainer.optimizer, rigl.sites[fqn].original, positions)
            sync()
            state["update"] = time.perf_counter() - start

        plain, update, drop_grow = [], [], []
        for i in range(args.warmup + args.steps):
            order = [("plain", trainer.step), ("update", update_step)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                s = timed(fn, sync)
                if i >= args.warmup:
                    (plain if name == "plain" else update).append(s)
                    if name == "update":
                        drop_grow.append(state["update"])
        out["plain_s"], out["update_s"] = statistics.median(plain), statistics.median(update)
        out["drop_grow_s"] = statistics.median(drop_grow)

    elif kind == "inject":
        t0 = time.perf_counter()
        surgeon.inject(model, surgeon.plan(model, sparsity=SPARSITY), init="magnitude")
        out["inject_s"] = time.perf_counter() - t0

    elif kind == "io":
        from safetensors.torch import load_file, save_file

        tmp = Path(args.tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp / "plain-folder", safe_serialization=True)
        surgeon.inject(model, surgeon.plan(model, sparsity=SPARSITY), init="random")
        save = {
            "save_file": lambda: save_file(state, str(tmp / "plain.safetensors")),
            "surgeon.save": lambda: surgeon.save(model, tmp / "packed", force=True),
        }
        times: dict[str, list[float]] = {k: [] for k in save}
        for i in range(args.rounds):
            items = list(save.items())
            for name, fn in items if i % 2 == 0 else items[::-1]:
                times[name].append(timed(fn, sync))
        cls = type(model)
        del model, state, save  # the load rounds hold one built model and one loaded model at a time
        gc.collect()
        built = build(args.model, args.tiny)

        def plain_into() -> None:
            built.load_state_dict(load_file(str(tmp / "plain.safetensors")))

        def surgeon_into() -> None:
            surgeon.remove(built)
            surgeon.load_into(built, tmp / "packed")

        load = {
            "from_pretrained": lambda: cls.from_pretrained(tmp / "plain-folder", use_safetensors=True),
            "surgeon.load": lambda: surgeon.load(tmp / "packed"),
            "load_state_dict": plain_into,
            "surgeon.load_into": surgeon_into,
        }
        times.update({k: [] for k in load})
        for i in range(args.rounds):
            items = list(load.items())
            for name, fn in items if i % 2 == 0 else items[::-1]:
                times[name].append(timed(fn, sync))
                gc.collect()
        out.update({f"{k}_s": statistics.median(v) for k, v in times.items()})

    elif kind == "export":
        folder = Path(args.tmp) / "packed"
        del model
        gc.collect()
        if args.config == "folder":
            # the process before any model: everything above it is what export itself holds
            before = reset_anonymous_peak()
            t0 = time.perf_counter()
            surgeon.export(str(folder), Path(args.tmp) / "export-folder", format="dense", force=True, progress=False)
        else:
            live = surgeon.load(folder)
            gc.collect()
            before = reset_anonymous_peak() - sum(p.numel() * p.element_size() for p in live.parameters())
            t0 = time.perf_counter()
            surgeon.export(live, Path(args.tmp) / "export-live", format="dense", force=True, progress=False)
        out["export_s"] = time.perf_counter() - t0
        time.sleep(0.05)  # one more sample of the watcher
        # on CPU the peak of anonymous memory (the lifetime RSS peak includes building the model, and the pages of
        # the mapped file the export reads)
        out["peak_bytes"] = (peak_bytes(device) if device.startswith("cuda") else _ANON_PEAK[0]) - before
    return out


def spawn(args, kind: str, config: str = "", tmp: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", args.model_one]
    cmd += ["--config", config, "--tmp", tmp, "--device", args.device, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--rounds", str(args.rounds), "--mem-cap-gb", str(args.mem_cap_gb)]
    cmd += ["--tiny"] if args.tiny else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    need = args.wait_free_gb * NEEDS[kind]
    while available_bytes() < need * GB:  # a shared machine: never crowd the others out
        time.sleep(10)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode == 3 and "over_cap_gb" in result:
        return result
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {kind} {config} failed (exit {proc.returncode})")
    print(f"  {kind} {config}: {json.dumps({k: round(v, 3) for k, v in result.items()})}", file=sys.stderr)
    return result


# --- the table ------------------------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "ABOVE TARGET"


def measure_model(args, only: set[str]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    gb = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if "step" in only:
            runs: dict[str, list[dict]] = {"dense": [], "masked": [], "nm": []}
            for i in range(args.rounds):
                order = list(runs) if i % 2 == 0 else list(runs)[::-1]
                for config in order:
                    runs[config].append(spawn(args, "step", config))
            over = {c: r[0]["over_cap_gb"] for c, r in runs.items() if "over_cap_gb" in r[0]}
            dense_s = statistics.median(r["step_s"] for r in runs["dense"])
            dense_peak = max(r["peak_bytes"] for r in runs["dense"])
            rows.append(("dense training step", f"{dense_s:.2f} s", ""))
            rows.append(("dense peak memory (step)", gb(dense_peak), ""))
            for config, label in (("masked", f"masked S={SPARSITY}"), ("nm", "2:4 STE")):
                if config in over:
                    rows.append((f"{label} step / dense", "-", f"stopped: over {over[config]} GB"))
                    continue
                ratios = [m["step_s"] / d["step_s"] for m, d in zip(runs[config], runs["dense"])]
                s = statistics.median(r["step_s"] for r in runs[config])
                rows.append((f"{label} step / dense", f"{s / dense_s:.3f}x", f"<= 1.05 {verdict(s / dense_s, 1.05)}"))
                rows.append(("↳ per-round ratios", " ".join(f"{r:.3f}" for r in ratios), ""))
                peak = max(r["peak_bytes"] for r in runs[config])
                rows.append(
                    (
                        f"{label} peak memory / dense",
                        f"{peak / dense_peak:.3f}x",
                        f"{gb(peak)}; <= 1.05 {verdict(peak / dense_peak, 1.05)}",
                    )
                )
        if "rigl" in only:
            r = spawn(args, "rigl")
            if "over_cap_gb" in r:
                rows.append(("RigL update", "-", f"stopped: over {r['over_cap_gb']} GB"))
            else:
                extra = r["update_s"] - r["plain_s"]
                share = extra / (DELTA_T * r["plain_s"])
                rows.append(("RigL update step - masked step", f"{extra:.2f} s", f"masked step {r['plain_s']:.2f} s"))
                rows.append(("↳ of which drop/grow + zeroing", f"{r['drop_grow_s']:.2f} s", ""))
                rows.append(
                    (
                        f"RigL update amortized at ΔT_e={DELTA_T}",
                        f"{100 * share:.2f} %",
                        f"<= 1 % {verdict(share, 0.01)}",
                    )
                )
        if "inject" in only:
            r = spawn(args, "inject")
            rows.append(
                ("inject (magnitude, S=0.5)", f"{r['inject_s']:.2f} s", f"<= 10 s {verdict(r['inject_s'], 10)}")
            )
            rows.append(("↳ model built from config", f"{r['build_s']:.2f} s", ""))
        if "io" in only or "export" in only:
            r = spawn(args, "io", tmp=tmp)
            if "over_cap_gb" in r:
                rows.append(("save / load", "-", f"stopped: over {r['over_cap_gb']} GB"))
                return rows
            save = r["surgeon.save_s"] / r["save_file_s"]
            rows.append(
                (
                    "surgeon.save / save_file",
                    f"{save:.2f}x",
                    f"{r['surgeon.save_s']:.2f} / {r['save_file_s']:.2f} s; <= 1.5 {verdict(save, 1.5)}",
                )
            )
            load = r["surgeon.load_s"] / r["from_pretrained_s"]
            rows.append(
                (
                    "surgeon.load / from_pretrained",
                    f"{load:.2f}x",
                    f"{r['surgeon.load_s']:.2f} / {r['from_pretrained_s']:.2f} s; <= 2 {verdict(load, 2)}",
                )
            )
            into = r["surgeon.load_into_s"] / r["load_state_dict_s"]
            rows.append(
                (
                    "load_into / load_file+load_state_dict",
                    f"{into:.2f}x",
                    f"{r['surgeon.load_into_s']:.2f} / {r['load_state_dict_s']:.2f} s; <= 2 {verdict(into, 2)}",
                )
            )
            if "export" in only:
                for config in ("folder", "live"):
                    e = spawn(args, "export", config, tmp=tmp)
                    rel = e["peak_bytes"] / e["model_bytes"]
                    rows.append(
                        (
                            f"export dense ({config}): peak / model",
                            f"{rel:.2f}x",
                            f"{e['export_s']:.2f} s, {gb(e['peak_bytes'])}; <= 1.10 {verdict(rel, 1.10)}",
                        )
                    )
    return rows


def table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    return Table(f"### {title}", ("measure", "value", "target / detail"), rows)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15,dit-xl", help="comma-separated: sd15, dit-xl")
    ap.add_argument("--only", default="step,rigl,inject,io,export", help="comma-separated measurements")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu (default without CUDA) or cuda")
    ap.add_argument("--mem-cap-gb", type=float, default=17.0, help="stop a child whose RSS passes this (CPU)")
    ap.add_argument("--wait-free-gb", type=float, default=0, help="start each child only once this much is available")
    ap.add_argument("--tiny", action="store_true", help="small configs: checks the script, measures nothing real")
    add_arguments(ap)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> None:
    args = parse()
    if args.child:
        args.model_one = args.model
        print(json.dumps(child(args)), flush=True)
        return
    only = set(args.only.split(","))
    unknown = only - {"step", "rigl", "inject", "io", "export"}
    if unknown:
        raise SystemExit(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    names = {"sd15": "SD-1.5 UNet (860M)", "dit-xl": "DiT-XL/2 size (750M)"}
    for name in args.model.split(","):
        if name not in names:
            raise SystemExit(f"unknown model {name!r}: choose sd15 or dit-xl")
    for name in args.model.split(","):  # each model its own section of RESULTS.md: a run of one keeps the other's
        run = Run.start(args.device)
        args.model_one = name
        rows = measure_model(args, only)
        title = (
            f"{names[name]}{' (tiny config)' if args.tiny else ''}: batch 1, latents 4x32x32, "
            f"{args.rounds} rounds x {args.steps} steps; load average {os.getloadavg()[0]:.2f} at its end"
        )
        heading = f"Real-size models (`bench_scale.py`): {names[name]}"
        report(
            run,
            f"bench_scale-{name}",
            heading,
            [table(title, rows)],
            args.write_results,
            args.results_file,
            threads="1 (each child)",
        )


if __name__ == "__main__":
    main()
