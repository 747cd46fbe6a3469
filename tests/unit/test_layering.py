"""``trainer/`` is layered: every module imports alone, and no two modules import each other, even through a
chain or from inside a function. A circle held together by imports inside functions works only while nobody
moves one of those imports, and a module that imports only after another one was imported first breaks the
first script that imports it directly."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "trainer"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module and package of ``trainer/``."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement that can run: at module level and inside functions, not under ``TYPE_CHECKING``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that importing ``name``'s statements imports: each target, the packages above it
    (their ``__init__`` runs first) except ``name``'s own (already importing), and each submodule a
    ``from X import y`` names."""
    is_package = path.name == "__init__.py"
    own = name.split(".") if is_package else name.split(".")[:-1]
    own_packages = {".".join(own[:i]) for i in range(1, len(own) + 1)}
    targets: set[str] = set()

    def add(module: str, explicit: bool) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and (prefix not in own_packages or (explicit and i == len(parts))):
                targets.add(prefix)

    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, explicit=True)
            continue
        if node.level:
            base = own[:len(own) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            if sub in known:
                add(sub, explicit=True)  # a submodule: its package is imported first
            else:
                add(module, explicit=True)  # a name the module defines (or its package's __init__)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Each strongly connected component of more than one module (Tarjan): one of its cycles, as a path that
    ends where it starts, and all of its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_in(graph, c), c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    came_from = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_no_import_cycle_in_trainer():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in trainer/:\n" + "\n".join(
        f"{' -> '.join(path)} (modules in this circle: {', '.join(sorted(members))})" for path, members in cycles)


def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a circle closed by an import inside a function, through a package's ``__init__``."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    known = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.sub": pkg / "sub" / "__init__.py",
             "p.sub.b": pkg / "sub" / "b.py", "p.c": pkg / "c.py"}
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["p.c"] == set() and graph["p.sub"] == {"p.sub.b"}
    assert find_cycles(graph) == [(["p.a", "p.sub", "p.sub.b", "p.a"], {"p.a", "p.sub", "p.sub.b"})]


# Each child is forked from a parent that has imported the third-party libraries trainer/ imports at module level
# (torch alone takes seconds) and nothing of trainer/: the child's imports of trainer.* run in the same order as in
# a fresh interpreter, which is all a circle or a missing import depends on.
_IMPORT_EACH_ALONE = textwrap.dedent("""
    import importlib, os, sys, traceback
    third_party, names = sys.argv[1].split(","), sys.argv[2].split(",")
    for lib in filter(None, third_party):
        try:
            importlib.import_module(lib)
        except Exception:  # an optional library: the child that needs it reports it
            pass
    assert not [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]
    failed = []
    for name in names:
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                print(f"--- import {name} failed:", file=sys.stderr)
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("FAILED " + " ".join(failed))
    sys.exit(1 if failed else 0)
""")


def _third_party_at_module_level() -> list[str]:
    libs = set()
    for path in modules().values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                libs.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                libs.add(node.module)
    return sorted(lib for lib in libs if lib.split(".")[0] not in (PACKAGE, "__future__"))


def test_every_module_of_trainer_imports_alone():
    names = sorted(modules())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, ",".join(_third_party_at_module_level()),
                           ",".join(names)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
