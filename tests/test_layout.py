"""The package's shape: short modules and functions, no import cycle, and every import pointing down the layers.

Layers, bottom to top (a module imports only from its own layer or below):

0. ``fovlm.data.roles``, ``fovlm.data.contract``: token roles and frame settings, the data contract;
1. ``fovlm.model``, ``fovlm.losses``, ``fovlm.schedules``, ``fovlm.rank_state``: the model and the pure maths;
2. ``fovlm.data``: reading, planning and batching samples;
3. ``fovlm.module``: the LightningModule;
4. ``fovlm.eval``, ``data_prep``: evaluation and shard writing;
5. ``fovlm.export``: writing an exported model folder (its card holds evaluation results);
6. ``fovlm.callbacks``, ``fovlm.bench``: training-time monitors and benchmarks;
7. ``fovlm.cli``, ``fovlm.__main__``: the command line.

Lazy imports inside functions count like top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fovlm", "data_prep")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

LAYERS: tuple[tuple[str, int], ...] = (
    ("fovlm.data.roles", 0),
    ("fovlm.data.contract", 0),
    ("fovlm.model", 1),
    ("fovlm.losses", 1),
    ("fovlm.schedules", 1),
    ("fovlm.rank_state", 1),
    ("fovlm.reference_logps", 1),
    ("fovlm.data", 2),
    ("fovlm.module", 3),
    ("fovlm.strategy", 3),
    ("fovlm.eval", 4),
    ("data_prep", 4),
    ("fovlm.export", 5),
    ("fovlm.callbacks", 6),
    ("fovlm.bench", 6),
    ("fovlm.cli", 7),
    ("fovlm.__main__", 7),
    ("fovlm", 0),  # the package's own __init__
)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def layer_of(module: str) -> int:
    """The layer of a module: the rank of the longest matching prefix in :data:`LAYERS`."""
    best = max(
        (prefix for prefix, _ in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len
    )
    return dict(LAYERS)[best]


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        candidates: list[str] = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_package_init(module: str, target: str) -> bool:
    """A package's ``__init__`` importing its own submodules (re-exports) is not an upward arrow."""
    return target.startswith(module + ".")


def test_no_module_is_too_long():
    long = {
        str(path.relative_to(ROOT)): lines
        for path in module_files().values()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module) and not is_package_init(module, target)
    )
    assert not upward, "imports running back up:\n" + "\n".join(upward)


def test_the_checks_can_fail():
    """The cycle finder and the layer order see a made-up cycle and a made-up upward import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("fovlm.model.vlm") < layer_of("fovlm.export") < layer_of("fovlm.cli")
    assert layer_of("fovlm.data.roles") < layer_of("fovlm.losses") < layer_of("fovlm.data.chat")


@pytest.mark.parametrize("module", ["fovlm.export", "fovlm.model.vlm", "fovlm.data.collate"])
def test_known_modules_are_found(module):
    assert module in module_files()
