"""The architecture of docs/architecture.md, held over every import statement of the library and the CLI, the
ones inside functions included: lower layers never import higher ones, and no two modules import each other
(directly or around a longer loop)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"surgeon": ROOT / "surgeon", "surgeon.cli": ROOT / "cli"}

# lowest first; a unit may import its own modules and any unit before it, never one after it
LAYERS = [
    ("surgeon.errors", "surgeon.progress", "surgeon.seeding", "surgeon.version"),
    ("surgeon.io",),
    ("surgeon.sparsity",),
    ("surgeon.recipe",),
    ("surgeon.data",),
    ("surgeon.tasks",),
    ("surgeon.models",),
    ("surgeon.masking",),
    ("surgeon.formats",),
    ("surgeon.algorithms",),
    ("surgeon.evaluation",),
    ("surgeon.training",),
    ("surgeon.study",),
    ("surgeon",),  # the public API: lazy names in surgeon/__init__.py
    ("surgeon.cli",),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = modules()


def unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage, or the top-level module itself."""
    if module == "surgeon.cli" or module.startswith("surgeon.cli."):
        return "surgeon.cli"
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def imports(module: str, path: Path) -> set[str]:
    """Every surgeon module that ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from package import module` imports the module; `from module import name` the module itself
            subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES]
            out |= set(subs) or {name}
    return {name for name in out if name == "surgeon" or name.startswith("surgeon.")}


GRAPH = {module: imports(module, path) for module, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    assert sorted(m for m in MODULES if unit(m) not in RANK) == []


def test_imports_run_downward():
    upward = [
        f"{m} imports {dep}"
        for m, deps in GRAPH.items()
        for dep in deps
        if unit(dep) != unit(m) and RANK[unit(dep)] > RANK[unit(m)]
    ]
    assert upward == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a list of its modules."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_checks_can_fail():
    """The rules above catch what they are for: an upward import and a loop of two modules."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert RANK[unit("surgeon.masking.surgery")] < RANK[unit("surgeon.training.loop")]
    assert unit("surgeon.cli.common") == "surgeon.cli" and unit("surgeon.recipe") == "surgeon.recipe"


@pytest.mark.parametrize("folder", ["surgeon"])
def test_the_top_level_stays_small(folder):
    top = sorted(p.name for p in (ROOT / folder).glob("*.py"))
    assert len(top) <= 8, top


def test_the_demo_recipes_are_valid():
    from surgeon.study.demo import recipes

    (dense_name, _, dense), (rigl_name, s, rigl) = recipes(steps=50)
    assert (dense_name, dense.algorithm, rigl_name, rigl.algorithm, s) == ("dense", "dense", "rigl", "rigl", 0.5)
    assert dense.training.steps == rigl.training.steps == 50 and rigl.dst.delta_t == 5
