"""The library never imports the command line (``make demo`` and ``surgeon reproduce`` included)."""
import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "surgeon"


def test_no_library_module_imports_the_cli():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            offenders += [f"{path.relative_to(LIBRARY)}: {n}" for n in names
                          if n.startswith("surgeon.cli") or n.lstrip(".").startswith("cli")]
    assert offenders == []


def test_the_demo_recipes_are_valid():
    from surgeon.demo import recipes

    (dense_name, _, dense), (rigl_name, s, rigl) = recipes(steps=50)
    assert (dense_name, dense.algorithm, rigl_name, rigl.algorithm, s) == ("dense", "dense", "rigl", "rigl", 0.5)
    assert dense.training.steps == rigl.training.steps == 50 and rigl.dst.delta_t == 5
