"""The package as users install it: the wheel built from this checkout, installed by pip into a fresh virtual
environment that cannot see the checkout, runs every command through its own ``surgeon`` console script.

The editable install the rest of the suite runs on imports straight from the checkout, so it hides a module the
wheel leaves out; only an installed wheel shows that. The fresh environment reuses the test environment's
installed dependencies through a path line in a ``.pth`` file (no download: seconds, not a second torch). A path
line only extends ``sys.path``; the ``.pth`` files in that folder, the editable install's finder among them, do not
run, so nothing of the checkout leaks in (checked: ``surgeon.__file__`` lies in the fresh environment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import write_images

REPO = Path(__file__).resolve().parents[1]
# what a checkout holds besides its sources: never part of the build
NOT_SOURCES = {".git", ".venv", "build", "dist", "runs", "out", ".pytest_cache", ".hypothesis", ".mypy_cache"}
PARALLEL = 2  # commands in flight at once: the machines this runs on have two cores

# One process loads every export back twice, through the installed CLI (``surgeon inspect``, in-process: a
# process per export would pay the seconds of importing torch and diffusers four more times) and through
# ``surgeon.load`` (``surgeon.load_model`` for the dense export, a plain diffusers folder), whose outputs must match
# the model each export came from.
LOAD_BACK = """
import json
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app

site = Path(surgeon.__file__).resolve().parents[1]
assert site.is_relative_to(Path(sys.prefix).resolve()), surgeon.__file__
assert [Path(p).resolve() for p in sys.path if p and (Path(p) / "surgeon").exists()] == [site], sys.path
x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
t = torch.tensor([3, 10])


def denoise(model):
    model.eval()
    with torch.no_grad():
        return model(x, t).sample


totals = {}
for exported, (source, loader) in json.loads(sys.argv[1]).items():
    result = CliRunner().invoke(app, ["inspect", exported, "--json", "--nm", "2:4"])
    assert result.exit_code == 0, result.output
    totals[exported] = json.loads(result.stdout)["totals"]
    back, original = getattr(surgeon, loader)(exported), surgeon.load(source)
    torch.testing.assert_close(denoise(back), denoise(original), rtol=1e-4, atol=1e-5, msg=exported)
print(json.dumps({"surgeon": surgeon.__file__, "totals": totals}))
"""


def _copy_sources(dest: Path) -> Path:
    """The checkout without its venv, VCS data and build leftovers: setuptools writes build/ and *.egg-info into
    the tree it builds, and a stale build/lib would ship files the checkout no longer has."""
    dest.mkdir()
    for entry in REPO.iterdir():
        if entry.name in NOT_SOURCES or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, dest / entry.name)
    return dest


def _clean_env(tmp: Path) -> dict[str, str]:
    """The caller's environment without anything that points Python at the checkout or the test venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.update(
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        SURGEON_CACHE=str(tmp / "cache"),
        MPLCONFIGDIR=str(tmp / "mpl"),
    )
    return env


def _sees_checkout(entry: str) -> bool:
    path = Path(entry).resolve()
    inside = path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())
    return inside or (path / "surgeon").exists()


def _run(cmd: list, cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _run_all(cwd: Path, env: dict[str, str], *commands: list) -> list[str]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(lambda cmd: _run(cmd, cwd, env), commands))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp / "src")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip_wheel, "--wheel-dir", tmp / "dist", src], tmp, _clean_env(tmp))
    (found,) = (tmp / "dist").glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(fresh venv, work folder outside the checkout, environment) with the wheel installed and nothing else."""
    tmp = tmp_path_factory.mktemp("installed")
    assert not tmp.resolve().is_relative_to(REPO)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = _clean_env(tmp)
    own = json.loads(_run([python, "-c", "import json, sys; print(json.dumps(sys.path))"], tmp, env))
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).strip()
    deps = [p for p in sys.path if p and Path(p).is_dir() and p not in own and not _sees_checkout(p)]
    Path(site, "_deps_from_tests.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp, env)
    work = tmp / "work"
    write_images(work / "images", n=8)
    return env_dir, work, env


def test_wheel_ships_every_module_under_surgeon_and_no_other_top_level_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert {n.split("/")[0] for n in names} == {"surgeon", *dist_info}, "the wheel adds top-level names"
    expected = {f"surgeon/{p.relative_to(REPO / 'surgeon').as_posix()}" for p in (REPO / "surgeon").rglob("*.py")}
    expected |= {f"surgeon/cli/{p.relative_to(REPO / 'cli').as_posix()}" for p in (REPO / "cli").rglob("*.py")}
    expected |= {f"surgeon/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    assert len([n for n in expected if n.endswith(".yaml")]) >= 4
    missing = sorted(expected - names)
    assert not missing, f"the wheel leaves out {missing}"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "surgeon = surgeon.cli.entry:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_console_script_trains_exports_and_loads_back(installed, wheel):
    env_dir, work, env = installed
    surgeon = env_dir / "bin" / "surgeon"
    tiny = ["--steps", 2, "--batch-size", 4, "--data", "images"]
    version, table, _, _ = _run_all(
        work,
        env,
        [surgeon, "--version"],
        [surgeon, "inspect", "tiny-unet", "--json"],
        [surgeon, "sparsify", "tiny-unet", "--recipe", "rigl", "--s", 0.5, *tiny, "--out", "sparse"],
        [surgeon, "finetune", "--teacher", "tiny-unet", "--nm", "2:4", *tiny, "--out", "ft"],
    )
    assert version.strip() == f"surgeon {wheel.name.split('-')[1]}"
    rows = json.loads(table)["rows"]
    assert {"conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"} <= {row["name"] for row in rows}
    assert (work / "sparse" / "model").is_dir() and (work / "ft" / "model").is_dir()

    formats = {"dense": "sparse", "packed": "sparse", "csr": "sparse", "semi-structured": "ft"}
    _run_all(
        work,
        env,
        *[[surgeon, "export", f"{run}/model", "--format", f, "--out", f"e-{f}"] for f, run in formats.items()],
    )

    exports = {f"e-{f}": (f"{run}/model", "load_model" if f == "dense" else "load") for f, run in formats.items()}
    out = _run([env_dir / "bin" / "python", "-c", LOAD_BACK, json.dumps(exports)], work, env)
    loaded = json.loads(out.splitlines()[-1])
    assert Path(loaded["surgeon"]).is_relative_to(env_dir)
    for exported, totals in loaded["totals"].items():
        if exported == "e-semi-structured":
            assert totals["nm_valid_layers"] == totals["nm_applicable_layers"] > 0, totals
        else:
            assert totals["sparsity"] == pytest.approx(0.5, abs=1e-3), (exported, totals)
