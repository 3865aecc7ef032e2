"""The shape of the code: no import cycles, every module importable alone, one exception tree,
functions that read top to bottom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mlx_ft"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__main__")
LONG = 50  # lines of code (docstring excluded) before a function must say why it is long


def _imports(path: Path) -> set[str]:
    """mlx_ft modules that ``path`` imports anywhere: at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlx_ft.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mlx_ft":
                found |= {a.name for a in node.names if (PKG / f"{a.name}.py").exists()}
            elif node.module.startswith("mlx_ft."):
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {m: _imports(PKG / f"{m}.py") for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_of_mlx_ft_is_acyclic():
    graph = import_graph()
    assert graph["cli"] >= {"cli_train", "cli_eval", "cli_select"}  # the scan sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_statistics_and_reports_do_not_load_the_server():
    """pick-best does statistics: it must not pull in the HTTP server or the engines."""
    graph = import_graph()

    def reach(m: str, seen: set[str]) -> set[str]:
        for n in graph[m] - seen:
            seen.add(n)
            reach(n, seen)
        return seen

    for m in ("selection", "report", "results", "runs", "targets"):
        assert not reach(m, set()) & {"server", "engine_server", "engine_batched", "evaluate", "batched"}, m


def test_every_module_imports_alone():
    """Each module imported in a fresh interpreter state of mlx_ft (no help from an earlier import)."""
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}:\n"
        "    for k in [k for k in sys.modules if k == 'mlx_ft' or k.startswith('mlx_ft.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module('mlx_ft.' + m)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_exception_class_lives_in_the_one_tree():
    """errors.py is the only place exceptions are defined, all under MlxftError, and mlx_ft raises
    no bare built-in exception a user would see as a traceback."""
    from mlx_ft import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.MlxftError), name
    builtin = {"ValueError", "RuntimeError", "TypeError", "KeyError", "Exception", "OSError", "AssertionError"}
    offenders = []
    for p in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and p.stem != "errors":
                if any(ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases):
                    offenders.append(f"{p.name}: class {node.name}")
            if isinstance(node, ast.Raise) and node.exc is not None:
                f = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if getattr(f, "id", None) in builtin:
                    offenders.append(f"{p.name}:{node.lineno}: raise {f.id}")
    allowed = {"configfile.py"}  # _to_int's ValueError is caught inside configfile.py itself
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []


def _code_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring is not code
    return (body[-1].end_lineno - body[0].lineno + 1) if body else 0


@pytest.mark.parametrize("module", MODULES)
def test_functions_read_top_to_bottom(module):
    """No function over LONG lines of code unless its docstring says why ("Long because ...")."""
    long = []
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > LONG:
            if "long because" not in (ast.get_docstring(node) or "").lower():
                long.append(f"{node.name} ({_code_lines(node)} lines)")
    assert long == []
