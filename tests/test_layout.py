"""The shape of the source tree, read with ``ast`` from revllm/ (nothing is imported):

* floors: a package never imports one above it (``FLOORS``, lowest first);
* no circle between files (every import counts, those inside functions too);
* imports sit at the top of files, except optional dependencies that need laziness (``LAZY_OK``);
* no function over ``MAX_FUNCTION_LINES`` lines (``LONG_OK`` lists the justified exceptions).

The floors: the ground floor is ``errors`` (exceptions), ``memory`` (allocator, process memory, the
saved-bytes meter), ``assets`` (where the embedded files are) and ``io`` (atomic writes, the verified
manifest, loading models/tokenizers/sources). Then the model: ``dynamics``, ``engine``, ``blocks``,
``modeling``. Then what uses a model: ``data`` (token files), ``eval``, ``parallel``, ``train`` (the
loop uses data and parallel), ``convert`` (its fine-tuning runs the training loop), ``bench``,
``commands``. On top: the package itself (``revllm/__init__.py``, the public API that re-exports) and
``cli`` (the program, which reads ``__version__`` from it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "revllm"

FLOORS = "errors memory assets io dynamics engine blocks modeling data eval parallel train convert bench commands revllm cli".split()
MAX_FUNCTION_LINES = 80
# Optional dependencies (extras in pyproject.toml) imported inside the function that needs them, so that
# revllm works without them; each such import says why on its line or the line above.
LAZY_OK = {"peft", "lm_eval", "gguf", "deepspeed", "datasets"}
# Function-level imports in these files are left to the helpers rewriting them in the same merge (issue 18
# part B: the layer loop and the family specs). The lead empties this after merging.
LAZY_PENDING: set[str] = set()
# "file::function" -> why it is longer than MAX_FUNCTION_LINES.
LONG_OK: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under revllm/."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("revllm", *path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "revllm"


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """The revllm modules an import statement reaches (a name that is a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "revllm"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "revllm":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def _imports():
    """(module, path, import node, inside a function?) for every import statement in revllm/."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield module, path, node, id(node) in in_function


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path, node, _ in _imports():
        graph[module] |= {t for t in _targets(module, path, node) if t != module}
    return graph


def back_edges() -> list[str]:
    rank = {p: i for i, p in enumerate(FLOORS)}
    found = []
    for src, targets in _edges().items():
        for dst in sorted(targets):
            a, b = _package_of(src), _package_of(dst)
            assert a in rank and b in rank, f"package {a if a not in rank else b} has no floor: add it to FLOORS"
            if rank[b] > rank[a]:
                found.append(f"{src} -> {dst} ({a} is below {b})")
    return found


def circles() -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    graph, index, low, stack, on, out = _edges(), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def lazy_imports() -> list[str]:
    """Imports inside functions, except an optional dependency's with its reason said in a comment (on its
    line, or above its block of imports), and those in the pending files."""
    found = []
    for _, path, node, inside in _imports():
        rel = str(path.relative_to(SRC))
        if not inside or rel in LAZY_PENDING:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        optional = not getattr(node, "level", 0) and all(n.split(".")[0] in LAZY_OK for n in names)
        lines = path.read_text().splitlines()
        said = _commented(lines, node.lineno - 1)
        if not (optional and said):
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def _commented(lines: list[str], i: int) -> bool:
    """Line i, or the comment above the block of import lines it belongs to, says why."""
    while i >= 0:
        line = lines[i].strip()
        if "#" in line:
            return True
        if not line.startswith(("import ", "from ")):
            return False
        i -= 1
    return False


def long_functions() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}::{node.name}" not in LONG_OK:
                    found.append(f"{rel}::{node.name} ({n} lines)")
    return found


def test_the_graph_reader_sees_real_edges():
    """The reader itself: known edges are found (a reader that saw nothing would pass every check)."""
    graph = _edges()
    assert "revllm.errors" in graph["revllm.assets"]
    assert "revllm.dynamics.fixedpoint" in graph["revllm.engine.streams"]  # from ..dynamics import fixedpoint
    assert "revllm.modeling" in graph["revllm.bench.configs"]
    assert len(MODULES) > 50 and sum(map(len, graph.values())) > 100


def test_no_package_imports_one_above_it():
    assert back_edges() == []


def test_no_circle_between_files():
    assert circles() == []


def test_imports_sit_at_the_top_of_files():
    assert lazy_imports() == []


def test_no_function_is_longer_than_the_limit():
    assert long_functions() == []
