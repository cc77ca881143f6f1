"""The import rules of docs/architecture.md, checked on the source: layers point one way, no cycles,
no private names across packages, imports at the top of modules.

Every import statement of ``actors/``, ``orchestrator/`` and ``jobs/`` is read with ``ast``
(those inside functions too), so an import that breaks a rule fails here whether or not a
test happens to execute it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "orchestrator", "jobs")

LAYERS = [
    ["orchestrator.config"],
    ["actors", "actors.storage", "actors.toy"],
    ["actors.diffusion", "actors.prompts"],
    ["actors.rl", "actors.rewards"],
    ["actors.evaluate"],
    ["actors.workers"],
    ["orchestrator"],
    ["jobs"],
]
"""Bottom to top. A module may import its own layer and the layers below it, never above."""

LAZY_MARK = "lazy:"
"""An import inside a function must say why it is lazy, on the line above it or its own (``# lazy: ...``)."""


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = modules()


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer; add it to LAYERS and docs/architecture.md"
    return index


def imports(module: str, source: str | None = None) -> list[tuple[str, list[str], ast.stmt, bool]]:
    """(imported module, names, statement, inside a function) for every import of ``module`` that names a
    project module; ``source`` replaces the module's file (to check the checker)."""
    path = MODULES.get(module, ROOT / (module.replace(".", "/") + ".py"))
    tree = ast.parse(source if source is not None else path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nested = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
        if isinstance(sub, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
            subs = [alias.name for alias in node.names if f"{base}.{alias.name}" in MODULES]
            names = [alias.name for alias in node.names if f"{base}.{alias.name}" not in MODULES]
            targets = [(f"{base}.{sub}", []) for sub in subs] + ([(base, names)] if names else [])
        else:
            continue
        for target, names in targets:
            if target.split(".")[0] in PACKAGES:
                found.append((target, names, node, id(node) in nested))
    return found


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def upward_imports(module: str, source: str | None = None) -> list[str]:
    return [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)}), line {node.lineno}"
        for target, _, node, _ in imports(module, source)
        if target in MODULES and layer_of(target) > layer_of(module)
    ]


def test_imports_point_down_the_layers():
    broken = [line for module in MODULES for line in upward_imports(module)]
    assert not broken, "imports against the layering of docs/architecture.md:\n" + "\n".join(broken)


def test_no_import_cycles():
    graph = {module: sorted({t for t, _, _, _ in imports(module) if t in MODULES and t != module}) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_private_names_cross_a_package():
    def package(module: str) -> str:
        return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    crossing = [
        f"{module} imports {name} from {target}"
        for module in MODULES
        for target, names, _, _ in imports(module)
        for name in names
        if name.startswith("_") and target in MODULES and package(target) != package(module)
    ]
    assert not crossing, "private names imported across packages:\n" + "\n".join(crossing)


def test_imports_sit_at_the_top_unless_marked_lazy():
    lazy = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)) and LAZY_MARK not in "\n".join(lines[sub.lineno - 2 : sub.end_lineno]):
                        lazy.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {ast.unparse(sub)}")
    assert not lazy, f"imports inside functions without a '# {LAZY_MARK} why' comment:\n" + "\n".join(lazy)


@pytest.mark.parametrize(
    "module, source",
    [
        ("actors.rewards.registry", "from orchestrator.loop import train_loop_per_worker\n"),  # compute reaching up to the control plane
        (
            "orchestrator.config.training",
            "def f():\n    from actors.rl import schedules  # lazy: hidden\n",
        ),  # the config is the bottom layer
        ("orchestrator.run", "import jobs.cli\n"),  # the control plane never imports the commands
    ],
)
def test_the_check_refuses_an_upward_import(module, source):
    # The check is only worth something if it fails: each of these sources breaks the layering.
    assert upward_imports(module, source)
    assert not upward_imports(module, "from orchestrator.config import Config\n")
