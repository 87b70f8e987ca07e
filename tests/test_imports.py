"""The package's import structure: no cycle between modules' top-level imports, no private name imported from
another module, and `import dreambooth.cli` without torch (so --help and config mistakes answer at once)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreambooth"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(path: Path):
    """(imported module, names taken from it) for each import that runs when the module is imported: module-level
    statements, also inside if/try at module level, except under `if TYPE_CHECKING:`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    todo = list(ast.parse(path.read_text(), str(path)).body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import module` imports the module; `from module import name` takes a name from it.
                yield (sub, []) if sub in MODULES else (base, [alias.name])
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def import_graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in top_level_imports(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # breadth first inside the group: the shortest way from its first module back to it
        start = min(group)
        paths, frontier = {start: [start]}, [start]
        while frontier:
            back = [v for v in frontier if start in graph[v]]
            if back:
                found.append(paths[back[0]] + [start])
                break
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
    return found


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(name: str, path: Path) -> list[str]:
    """`from dreambooth.x import _y` and `x._y` (x bound to a dreambooth module) anywhere in the module, inside
    functions too."""
    tree = ast.parse(path.read_text())
    bad, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dreambooth"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    modules.add(a.asname or a.name)
                elif _private(a.name):
                    bad.append(f"{name}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.asname and a.name.startswith("dreambooth")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            bad.append(f"{name}: {node.value.id}.{node.attr}")
    return bad


def test_the_private_name_finder_finds_them(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from dreambooth.models.builtin import _x, y\nfrom dreambooth.training import checkpoint_store"
                    " as store\ndef f():\n    return store._fsync(1), store.prune, y.__doc__\n")
    assert private_uses("m", path) == ["m: from dreambooth.models.builtin import _x", "m: store._fsync"]


def test_no_private_name_is_used_from_another_module():
    bad = [use for name, path in MODULES.items() for use in private_uses(name, path)]
    assert not bad, "private names used across modules: " + "; ".join(bad)


def test_the_command_line_imports_without_torch():
    """`dreambooth --help` and config errors must not pay for torch, diffusers or transformers (seconds)."""
    code = ("import sys, dreambooth.cli; dreambooth.cli.build_parser(); "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft', 'safetensors') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("name", ["dreambooth.files", "dreambooth.config.schema", "dreambooth.bench.table"])
def test_light_modules_stay_light(name):
    """What cli.py imports at the top, and files.py (imported by nearly everything), do not import torch."""
    code = f"import sys, {name}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
