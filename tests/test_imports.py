"""Architecture checks: no import cycles between tta's modules, and ``import tta`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tta"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every tta module ``path`` imports, at any depth (inside functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package importing its own submodules (tta.methods -> tta.methods.tent) is how packages work;
            # a submodule importing its package back is a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_tta_is_light() -> None:
    code = "import sys, tta; heavy = [m for m in ('torch', 'pandas', 'robustbench', 'timm') if m in sys.modules]; " \
           "print(','.join(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import tta loaded {out}"


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others (a package's ``__init__`` counts when a submodule
    is imported, as Python runs it first)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        parents = [".".join(node.split(".")[:i]) for i in range(2, node.count(".") + 1)]
        for nxt in [*graph.get(node, ()), *(p for p in parents if p in graph)]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_layers_point_one_way() -> None:
    graph = _graph()
    # reading an AFN warm-up never loads the training loop, and the loop never loads the run ring for a device
    assert "tta.warmup.train" not in _reaches(graph, "tta.methods.afn")
    assert not {m for m in _reaches(graph, "tta.warmup.train") if m == "tta.engine" or m.startswith("tta.run")}
    # norm layers know nothing of context inference or methods; context inference knows nothing of methods
    for name in (m for m in graph if m.startswith("tta.norm")):
        assert not {m for m in graph[name] if m.startswith(("tta.context", "tta.methods", "tta.warmup"))}, name
    for name in (m for m in graph if m.startswith("tta.context")):
        assert not {m for m in graph[name] if m.startswith(("tta.methods", "tta.warmup"))}, name


def test_no_function_takes_more_than_twelve_parameters() -> None:
    # Anywhere in tta/; self/cls aside, *args and **kwargs count one each; dataclass constructors are generated, so
    # they never appear. Many settings travel as one value (a dataclass, e.g. a RunSpec part).
    over = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) + (a.vararg is not None) + (a.kwarg is not None) > 12:
                    over.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}")
    assert not over, over
