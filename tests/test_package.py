"""The package as a whole: imports run one way between its concerns, and `import mcdrop` is light.

The declared order (lowest first) is the design's data flow: nothing imports a unit above it,
and no module imports itself back through others. Read from the source (ast), so it is fast
and sees imports inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mcdrop

SOURCE = Path(__file__).resolve().parents[1] / "service"
PACKAGE = SOURCE / "mcdrop"

# Units: a subpackage, or a top-level module. Each layer may import only the layers before it.
LAYERS: list[set[str]] = [
    {"errors", "config"},
    {"uncertainty", "scoring", "client"},
    {"repository"},
    {"engine"},
    {"model"},
    {"shards", "evaluation", "render", "training"},
    {"serving"},
    {"api"},
    {"app"},
    {"server", "ray_options"},
    {"ray_serve"},
    {"cli"},
    {"__main__"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
FACADE = "mcdrop"  # the package's __init__: __version__ and lazy names, imports nothing itself


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """mcdrop.engine.core -> engine; mcdrop.model -> model; mcdrop -> the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported mcdrop module, line, under TYPE_CHECKING) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == FACADE:  # from mcdrop import x: a submodule, or a facade name
                for alias in node.names:
                    submodule = PACKAGE / alias.name
                    found = submodule.is_dir() or submodule.with_suffix(".py").is_file()
                    target = f"{FACADE}.{alias.name}" if found else FACADE
                    yield target, node.lineno, id(node) in typing_only
            elif node.module.startswith(f"{FACADE}."):
                yield node.module, node.lineno, id(node) in typing_only
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == FACADE or alias.name.startswith(f"{FACADE}."):
                    yield alias.name, node.lineno, id(node) in typing_only


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    """Every module of the package with the mcdrop modules it imports."""
    return {module_name(p): list(imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_of_the_package_has_a_declared_layer() -> None:
    units = {unit_of(m) for m in graph()} - {FACADE}
    assert units == set(LAYER), "declare new units in LAYERS (and say why they sit there)"


Graph = dict[str, list[tuple[str, int, bool]]]


def upward_imports(modules: Graph) -> list[str]:
    """Imports from one unit to another that is not below it in LAYERS."""
    return [
        f"{module} (line {line}) imports {target}: {unit_of(module)} is not above {unit_of(target)}"
        for module, targets in modules.items()
        if unit_of(module) != FACADE
        for target, line, _ in targets
        if unit_of(target) not in (FACADE, unit_of(module))
        and LAYER[unit_of(target)] >= LAYER[unit_of(module)]
    ]


def import_cycles(modules: Graph) -> list[list[str]]:
    """Every loop of run-time imports between modules (depth-first, each found once)."""
    edges = {m: sorted({t for t, _, typing_only in ts if not typing_only and t in modules})
             for m, ts in modules.items()}  # fmt: skip
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_imports_run_one_way_between_units() -> None:
    problems = upward_imports(graph())
    assert not problems, "\n".join(problems)


def test_no_module_imports_itself_back() -> None:
    cycles = import_cycles(graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_facade_imports_nothing_at_run_time() -> None:
    eager = [(t, line) for t, line, typing_only in graph()[FACADE] if not typing_only]
    assert not eager, eager


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The engine importing the registry (as sharding once made it) breaks both rules."""
    modules = graph()
    modules["mcdrop.engine.core"] = [*modules["mcdrop.engine.core"],
                                     ("mcdrop.serving.registry", 1, False)]  # fmt: skip
    assert upward_imports(modules) == [
        "mcdrop.engine.core (line 1) imports mcdrop.serving.registry: engine is not above serving"
    ]
    assert any(c[0] == c[-1] and "mcdrop.engine.core" in c for c in import_cycles(modules))
    typing_only = graph()
    typing_only["mcdrop.engine.core"].append(("mcdrop.serving.registry", 1, True))
    assert not import_cycles(typing_only)


def test_import_mcdrop_is_lazy_and_its_names_resolve() -> None:
    code = (
        "import sys, mcdrop\n"
        "heavy = [m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(mcdrop.__version__, mcdrop.MCOptions.__module__, mcdrop.create_app.__module__,\n"
        "      mcdrop.ServedModel.__name__, mcdrop.Settings().port, mcdrop.MCEngine.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "0.1.0", "mcdrop.engine.core", "mcdrop.app", "ServedModel", "8000", "MCEngine"]  # fmt: skip
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mcdrop.__getattr__("Nope")


def test_python_dash_m_mcdrop_is_the_console_script() -> None:
    done = subprocess.run([sys.executable, "-m", "mcdrop", "--help"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: mcdrop ")
    for command in ("serve", "predict", "train", "evaluate", "models", "demo"):
        assert command in done.stdout
