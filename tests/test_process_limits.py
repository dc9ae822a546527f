"""The process's own limits end in one line: a closed output pipe, Ctrl-C at start-up, a file-size limit (as a full
disk behaves), and paths that are not valid UTF-8. Each runs the real console script in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from helpers_train import REPO, subprocess_env

SURGEON = REPO / ".venv" / "bin" / "surgeon"


def test_a_closed_output_pipe_ends_the_command_quietly():
    """`surgeon sparsify --help | head`: the reader is gone before the help is written (the pipe is closed before the
    command starts, so every write fails): nothing on stderr, no "error: BrokenPipeError", no "Exception ignored".
    ``inspect --json`` writes through click's echo, which reached the catch-all before."""
    for args in (["sparsify", "--help"], ["inspect", "tiny-unet", "--json"], ["--version"]):
        read, write = os.pipe()
        os.close(read)
        proc = subprocess.run([str(SURGEON), *args], stdout=write, stderr=subprocess.PIPE, env=subprocess_env())
        os.close(write)
        assert proc.stderr.decode() == "", proc.stderr.decode()
        assert proc.returncode != 0  # the output was not delivered; the shell may say so, the command does not


def test_a_pipe_closed_after_the_first_line_ends_quietly():
    proc = subprocess.Popen(
        [str(SURGEON), "sparsify", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()
    )
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    proc.wait(timeout=120)
    stderr = proc.stderr.read().decode()
    assert "error" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def _before_the_guard(text: str) -> bool:
    """The traceback of an interrupt that landed before ``main()`` began: in pip's console-script wrapper or while
    it imported the guard's own modules (a few ms). Before, surgeon imported importlib.metadata there (tens of ms):
    a traceback through it, or through anything ``main()`` runs, is refused."""
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', text)
    own = [f for f, _ in frames if "/surgeon/" in f or f.endswith("cli/entry.py")]
    heavy = any(f.endswith("surgeon/version.py") or "importlib/metadata" in f for f, _ in frames)
    in_main = any(f.endswith("cli/entry.py") and fn == "main" for f, fn in frames)
    return bool(frames) and not heavy and not in_main and all(f.endswith("__init__.py") or "errors" in f for f in own)


def test_ctrl_c_at_start_up_never_prints_a_traceback():
    """Interrupts delivered at many moments of the first 150 ms: once surgeon's code runs, each run ends with one
    line (or in silence), never with a traceback. (An interrupt while the interpreter itself still imports site.py
    is Python's to report.)"""
    import surgeon.cli.entry  # noqa: F401 - the guard module itself must import no heavy module

    for delay in [i / 100 for i in range(0, 16)]:
        proc = subprocess.Popen(
            [str(SURGEON), "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        text = err.decode()
        if "Fatal Python error: init_" in text:
            continue  # the interpreter itself was still starting (streams, site.py): no code of surgeon ran yet
        if "Traceback" in text and _before_the_guard(text):
            continue  # while the console script imported the guard itself (a few ms of tiny modules)
        assert "Traceback" not in text, f"after {delay:.2f} s:\n{text}"
        if proc.returncode == 130:
            assert text == "error: interrupted\nhint: nothing was written; run the command again\n", text


def test_importing_surgeon_does_not_import_importlib_metadata():
    code = "import sys, surgeon.cli.entry; print('importlib.metadata' in sys.modules)"
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", code], capture_output=True, env=subprocess_env()
    )
    assert out.stdout.decode().strip() == "False", out.stderr.decode()


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
from surgeon.cli.entry import main
sys.argv = ["surgeon", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    "args, target",
    [
        (["export", "tiny-unet", "--out", "big"], "big"),
        (["export", "tiny-unet", "--out", "big.safetensors"], "big.safetensors"),
        (["sparsify", "tiny-unet", "--data", "images", "--steps", "1", "--batch-size", "2", "--out", "run"], "run"),
    ],
    ids=["folder", "file", "training-run"],
)
def test_a_file_size_limit_is_one_error_naming_the_file(tmp_path, args, target):
    from helpers import write_images

    write_images(tmp_path / "images", n=4)
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", LIMITED, *args, "--no-progress"]
        + (["--no-samples"] if args[0] == "sparsify" else []),
        cwd=tmp_path,
        capture_output=True,
        env={**subprocess_env(), "SURGEON_CACHE": str(tmp_path / "cache")},
    )
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1, err
    assert len(lines) == 2 and lines[0].startswith("error: cannot write ") and "File too large" in lines[0], err
    assert lines[1] == "hint: the file is larger than this process may write (ulimit -f): raise the limit or write less"
    assert target in lines[0]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("images", "cache"))
    assert leftovers in ([], ["run"]), leftovers  # a training run keeps its log; an export leaves nothing
    if target != "run":
        assert not (tmp_path / target).exists()


def test_a_path_that_is_not_utf8_is_shown_escaped(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9"
    proc = subprocess.run([os.fsencode(SURGEON), b"inspect", name], capture_output=True, env=subprocess_env())
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert "caf\\xe9" in err.splitlines()[0] and err.splitlines()[1].startswith("hint: "), err


def test_a_saved_model_under_a_path_that_is_not_utf8_is_refused_by_name(tmp_path):
    import surgeon
    from surgeon.errors import SurgeonError

    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    surgeon.save(surgeon.load_model("tiny-unet"), folder)  # writing works; safetensors cannot open such a path
    with pytest.raises(SurgeonError, match="its path is not valid UTF-8") as info:
        surgeon.load(folder)
    assert info.value.hint == "rename the file or folder to a UTF-8 name"
