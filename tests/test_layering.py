"""The package's layering: every module imports, no import cycle, no module-level mutable state.

The import graph is read from the source (AST), not from `sys.modules`: an edge A -> B is any import of mgjax module
B written in A, at the top of the file or inside a function (a function-local import usually exists to dodge a
cycle, so it counts). Imports under `if TYPE_CHECKING:` run nothing and are left out. `from mgjax.x import y`
is an edge to `mgjax.x.y` when that is a module, else to `mgjax.x`.
"""
from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re

import pytest

import mgjax

PACKAGE_DIR = os.path.dirname(mgjax.__file__)
MODULES = sorted(info.name for info in pkgutil.walk_packages(mgjax.__path__, prefix="mgjax."))
CONSTANT = re.compile(r"^_*[A-Z][A-Z0-9_]*$|^__\w+__$")  # UPPER_CASE constants, and dunders such as __all__
MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "discard",
            "remove", "sort", "reverse"}


def _path(module: str) -> str:
    relative = module.split(".")[1:]
    package = os.path.join(PACKAGE_DIR, *relative, "__init__.py")
    return package if os.path.isfile(package) else os.path.join(PACKAGE_DIR, *relative) + ".py"


def _is_package(module: str) -> bool:
    return _path(module).endswith("__init__.py")


def _tree(module: str) -> ast.Module:
    with open(_path(module), encoding="utf-8") as f:
        return ast.parse(f.read(), _path(module))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mgjax modules one import statement of `module` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "mgjax"]
    if node.level:  # relative: resolved against the importing module's package
        package = module if _is_package(module) else module.rsplit(".", 1)[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "mgjax":
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported mgjax module: first line importing it}."""
    graph = {}
    for module in MODULES:
        tree = _tree(module)
        skipped = _type_checking_nodes(tree)
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
                for target in _imported(module, node):
                    if target != module and target in MODULES:
                        edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One shortest cycle inside a strongly connected `component`, as `[a, b, ..., a]` (breadth-first from each
    of its modules)."""
    members, best = set(component), None
    for start in component:
        parents, frontier, closing = {start: None}, [start], None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for target in graph[node]:
                    if target == start and closing is None:
                        closing = node
                    elif target in members and target not in parents:
                        parents[target] = node
                        following.append(target)
            frontier = following
        if closing is not None:
            path = [closing]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            if best is None or len(path) + 1 < len(best):
                best = path[::-1] + [start]
    return best


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_walk_finds_the_package():
    assert {"mgjax.config", "mgjax.api", "mgjax.lm.patterns", "mgjax.codec.encodec", "mgjax.checkpoint"} <= set(MODULES)
    graph = import_graph()
    assert "mgjax.config" in graph["mgjax.lm.model"] and "mgjax.checkpoint" in graph["mgjax.api"]


def test_cycle_detection_finds_a_planted_cycle():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
    graph = {"a": {"b": 1}, "b": {"c": 1, "a": 2}, "c": {"a": 1}}
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "a"]


def test_no_import_cycle():
    graph = import_graph()
    report = []
    for component in cycles(graph):
        cycle = shortest_cycle(graph, component)
        steps = "; ".join(f"{a} line {graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
        report.append(f"{len(component)} modules in a cycle, e.g. {steps}")
    assert not report, "import cycles:\n" + "\n".join(report)


def _module_containers(tree: ast.Module) -> dict[str, int]:
    """Names bound at module level (also under top-level if/try/with) to a dict/list/set display or
    comprehension, or to a dict()/list()/set()/defaultdict()/OrderedDict() call -> line."""
    makers = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque"}
    found = {}

    def scan(body):
        for stmt in body:
            if isinstance(stmt, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    scan(getattr(stmt, block, []))
                for handler in getattr(stmt, "handlers", []):
                    scan(handler.body)
                continue
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            else:
                continue
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in makers)
            if mutable:
                found.update({target.id: stmt.lineno for target in targets if isinstance(target, ast.Name)})

    scan(tree.body)
    return found


def _mutations_in_functions(tree: ast.Module, names: set[str]) -> list[tuple[str, int]]:
    """`(name, line)` where a function mutates one of the module-level containers `names` (item assignment or
    deletion, augmented assignment, a mutating method) without binding that name itself."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        local = {arg.arg for arg in ast.walk(func.args) if isinstance(arg, ast.arg)}
        for node in ast.walk(func):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                local.add(node.id)
        for node in ast.walk(func):
            target = None
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
                target = node.value
            elif isinstance(node, ast.AugAssign):
                target = node.target
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                target = node.func.value
            if isinstance(target, ast.Name) and target.id in names and target.id not in local:
                found.append((target.id, node.lineno))
    return found


def test_no_global_statements():
    found = [f"{_path(module)}:{node.lineno}: {ast.unparse(node)}" for module in MODULES
             for node in ast.walk(_tree(module)) if isinstance(node, ast.Global)]
    assert not found, "module state rebound from functions:\n" + "\n".join(found)


def test_no_module_level_mutable_state():
    """Module-level containers are UPPER_CASE constants, and no function mutates one."""
    found = []
    for module in MODULES:
        tree = _tree(module)
        containers = _module_containers(tree)
        found += [f"{_path(module)}:{line}: {name} is a module-level container (make it an UPPER_CASE constant or "
                  f"an argument)" for name, line in containers.items() if not CONSTANT.match(name)]
        found += [f"{_path(module)}:{line}: a function mutates the module-level {name}"
                  for name, line in _mutations_in_functions(tree, set(containers))]
    assert not found, "\n".join(found)


def test_the_state_scan_catches_what_it_should():
    tree = ast.parse("_progress = {'callback': None}\nNAMES = ['a']\n"
                     "def set(fn):\n    _progress['callback'] = fn\n    NAMES.append(fn)\n"
                     "def local():\n    NAMES = []\n    NAMES.append(1)\n")
    assert _module_containers(tree) == {"_progress": 1, "NAMES": 2}
    assert _mutations_in_functions(tree, {"_progress", "NAMES"}) == [("_progress", 4), ("NAMES", 5)]
