"""Properties of the source tree itself: no import cycles, and no overlong modules.

The import graph is read from the source with `ast`, so it counts every import statement,
including those inside functions: a cycle hidden by a function-level import is still a cycle
(it only moves the failure from import time to the first call, and the design is just as
tangled). Third-party and standard-library imports are not part of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt", "server", "training", "client", "cli_args")
MAX_LINES = 400
MAX_WIDTH = 110


# --- the import graph -----------------------------------------------------------------------


def find_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file}; a package's __init__.py is named after the package."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _executed_by_importing(target: str, importer: str, modules: dict[str, Path]) -> list[str]:
    """The modules that importing `target` from `importer` may run: the target and the
    packages above it, leaving out the importer's own enclosing packages (their __init__ is
    already running or done before any of their submodules is imported)."""
    parts = target.split(".")
    found = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in modules or name == importer:
            continue
        if i < len(parts) and importer.startswith(name + "."):
            continue
        found.append(name)
    return found


def import_edges(module: str, source: str, modules: dict[str, Path]) -> dict[str, int]:
    """{imported module: line of the first import of it} for the imports in `source` (the text
    of `module`) that name one of `modules`, at any depth: module level, functions, classes."""
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        for name in _executed_by_importing(target, module, modules):
            edges.setdefault(name, line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if _is_package(module, modules) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from pkg import name` imports the submodule pkg/name.py when there is one,
                # otherwise it takes an attribute of pkg (its __init__).
                add(submodule if submodule in modules else base, node.lineno)
    edges.pop(module, None)
    return edges


def import_graph(root: Path, packages=PACKAGES) -> dict[str, dict[str, int]]:
    modules = find_modules(root, packages)
    return {
        name: import_edges(name, file.read_text(encoding="utf-8"), modules) for name, file in modules.items()
    }


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The modules caught in import cycles, one sorted list per strongly connected component
    with more than one module (Tarjan's algorithm): each can reach every other by imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def a_cycle_through(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    # A shortest path from the component's first module back to itself, staying inside it.
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in members or w in came_from:
                    continue
                came_from[w] = v
                if w == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(w)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def _describe(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    cycle = a_cycle_through(component, graph)
    steps = [f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return f"{', '.join(component)}; for instance\n    " + "\n    ".join(steps)


# --- the tests ------------------------------------------------------------------------------


def test_the_cycle_finder_reports_a_synthetic_cycle_and_nothing_for_an_acyclic_graph():
    cyclic = {
        "a": {"b": 1},
        "b": {"c": 1},
        "c": {"a": 1, "d": 1},
        "d": {},
        "e": {"a": 1, "f": 1},
        "f": {"e": 1},
    }
    assert find_cycles(cyclic) == [["a", "b", "c"], ["e", "f"]]
    assert a_cycle_through(["a", "b", "c"], cyclic) == ["a", "b", "c", "a"]
    acyclic = {"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}, "d": {"a": 1}}
    assert find_cycles(acyclic) == []


def test_import_edges_count_function_level_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "from .a import f\nfrom . import b\n",
        "a.py": "import os\n\ndef f():\n    from .b import g  # hidden in a function\n    return g\n",
        "b.py": "from . import c\nfrom .c import VALUE\n",
        "c.py": "import pkg\n",  # the package itself: its __init__
        "d.py": "from pkg import a, VALUE\nimport pkg.b\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {
        "pkg": {"pkg.a": 1, "pkg.b": 2},
        "pkg.a": {"pkg.b": 4},
        "pkg.b": {"pkg.c": 1},  # `from . import c` is c, not the package's __init__
        "pkg.c": {"pkg": 1},
        "pkg.d": {"pkg.a": 1, "pkg": 1, "pkg.b": 2},
    }
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg.c"]]
    assert a_cycle_through(["pkg", "pkg.a", "pkg.b", "pkg.c"], graph) == ["pkg", "pkg.b", "pkg.c", "pkg"]


def test_no_import_cycles_among_gpt_server_training_modules_counting_function_level_imports():
    modules = find_modules(ROOT)
    assert {"gpt", "gpt.checkpoint", "server.app", "training.trainer"} <= set(modules)
    graph = import_graph(ROOT)
    assert "gpt.files" in graph["gpt.checkpoint"]  # the graph really holds the package's imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph, modules) for c in cycles)


def test_no_python_source_file_in_gpt_server_training_is_longer_than_400_lines():
    lengths = {
        file.relative_to(ROOT): len(file.read_text(encoding="utf-8").splitlines())
        for file in find_modules(ROOT).values()
    }
    assert len(lengths) > 10
    too_long = {str(f): n for f, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not too_long, f"files longer than {MAX_LINES} lines: {too_long}"


def test_no_line_of_source_tests_or_benchmarks_is_wider_than_110_characters():
    """A size limit is not met by widening lines: the packages, tests and benchmarks, Python and C."""
    files = [*find_modules(ROOT).values()]
    for folder, patterns in (
        ("tests", ("*.py",)),
        ("benchmarks", ("*.py",)),
        ("gpt", ("*.c", "*.cpp", "*.h")),
    ):
        for pattern in patterns:
            files += sorted((ROOT / folder).rglob(pattern))
    wide = [
        f"{file.relative_to(ROOT)}:{n}"
        for file in files
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > MAX_WIDTH
    ]
    assert len(files) > 50
    assert not wide, f"lines wider than {MAX_WIDTH} characters: {wide}"
