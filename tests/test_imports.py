"""The layering of toolchain/ (docs/architecture.md): every module imports on its own, imports inside functions
count as imports, and the graph has no cycle; stages never reach up into the pipeline, the server or the CLI."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ROOT

PACKAGE = ROOT / "toolchain"


def _modules() -> dict[str, object]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the toolchain modules it imports anywhere in its body (functions included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolchain"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("toolchain")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_stages_and_lower_floors_do_not_import_upward():
    graph = _graph()
    upper = {"toolchain.pipeline", "toolchain.cli", "toolchain.report", "toolchain.publish", "toolchain.scaffold"}
    upper |= {m for m in graph if m.startswith("toolchain.serve.") or m == "toolchain.serve"}
    for name, deps in graph.items():
        if name.startswith("toolchain.stages") or name in ("toolchain.plans", "toolchain.served"):
            assert not deps & upper, f"{name} imports {sorted(deps & upper)}"
    assert not any("toolchain.cli" in deps for deps in graph.values())


def test_every_module_imports_on_its_own():
    def load(name: str) -> tuple[str, str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        return name, done.stderr.strip().splitlines()[-1] if done.returncode else ""

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = {name: err for name, err in pool.map(load, sorted(_modules())) if err}
    assert not failed, failed
