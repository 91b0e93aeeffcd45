"""The import graph of `modeling/`: no cycles, no dagster, mlflow only in the registry, its gate and the
pyfunc.

The graph is read from the source with `ast`, not by importing: every `import modeling...` and
`from modeling... import ...` counts, at module level or inside a function (a lazy import is still a
dependency). `from modeling.x import y` is an edge to `modeling.x.y` when that is a module, else to
`modeling.x`. Importing a submodule also runs its packages' `__init__`, but that is not an edge here: a
package's `__init__` may import its own submodules lazily without making a cycle.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

PACKAGE = "modeling"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module and package of `modeling/`."""
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a `from X import ...` (a relative X resolved against `module`)."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between `modeling` modules, the top-level package names each module imports)."""
    files = _module_files()
    edges: dict[str, set[str]] = {name: set() for name in files}
    externals: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # every statement, inside functions and classes too
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files:  # `import modeling.a.b`: the edge is to modeling.a.b
                        edges[name].add(alias.name)
                    externals[name].add(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, name, path.name == "__init__.py")
                targets = [f"{base}.{alias.name}" for alias in node.names]
                modules = [t for t in targets if t in files]
                # `from modeling.x import y`: the module `modeling.x.y` when it is one, else `modeling.x`
                if base in files and len(modules) < len(targets):
                    modules.append(base)
                edges[name].update(modules)
                externals[name].add(base.split(".")[0])
    return edges, externals


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found is not None:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found is not None:
                return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_the_graph_sees_every_kind_of_import() -> None:
    edges, externals = import_graph()
    assert "modeling.data.corpus" in edges["modeling.train"]  # from modeling.data.corpus import (...)
    assert "modeling.checkpointing" in edges["modeling.train"]  # from modeling import checkpointing
    assert "modeling.experiment" in edges["modeling.run_job"]  # inside main()
    assert "modeling.mlflow_registry" in edges["modeling.experiment"]  # inside a function
    assert "modeling.backbones" in edges["modeling.backbones.smollm2"]  # a name of a package's __init__
    assert "mlflow" in externals["modeling.mlflow_registry"]


def test_modeling_has_no_import_cycle() -> None:
    edges, _ = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle in modeling/: " + " -> ".join(cycle or [])


def test_modeling_never_imports_dagster() -> None:
    """The training child runs on a bare GPU image: only the small `dagster-pipes` package is allowed
    (`modeling.pipes_reporting`, imported only when the orchestrator launched the process)."""
    _, externals = import_graph()
    offenders = sorted(name for name, packages in externals.items() if "dagster" in packages)
    assert not offenders, f"modules of modeling/ importing dagster: {offenders}"


def test_only_the_registry_and_the_pyfunc_import_mlflow() -> None:
    edges, externals = import_graph()
    importers = sorted(name for name, packages in externals.items() if "mlflow" in packages)
    # the registry is two modules: the store, runs and versions, and the champion gate over them
    expected = ["modeling.champion_gate", "modeling.mlflow_registry", "modeling.pyfunc_model"]
    assert importers == expected, importers
    # the code MLflow ships with a model never pulls in the gate (or anything else of the registry)
    assert "modeling.champion_gate" not in edges["modeling.pyfunc_model"]
    assert "modeling.mlflow_registry" not in edges["modeling.pyfunc_model"]


def test_planning_a_training_run_imports_no_torch() -> None:
    """The orchestrator plans a run (profiles, the job contract, prompt settings, file fingerprints) without
    torch: checked in a fresh interpreter, where nothing imported it before."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import modeling.backbones.files, modeling.job, modeling.plan, modeling.profiles\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_modeling_imports_on_the_gpu_image_without_dagster_mlflow_or_duckdb() -> None:
    """The GPU image has torch, transformers, peft and accelerate only: every module of modeling/ imports
    there except the warehouse's (modeling/data's DuckDB modules) and the registry's (MLflow). Checked in
    a fresh interpreter where those packages look uninstalled (`find_spec` answers None, as for a
    package that is not there, so libraries probing for them see them missing, not broken)."""
    import subprocess
    import sys

    code = (
        "import importlib, json, pkgutil, sys\n"
        "HIDDEN = {'duckdb', 'dagster', 'mlflow', 'dagster_pipes', 'dagster_duckdb'}\n"
        "class Hide:\n"
        "    def __init__(self, inner): self.inner = inner\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN or not hasattr(self.inner, 'find_spec'): return None\n"
        "        return self.inner.find_spec(name, path, target)\n"
        "    def __getattr__(self, attr): return getattr(self.inner, attr)\n"
        "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n"
        "import modeling\n"
        "failed = {}\n"
        "for m in pkgutil.walk_packages(modeling.__path__, 'modeling.'):\n"
        "    try: importlib.import_module(m.name)\n"
        "    except ImportError as e: failed[m.name] = str(e)\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    registry = {"modeling.champion_gate", "modeling.mlflow_registry", "modeling.pyfunc_model"}
    assert {m for m, why in failed.items() if "mlflow" in why} == registry
    warehouse = {m for m, why in failed.items() if "duckdb" in why}
    assert warehouse and all(m.startswith("modeling.data.") for m in warehouse), sorted(warehouse)
    assert set(failed) == registry | warehouse, failed  # nothing else (dagster is never imported)
