"""The size rule of `modeling/`: no module over 450 lines, no function or method over 80 (the function
rule also holds in `pipeline/`).

Read from the source with `ast`, not by importing. A function's length is `end_lineno - lineno + 1`: its
`def` line (decorators not counted) through its last line, docstring and comments included; a nested
function counts on its own and inside the function that holds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "modeling"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def oversized(source: str, name: str) -> list[str]:
    """The offenders of one module's source: the module itself and each function or method too long."""
    found = []
    n_lines = len(source.splitlines())
    if n_lines > MAX_MODULE_LINES:
        found.append(f"{name}: {n_lines} lines (module, max {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines (max {MAX_FUNCTION_LINES})")
    return found


def test_the_size_check_finds_long_modules_and_functions() -> None:
    short = "def f():\n    return 1\n"
    assert oversized(short, "m.py") == []
    long_function = "class C:\n    def g(self):\n" + "        x = 1\n" * 80 + "        return x\n"
    assert oversized(long_function, "m.py") == ["m.py:2 g: 82 lines (max 80)"]
    long_module = "x = 1\n" * 451
    assert oversized(long_module, "m.py") == ["m.py: 451 lines (module, max 450)"]


def test_modeling_modules_and_functions_stay_small() -> None:
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        offenders += oversized(path.read_text(), str(path.relative_to(ROOT.parent)))
    assert not offenders, "too long in modeling/ (split along a seam):\n" + "\n".join(offenders)


def test_pipeline_functions_stay_short() -> None:
    """`pipeline/` holds thin recipes: the function rule applies (an asset's modules may grow longer)."""
    offenders = []
    for path in sorted((ROOT.parent / "pipeline").rglob("*.py")):
        found = oversized(path.read_text(), str(path.relative_to(ROOT.parent)))
        offenders += [line for line in found if "(module," not in line]
    assert not offenders, "too long in pipeline/ (move the logic into modeling/):\n" + "\n".join(offenders)
