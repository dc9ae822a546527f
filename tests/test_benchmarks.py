"""The benchmark scripts' one results writer: each script replaces its own section of RESULTS.md and nothing else,
and every script's table-making path runs (tiny configurations: this measures nothing)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    """A module of benchmarks/ imported as its scripts import each other: by bare name, from that folder."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


results = bench("results")

HAND = "# Measured results\n\nHand-written intro, with a trailing space \nand ≤ non-ASCII.\r\n\n"
OTHER = "<!-- other: begin -->\n## Other\n\nkeep | me\n<!-- other: end -->\n"
NOTES = "\nNotes under a section, written by hand.\n"


def sample(body: str) -> str:
    return HAND + "<!-- mine: begin -->\n" + body + "\n<!-- mine: end -->\n" + NOTES + OTHER


def test_a_section_is_replaced_and_everything_else_kept_byte_for_byte(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_bytes(sample("old numbers").encode())
    results.write_section(path, "mine", "new numbers\n\n| a |\n|---|")
    assert path.read_bytes() == sample("new numbers\n\n| a |\n|---|").encode()
    results.write_section(path, "other", "## Other\n\nnew")
    text = path.read_bytes().decode()
    assert text.startswith(sample("new numbers\n\n| a |\n|---|")[: -len(OTHER)])
    assert text.endswith("<!-- other: begin -->\n## Other\n\nnew\n<!-- other: end -->\n")


def test_a_missing_section_is_appended_and_a_missing_file_created(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.write_section(path, "mine", "first")
    assert path.read_text() == "# Measured results\n\n<!-- mine: begin -->\nfirst\n<!-- mine: end -->\n"
    before = path.read_bytes()
    results.write_section(path, "second", "two")
    after = path.read_bytes()
    assert after.startswith(before)
    assert after[len(before) :] == b"\n<!-- second: begin -->\ntwo\n<!-- second: end -->\n"
    no_newline = tmp_path / "bare.md"
    no_newline.write_bytes(b"text")
    results.write_section(no_newline, "mine", "x")
    assert no_newline.read_bytes() == b"text\n\n<!-- mine: begin -->\nx\n<!-- mine: end -->\n"


@pytest.mark.parametrize(
    "broken",
    [
        HAND + "<!-- mine: begin -->\nnumbers, and the end marker lost\n" + NOTES + OTHER,
        HAND + NOTES + "<!-- mine: end -->\n" + OTHER,
        HAND + "<!-- mine: end -->\n<!-- mine: begin -->\n" + OTHER,
        sample("a") + "<!-- mine: begin -->\n",
    ],
    ids=["begin-without-end", "end-without-begin", "end-before-begin", "two-begins"],
)
def test_broken_markers_are_refused_and_the_file_is_unchanged(tmp_path, broken):
    path = tmp_path / "RESULTS.md"
    path.write_bytes(broken.encode())
    with pytest.raises(SurgeonError) as e:
        results.write_section(path, "mine", "new")
    assert "<!-- mine: begin -->" in e.value.message and e.value.hint
    assert path.read_bytes() == broken.encode()


def test_a_refused_file_ends_the_script_with_one_error_and_one_hint_line(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    path.write_text("<!-- mine: begin -->\nno end\n")
    run = results.Run.start("cpu", argv=["benchmarks/bench_x.py"])
    with pytest.raises(SystemExit) as e:
        results.report(run, "mine", "Mine", [], write=True, path=path)
    lines = str(e.value.code).splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert path.read_text() == "<!-- mine: begin -->\nno end\n"


def test_without_write_results_a_run_only_prints(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    results.add_arguments(parser)
    args = parser.parse_args([])
    assert args.write_results is False and args.results_file == BENCHMARKS / "RESULTS.md"
    path = tmp_path / "RESULTS.md"
    path.write_bytes(sample("kept").encode())
    table = results.Table("", ("measure", "value"), [("step", "1.0 ms")])
    run = results.Run.start("cpu", argv=["benchmarks/bench_x.py"])
    results.report(run, "mine", "Mine", [table], write=args.write_results, path=path)
    assert "| step    | 1.0 ms |" in capsys.readouterr().out
    assert path.read_bytes() == sample("kept").encode()


def test_the_file_is_replaced_in_one_rename_and_a_failed_write_leaves_it_whole(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_bytes(sample("old").encode())
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        # at the rename the file still holds its old text and the temporary sibling the whole new one
        seen.append((Path(dst).read_bytes(), Path(src).read_bytes(), Path(src).parent))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    results.write_section(path, "mine", "new")
    assert seen == [(sample("old").encode(), sample("new").encode(), tmp_path)]
    monkeypatch.setattr(os, "replace", real_replace)

    def half_then_full_disk(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    real_write = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", half_then_full_disk)
    with pytest.raises(SurgeonError):
        results.write_section(path, "mine", "newer")
    assert path.read_bytes() == sample("new").encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]


def test_the_header_says_what_the_run_was(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = results.Run.start("cpu", argv=[str(BENCHMARKS / "bench_x.py"), "--threads", "1", "--note", "a b"])
    header = run.header(threads=1)
    assert "OMP_NUM_THREADS=1 " in run.command
    assert run.command.endswith("benchmarks/bench_x.py --threads 1 --note 'a b'")
    for label in ("machine:", "cores", "GiB RAM", "date:", " UTC", "command:", "torch ", "threads: 1", "device cpu"):
        assert label in header, header
    assert "at start," in header and "at end" in header


def test_a_table_lines_up_and_refuses_a_short_row():
    table = results.Table("T", ("name", "ratio"), [("a", "1.000"), ("longer name", "0.5")], align="lr")
    assert table.markdown().splitlines() == [
        "T",
        "",
        "| name        | ratio |",
        "|-------------|------:|",
        "| a           | 1.000 |",
        "| longer name |   0.5 |",
    ]
    with pytest.raises(ValueError):
        results.Table("T", ("name", "ratio"), [("a",)]).markdown()


# --- every script's table-making path, tiny -------------------------------------------------------------------------

TINY_RUNS = {
    "bench_storage": ["--repeats", "1", "--batch", "1"],
    "bench_training": ["--repeats", "1", "--warmup", "0", "--batch", "2"],
    "bench_finetune": ["--repeats", "1", "--warmup", "0", "--batch", "2"],
    "bench_export": ["--repeats", "2"],
}
ROWS = {
    "bench_storage": ["| file bytes, S=0.9", "| fwd+bwd time, S=0.5"],
    "bench_training": ["| (a) masked / dense step", "| (b) MagRan update, amortized at ΔT_e=100"],
    "bench_finetune": ["| STE / dense", "| STE + teacher / dense"],
    "bench_export": ["| dit 2:4 fp16", "| chirodiff step, csr all / dense", "| dit(hidden 1024) 2:4 step / dense step"],
}


@pytest.mark.parametrize("script", sorted(TINY_RUNS))
def test_a_tiny_run_prints_its_table_and_writes_it_into_its_section(tmp_path, capsys, script):
    main = bench(script).main
    path = tmp_path / "RESULTS.md"
    path.write_bytes(sample("kept").encode())
    main(["--tiny", "--threads", "1", *TINY_RUNS[script], "--results-file", str(path), "--write-results"])
    printed = capsys.readouterr().out
    text = path.read_bytes().decode()
    assert text.startswith(sample("kept"))
    begin, end = f"<!-- {script}: begin -->\n", f"\n<!-- {script}: end -->"
    written = text[text.index(begin) + len(begin) : text.index(end)]
    assert written in printed  # stdout shows what the file holds
    assert written.startswith("## ") and f"`{script}.py`" in written.splitlines()[0]
    for row in ROWS[script]:
        assert row in written, written


def test_the_scale_and_prune_tables_go_into_their_sections(tmp_path):
    scale, prune = bench("bench_scale"), bench("bench_prune")
    path = tmp_path / "RESULTS.md"
    run = results.Run.start("cpu", argv=["benchmarks/bench_scale.py"])
    rows = [("dense training step", "1.00 s", ""), ("↳ per-round ratios", "1.010 0.990", "")]
    results.report(run, "bench_scale", "Real-size", [scale.table("SD", rows)], write=True, path=path)
    rows = [("dit", 1, "2:4", "magnitude", 1.0, 1.0, 900.0, 800.0), ("dit", 1, "2:4", "wanda", 3.0, 3.0, 950.0, 800.0)]
    results.report(run, "bench_prune", "Pruning", [prune.table(16, 16, rows)], write=True, path=path)
    text = path.read_text()
    assert "### SD" in text and "| ↳ per-round ratios  | 1.010 0.990 |" in text
    assert "| dit   |       1 | 2:4     | wanda     |    3.00 |         3.0 |      950 |    150 |" in text
    assert text.index("<!-- bench_scale: end -->") < text.index("<!-- bench_prune: begin -->")
