"""Ctrl-C at any moment of a command, the imports included, ends in one line and exit status 130."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import assert_one_error, invoke
from helpers_train import one_thread  # noqa: F401

# ---- Ctrl-C before training starts ----------------------------------------------------------------------------------


def test_importing_surgeon_is_light_so_ctrl_c_is_caught_from_the_first_instant():
    # torch takes seconds to import; the console script installs its guard first, and `import surgeon` must not
    # drag torch in before it
    code = (
        "import sys, surgeon.cli.entry; print(sorted(m for m in ('torch', 'diffusers', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _InterruptImport:
    """A meta-path finder that raises KeyboardInterrupt when ``name`` is imported: Ctrl-C in mid-import."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_cli_imports_exits_130_with_one_line(monkeypatch, capsys):
    from surgeon.cli import entry

    monkeypatch.delitem(sys.modules, "surgeon.cli.app", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport("surgeon.cli.app"), *sys.meta_path])
    with pytest.raises(SystemExit) as info:
        entry.main()
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: interrupted", "hint: nothing was written; run the command again"]


def test_ctrl_c_while_a_command_loads_its_model_exits_130_with_one_line(tmp_path, monkeypatch):
    import surgeon.formats.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgeon.formats.loading, "load_model", interrupted)
    out = tmp_path / "run"
    error, _ = assert_one_error(invoke("sparsify", "tiny-unet", "--out", out, "--no-progress"), code=130)
    assert error == "error: interrupted" and not out.exists()
