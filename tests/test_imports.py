"""The house has no import circles: the package's and the benchmarks' module import graph, read from
the source, is acyclic.

Every import statement counts, at module level and inside functions alike: a lazy import only hides a
circle from the interpreter's start-up order, it still ties the two modules together. The graph has an
edge A -> B when A names module B in an import (``import B``, ``from B import x``, or ``from P import B``
where B is the submodule P.B). Importing a submodule also runs its parent packages' ``__init__``; those
implicit edges are left out, because a package's ``__init__`` importing its own modules is the normal
way to build its namespace, not a circle between two pieces of code.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rslora_kernels", "benchmarks")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path, packages) -> Dict[str, Path]:
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            found[_module_name(path, root)] = path
    return found


def _resolve(importer: str, is_package: bool, level: int, module: Optional[str]) -> str:
    """The absolute module name that ``from <level dots><module> import ...`` in ``importer`` means."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's "." is its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _owner(name: str, modules) -> Optional[str]:
    """The longest prefix of the dotted ``name`` that is one of ``modules`` (None when outside them)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = ROOT, packages=PACKAGES) -> Dict[str, Set[str]]:
    """module -> the set of modules (within ``packages``) it imports anywhere in its source."""
    modules = _modules(root, packages)
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # "from P import B": B may be a submodule (an edge to P.B) or a name defined in P (an edge to P)
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in modules else base)
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != name:
                    edges.add(owner)
        graph[name] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (or a module importing itself),
    each given as one concrete circle through it: [a, b, ..., a]."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def strongconnect(v):  # Tarjan's algorithm (recursive: the graph has ~100 nodes)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_circle_in(graph, set(comp)) for comp in components]


def _circle_in(graph, comp: Set[str]) -> List[str]:
    """A shortest circle through the component's first module, staying inside the component (BFS)."""
    start = min(comp)
    parents = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1] + [start]  # start -> ... -> v -> start
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"no circle found in component {sorted(comp)}")


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles (module-level and function-level imports alike):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_graph_sees_the_imports_it_must():
    # The checker itself: it resolves relative imports, submodule imports and function-level imports.
    graph = import_graph()
    assert "rslora_kernels.ops.lora_linear" in graph["rslora_kernels"]  # from .ops.lora_linear import ...
    assert "rslora_kernels.ops.custom_op" in graph["rslora_kernels.ops.lora_linear"]  # from .custom_op import
    assert "rslora_kernels.reference" in graph["rslora_kernels.ops.lora_linear"]  # from .. import reference
    assert "rslora_kernels.ops.triton_kernels" in graph["rslora_kernels.ops.lora_linear"]  # function-level
    assert "rslora_kernels.ops.lora_linear" not in graph["rslora_kernels.ops.lora_linear"]


def _write(root: Path, files: Dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_detects_a_function_level_circle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from .a import f  # lazy: still a circle\n    return f\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import b\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub.c"] == {"pkg.b"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_acyclic_package_passes(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import b\n",
        "pkg/a.py": "import pkg.b\n\ndef f():\n    from .b import g\n    return g()\n",
        "pkg/b.py": "from . import c\n\ndef g():\n    return 1\n",
        "pkg/c.py": "import os\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycles(graph) == []


def test_names_a_longer_circle(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", **{f"pkg/m{i}.py": f"from . import m{(i + 1) % 3}\n" for i in range(3)}})
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.m0", "pkg.m1", "pkg.m2", "pkg.m0"]]
