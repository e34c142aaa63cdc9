"""The package's shape: layers that import only downwards, short functions, one reader of megatron's state.

``LAYERS`` lists every top-level package and module of ``carft_nemo`` from the lowest to
the highest; a module may import only from its own entry and the ones before it (imports
inside functions count too: deferring an import does not change what depends on what).
A new package must be placed here, which is where its layer gets decided.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "carft_nemo"
LAYERS = [
    "config",  # YAML -> typed dataclasses; imports nothing of ours
    "telemetry",  # logging, metrics sinks, timers
    "seeding",
    "compat",  # megatron-core version differences
    "distributed",  # device, layout, named axes, collectives, Ray groups, replicas
    "data",
    "rewards",
    "models",
    "planning",  # memory estimates before launch
    "algorithms",  # pure tensor code
    "generation",
    "training",  # optimizer, forward/backward, the shared loop
    "checkpoint",
    "evaluation",
    "reporting",
    "workers",  # the Ray roles
    "sft",
    "rl",
    "pipeline",  # jobs that chain stages
    "schemas",  # which schema reads which YAML: knows every recipe
    "cli",
]
MAX_FUNCTION_LINES = 80
MEGATRON_STATE_READERS = {"distributed/axes.py", "compat.py"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _entry(path: Path) -> str:
    """The top-level package or module a file belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_entries(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + (
                [f"{node.module}.{a.name}" for a in node.names] if node.module == "carft_nemo" else []
            )
        for name in names:
            parts = name.split(".")
            if parts[0] == "carft_nemo" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_top_level_entry_has_a_layer() -> None:
    entries = {_entry(p) for p in _modules()} - {"__init__"}
    assert entries, "package not found"
    assert sorted(entries - set(LAYERS)) == [], "place new packages in LAYERS"
    assert sorted(set(LAYERS) - entries) == [], "LAYERS names something that does not exist"


def test_imports_point_down_the_layers() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for path in _modules():
        source = _entry(path)
        if source == "__init__":
            continue
        for target in _imported_entries(ast.parse(path.read_text())):
            if rank[target] > rank[source]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} ({source}) imports {target}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import() -> None:
    found = _imported_entries(ast.parse("def f():\n    from carft_nemo.rl.controller import run_rl\n"))
    assert found == {"rl"}
    assert _imported_entries(ast.parse("from carft_nemo import compat\nimport carft_nemo.sft.run\n")) == {
        "compat",
        "sft",
    }


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_megatron_parallel_state_is_read_in_one_place() -> None:
    readers = set()
    for path in _modules():
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "megatron.core":
                if any(alias.name == "parallel_state" for alias in node.names):
                    readers.add(str(path.relative_to(PACKAGE)))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] + ([module] if module else [])
                if any("parallel_state" in (n or "") for n in names):
                    readers.add(str(path.relative_to(PACKAGE)))
    assert readers <= MEGATRON_STATE_READERS, (
        f"ask carft_nemo.distributed.axes instead: {sorted(readers - MEGATRON_STATE_READERS)}"
    )


def test_algorithm_code_is_pure() -> None:
    """No Ray and no megatron in the algorithms: collectives come in as arguments (process groups)."""
    found = []
    for path in (PACKAGE / "algorithms").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in ("ray", "megatron")]
    assert not found, "\n".join(found)
