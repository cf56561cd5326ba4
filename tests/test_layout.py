"""The package's shape: imports run one way (no cycle between modules, none hidden in a
function but in the command line's entry point), and the run directory's file names live
in ``rundir`` alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: import name -> folder in the checkout (the built-in methods install under the core's name)
PACKAGES = {
    "ewgs_plugins": "ewgs_plugins",
    "ewgs_plugins.methods": "methods",
    "ewgs_plugins.recipes": "recipes",
}
#: imports that may stay inside functions: optional or heavy dependencies
LAZY_ALLOWED = {
    "matplotlib",
    "onnx",
    "onnxruntime",
    "safetensors",
    "scipy",
    "sklearn",
    "tensorboard",
    "torch.utils.tensorboard",  # torch's writer for the optional tensorboard package
    "torchvision",
}
#: the one module that imports project modules inside functions: the ``ewgs`` entry point,
#: whose parser builds without torch (each command imports what it runs). No module imports
#: it, so its lazy imports cannot hide a cycle; the import graph counts them all the same.
ENTRY_POINT = "ewgs_plugins.cli"


def module_files() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """The project modules ``module`` imports when it is imported (top level, outside
    ``if TYPE_CHECKING``), and the names imported inside functions."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    eager: set[str] = set()
    lazy: list[str] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = _absolute(module, is_package, node)
        # ``from pkg import mod`` imports the module pkg.mod when there is one
        return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]

    def walk(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (eager.update if top else lazy.extend)(targets(node))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    inner = not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    walk(children, top and inner)

    walk(tree.body, True)
    return eager, lazy


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules importing it runs (a module ``a.b.c`` runs the
    packages ``a`` and ``a.b`` first, except the packages ``module`` itself is in)."""
    files = module_files()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges: set[str] = set()
        eager, lazy = imports_of(module, path, known)
        for target in eager | (set(lazy) if module == ENTRY_POINT else set()):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in known and name not in own and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    assert graph["ewgs_plugins.train.trainer"] >= {"ewgs_plugins.rundir", "ewgs_plugins.recipe"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_inside_functions_only_for_optional_or_heavy_dependencies() -> None:
    files = module_files()
    lazy = {
        module: sorted(
            name
            for name in imports_of(module, path, set(files))[1]
            if name.split(".")[0] not in LAZY_ALLOWED and name not in LAZY_ALLOWED
        )
        for module, path in files.items()
        if module != ENTRY_POINT
    }
    assert {m: names for m, names in lazy.items() if names} == {}


def test_no_module_imports_the_entry_point() -> None:
    """Only the manual's reference generator reads the command line (its parser, to
    document every command)."""
    graph = import_graph()
    assert graph[ENTRY_POINT] >= {"ewgs_plugins.train", "ewgs_plugins.export"}  # its lazy ones
    importers = sorted(module for module, edges in graph.items() if ENTRY_POINT in edges)
    assert importers == ["ewgs_plugins.reference"]


def test_run_directory_file_names_only_in_rundir() -> None:
    from ewgs_plugins import rundir

    names = [rundir.RECIPE, rundir.METRICS_JSONL, rundir.METRICS_CSV, rundir.DELTAS]
    names += [rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_BEST, rundir.REPORT, rundir.SUMMARY]
    names += [rundir.LAYER_SUMMARY, rundir.INT_EXPORT, rundir.ONNX_EXPORT]
    for module, path in module_files().items():
        if module == "ewgs_plugins.rundir":
            continue
        code = path.read_text()
        strings = [
            n.value
            for n in ast.walk(ast.parse(code))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        named = [name for name in names if any(s == name for s in strings)]
        assert not named, f"{module} spells {named}; use ewgs_plugins.rundir's constants"


@pytest.mark.parametrize("package", ["ewgs_plugins", "ewgs_plugins.methods.profit"])
def test_every_module_imports_first_in_a_fresh_interpreter(package: str) -> None:
    """Each module imported first, alone, in one fresh interpreter per package (a cycle
    hidden by the usual import order would fail here)."""
    modules = [m for m in module_files() if m == package or m.startswith(package + ".")]
    program = "import importlib, sys\n" + "".join(
        f"for name in [n for n in sys.modules if n.split('.')[0] in {PACKAGES!r}]:\n"
        f"    del sys.modules[name]\n"
        f"importlib.import_module({module!r})\n"
        for module in modules
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
