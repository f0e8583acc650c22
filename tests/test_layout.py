"""The layout rules: no import cycle in `resadapt`, the core never imports a stage module, and every DVC
stage declares exactly the `resadapt` files its notebook runs (so editing one re-runs the stage).

`python tests/test_layout.py` prints each stage's closure, ready to paste into dvc.yaml.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resadapt"


def module_file(name: str) -> Path | None:
    """The file of module `resadapt.x.y` (a module or a package's __init__), None if there is none."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(source: str) -> set[str]:
    """`resadapt` modules an import statement anywhere in `source` names (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "resadapt"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "resadapt":
                continue
            out.add(node.module)
            # `from resadapt.stages import train` imports the submodule resadapt.stages.train
            out |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {m for m in out if module_file(m)}


def import_graph() -> dict[str, set[str]]:
    """Explicit imports between `resadapt` modules."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = imported_modules(path.read_text()) - {name}
    return graph


def closure(modules: set[str], graph: dict[str, set[str]]) -> set[str]:
    """Every module that runs when `modules` are imported: their imports, transitively, and the parent
    packages' __init__ of each (Python executes those first)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.get(m, set())
    return seen


def notebook_imports(notebook: Path) -> set[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return imported_modules("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))


def stage_closures() -> dict[str, tuple[list[str], list[str]]]:
    """For each dvc.yaml stage: (declared resadapt deps, the files its notebook's import closure holds)."""
    graph = import_graph()
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        deps = [d for d in stage["deps"]]
        notebook = next(d for d in deps if d.endswith(".ipynb"))
        files = {module_file(m) for m in closure(notebook_imports(ROOT / notebook), graph)}
        expected = sorted(str(f.relative_to(ROOT)) for f in files)
        out[name] = (sorted(d for d in deps if d.startswith("resadapt")), expected)
    return out


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_core_never_imports_a_stage_module():
    offenders = {
        m: sorted(n for n in deps if n.startswith("resadapt.stages"))
        for m, deps in import_graph().items()
        if not m.startswith("resadapt.stages") and m != "resadapt.cli"
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_dvc_deps_are_the_exact_import_closure():
    wrong = {name: (d, e) for name, (d, e) in stage_closures().items() if d != e}
    lines = [
        f"{name}: missing {sorted(set(e) - set(d))}, not imported {sorted(set(d) - set(e))}"
        for name, (d, e) in wrong.items()
    ]
    assert not wrong, "dvc.yaml deps differ from the notebooks' import closure:\n" + "\n".join(lines)


def test_the_closure_follows_function_level_and_package_imports(tmp_path):
    graph = {"resadapt.a": {"resadapt.stages.b"}, "resadapt.stages.b": set()}
    assert closure({"resadapt.a"}, graph) == {
        "resadapt",
        "resadapt.a",
        "resadapt.stages",
        "resadapt.stages.b",
    }
    src = "def f():\n    from resadapt.stages import train\n    import resadapt.budget\n"
    assert imported_modules(src) == {"resadapt.stages", "resadapt.stages.train", "resadapt.budget"}


if __name__ == "__main__":
    for name, (_, expected) in stage_closures().items():
        print(f"{name}:")
        print("\n".join(f"      - {f}" for f in expected))
