"""The layering of toolchain/ (docs/architecture.md), as data: every module imports on its own, the import graph
has no cycle, no module imports one on a higher floor, and internal imports sit at the top of the file (only a
module that loads a heavy library when imported may be imported inside a function)."""

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ROOT

PACKAGE = ROOT / "toolchain"

# From the ground up; a module's floor is that of the longest prefix naming it. A module may import its own floor
# or any below it. docs/architecture.md shows this table (test_the_architecture_page_shows_the_floors).
FLOORS = [
    ("foundation", ["toolchain", "toolchain.ui"]),
    ("models", ["toolchain.models"]),
    ("recipe", ["toolchain.recipe"]),
    ("data and model files", ["toolchain.data", "toolchain.artifacts"]),
    ("engines, quality, training", ["toolchain.backends", "toolchain.quality", "toolchain.training"]),
    ("runs, the stage table, stage Markdown", ["toolchain.pipeline.runs", "toolchain.pipeline.plans",
                                               "toolchain.render.markdown"]),
    ("serving", ["toolchain.serve"]),
    ("stages", ["toolchain.stages"]),
    ("runner, report, publish", ["toolchain.pipeline", "toolchain.render"]),
    ("command line", ["toolchain.cli"]),
]
HEAVY = ("torch", "transformers", "llama_cpp", "onnxruntime", "onnxruntime_genai", "lm_eval", "fastapi", "datasets",
         "peft", "accelerate", "optimum", "uvicorn", "onnx", "matplotlib", "safetensors", "gguf", "sklearn")


def floor_of(module: str) -> int:
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    assert floor is not None, f"{module} is on no floor: add it to FLOORS"
    return floor


def _modules() -> dict[str, object]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}
# Child processes started by module name count as imports (a stage starting a server is an edge to it).
RUN_AS = re.compile(r'"-m",\s*"(toolchain[\w.]*)"')


def _targets(node) -> set[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolchain"):
        return {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names}
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("toolchain")}
    return set()


def _top_level(tree) -> list:
    """Import statements that run when the module is imported (TYPE_CHECKING blocks included: they are edges)."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            out += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def _graph(top_only: bool = False) -> dict[str, set[str]]:
    """module -> the toolchain modules it imports (anywhere in its body, or at its top only)."""
    graph = {}
    for name, tree in TREES.items():
        nodes = _top_level(tree) if top_only else list(ast.walk(tree))
        deps = set().union(*(_targets(n) for n in nodes))
        if not top_only:
            deps |= set(RUN_AS.findall(MODULES[name].read_text(encoding="utf-8")))
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def _heavy() -> set[str]:
    """Modules that load a heavy library when imported, themselves or through their top-level imports."""
    def libs(node):
        if isinstance(node, ast.ImportFrom):
            return set() if node.level or (node.module or "").startswith("toolchain") else {node.module.split(".")[0]}
        return {a.name.split(".")[0] for a in node.names}

    heavy = {m for m, t in TREES.items() if any(lib in HEAVY for n in _top_level(t) for lib in libs(n))}
    top = _graph(top_only=True)
    while True:
        more = {m for m in MODULES if m not in heavy and top[m] & heavy}
        if not more:
            return heavy
        heavy |= more


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


def test_no_module_imports_a_higher_floor():
    upward = [f"{name} (floor {floor_of(name)}) -> {dep} (floor {floor_of(dep)})"
              for name, deps in _graph().items() for dep in sorted(deps) if floor_of(dep) > floor_of(name)]
    assert not upward, "\n".join(upward)


def test_the_floor_rule_catches_an_upward_edge():
    assert floor_of("toolchain.stages.eval") > floor_of("toolchain.quality.heldout")
    assert floor_of("toolchain.pipeline.runner") > floor_of("toolchain.stages.eval") > floor_of("toolchain.pipeline.plans")
    assert floor_of("toolchain.render.markdown") < floor_of("toolchain.stages.bench") < floor_of("toolchain.render.report")


def test_internal_imports_sit_at_the_top_unless_the_module_is_heavy():
    heavy = _heavy()
    assert {"toolchain.training.step", "toolchain.models.student"} <= heavy and "toolchain.recipe" not in heavy
    inside = []
    for name, tree in TREES.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    light = _targets(node) - heavy
                    if light:
                        inside.append(f"{name}.{fn.name} (line {node.lineno}) imports {sorted(light)}")
    assert not inside, "\n".join(inside)


def test_the_architecture_page_shows_the_floors():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for i, (title, prefixes) in enumerate(FLOORS):
        assert f"{i}. {title}" in page, f"docs/architecture.md lacks floor '{i}. {title}'"
        for p in prefixes:
            assert f"`{p.removeprefix('toolchain.')}`" in page or p == "toolchain", f"docs/architecture.md lacks {p}"


def test_every_module_imports_on_its_own():
    def load(name: str) -> tuple[str, str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        return name, done.stderr.strip().splitlines()[-1] if done.returncode else ""

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = {name: err for name, err in pool.map(load, sorted(MODULES)) if err}
    assert not failed, failed
