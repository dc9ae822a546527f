"""The one writer of ``benchmarks/RESULTS.md``: each benchmark script replaces its own marked section.

    run = results.Run.start(device="cpu")           # before measuring: date, command line, load average
    ...                                             # measure
    tables = [results.Table("...", ("measure", "value", "target"), rows, align="lrl")]
    results.report(run, "bench_storage", "Packed storage and mask overhead (`bench_storage.py`)", tables,
                   write=args.write_results, path=args.results_file)

``report`` prints the section to stdout and, only with ``--write-results``, puts the same text between
``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` in the results file (appended when the file has no such
section), so a developer's trial run changes nothing. Everything outside the markers (other scripts' sections,
hand-written notes) is kept byte for byte. Each section starts with what the run was: machine, date, the command
line, torch version, threads, load average at start and end, device: on a shared machine the load says how far
to trust the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.atomic import atomic_path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
TITLE = "# Measured results\n"
# environment variables that change what a benchmark measures: shown in the command line when set
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The two options every benchmark script takes."""
    parser.add_argument(
        "--write-results", action="store_true", help="also write the table into its section of benchmarks/RESULTS.md"
    )
    parser.add_argument("--results-file", type=Path, default=RESULTS, help="the file --write-results writes")


# --- what the run was --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine() -> str:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = ram_gib()
    parts = [cpu_model(), f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")]
    parts += [f"{ram:.1f} GiB RAM"] if ram is not None else []
    return ", ".join(parts)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as it could be typed again: thread variables that were set, python, the script, its arguments."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    try:
        shown = str(script.resolve().relative_to(HERE.parent))
    except ValueError:
        shown = str(script)
    env = [f"{k}={os.environ[k]}" for k in THREAD_VARIABLES if k in os.environ]
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    prefix = [f"nice -n {niceness}"] if niceness else []
    python = os.path.abspath(sys.executable)  # not resolved: a venv's python is a link to the base one
    if python.startswith(str(HERE.parent) + os.sep):
        python = os.path.relpath(python, HERE.parent)
    return " ".join([*env, *prefix, shlex.join([python, shown, *argv[1:]])])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


@dataclass
class Run:
    """What a run was, taken when it starts (the load at its end is read when the section is made)."""

    machine: str
    date: str
    command: str
    load_start: str
    device: str

    @classmethod
    def start(cls, device: str, argv: Sequence[str] | None = None) -> Run:
        now = datetime.datetime.now(datetime.timezone.utc)
        return cls(machine(), f"{now:%Y-%m-%d %H:%M} UTC", command_line(argv), load_average(), device_name(device))

    def header(self, threads: int | str | None = None) -> str:
        import torch

        threads = torch.get_num_threads() if threads is None else threads
        return "\n".join(
            [
                f"- machine: {self.machine}",
                f"- date: {self.date}",
                f"- command: `{self.command}`",
                f"- torch {torch.__version__}, threads: {threads}, device {self.device}",
                f"- load average (1, 5, 15 min): {self.load_start} at start, {load_average()} at end",
            ]
        )


# --- tables --------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A markdown table padded to line up in a terminal too: what stdout shows is what the file holds."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    align: str = ""  # one "l" or "r" per column; missing ones are "l"

    def markdown(self) -> str:
        cells = [[str(c) for c in self.columns]] + [["" if v is None else str(v) for v in row] for row in self.rows]
        n = len(self.columns)
        if any(len(row) != n for row in cells):
            raise ValueError(f"every row of table {self.title!r} needs {n} cells")
        align = (self.align + "l" * n)[:n]
        widths = [max(3, *(len(row[i]) for row in cells)) for i in range(n)]

        def line(row: list[str]) -> str:
            return (
                "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)) + " |"
            )

        rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
        lines = [line(cells[0]), rule] + [line(row) for row in cells[1:]]
        return (f"{self.title}\n\n" if self.title else "") + "\n".join(lines)


def section(run: Run, heading: str, tables: Sequence[Table], threads: int | str | None = None) -> str:
    """The section's text between its markers: heading, what the run was, the tables."""
    return "\n\n".join([f"## {heading}", run.header(threads), *(t.markdown() for t in tables)])


# --- the file ------------------------------------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with ``name``'s section holding ``body`` (appended at the end when there is none); the rest is
    untouched. A section that is not exactly one begin marker followed by one end marker is refused, never
    guessed at: a missing end would otherwise take the rest of the file with it."""
    begin, end = markers(name)
    if begin in body or end in body:
        raise SurgeonError(f"the {name} section's text holds its own marker", "a table cell cannot contain it")
    n_begin, n_end = text.count(begin), text.count(end)
    if n_begin == n_end == 0:
        if not text.strip():
            text = TITLE
        gap = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        return f"{text}{gap}{begin}\n{body}\n{end}\n"
    start, stop = text.find(begin), text.find(end)
    if n_begin != 1 or n_end != 1 or stop < start:
        raise SurgeonError(
            f"the results file has {n_begin} '{begin}' and {n_end} '{end}' markers"
            + (" (end before begin)" if n_begin == n_end == 1 else ""),
            f"leave exactly one '{begin}' followed by one '{end}' (or neither) and run again",
        )
    return text[:start] + f"{begin}\n{body}\n" + text[stop:]


def write_section(path: Path, name: str, body: str) -> None:
    """Replace ``name``'s section of the file at ``path`` in one step (a temporary sibling renamed over it)."""
    path = Path(path)
    old = path.read_bytes().decode("utf-8") if path.exists() else ""
    new = replace_section(old, name, body)
    with atomic_path(path) as tmp:
        tmp.write_bytes(new.encode("utf-8"))


def report(
    run: Run,
    name: str,
    heading: str,
    tables: Sequence[Table],
    write: bool,
    path: Path = RESULTS,
    threads: int | str | None = None,
) -> str:
    """Print the section and, with ``write``, put it in ``path``; a refused file ends the script with one
    ``error:`` and one ``hint:`` line (exit status 1), the file unchanged."""
    body = section(run, heading, tables, threads)
    print("\n" + body + "\n", flush=True)
    if write:
        try:
            write_section(path, name, body)
        except SurgeonError as e:
            raise SystemExit(f"error: {e.message}\nhint: {e.hint}") from None
        print(f"wrote the {name} section of {path}", file=sys.stderr)
    return body
