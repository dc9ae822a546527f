"""The README's promises: its Python example runs, and the commands it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from surgeon.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)  # it writes its output folder relative to the working directory
    exec(compile(code, str(ROOT / "README.md"), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "sparse-unet" / "model.safetensors").is_file()


def test_make_targets_it_names_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README, re.MULTILINE):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"README runs `make {target}`, the Makefile lacks it"
    assert "make test" in README and "make demo" in README


def test_cli_commands_it_shows_are_registered():
    registered = set(typer.main.get_command(app).commands)
    shown = set(re.findall(r"^surgeon (\w[\w-]*)", README, re.MULTILINE))
    assert shown and shown <= registered, f"README shows unregistered commands: {sorted(shown - registered)}"
