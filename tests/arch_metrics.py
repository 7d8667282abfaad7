"""The architecture figures of issue #15, measured from the source (``ast`` and regular expressions; nothing
is imported but ``tests/import_graph.py``).

    python tests/arch_metrics.py [--json]

Scanned: the project packages (``jaxkv``, ``fuzz``, ``benchmarks``; tests hold independent expectations on
purpose and are not scanned). Printed per module, then totals:

(a) ``op-compare``: lines comparing an op name as a string (``==``/``!=``/``in (...)`` with one of
    ``flash_attn_ext``, ``soft_max_attn``, ``mixed_flash_attn``, ``ggml-unfused``, ``ggml-split``) outside
    ``jaxkv/ops`` (the registry).
(b) copies of one formula or table:
    ``alibi``: functions computing ALiBi slopes: a two-argument call of something named ``powf``, or a power
    of 2 with exponent ``-max_bias...`` / ``-mb...`` (``2 ** (-max_bias ...)``, ``power(2, -mb ...)``);
    ``golden``: functions named ``*golden*`` that compute a softmax themselves (call an ``exp``) rather than
    delegate;
    ``nmse``: functions named ``nmse`` / ``_nmse`` / ``nmse_from_<...>`` that divide, and assignments or keyword arguments
    ``nmse=`` / ``_nmse=`` whose value is a division (a ratio of squared sums computed in place);
    type names, outside ``jaxkv/formats.py`` (the type table; its names and block types read from its
    ``_fmt(...)`` rows, its K/V types from its ``KV_TYPES`` literal). A *name list* is a literal tuple /
    list / set holding two or more distinct type names (any case), at least one a block type. Three
    figures:
    ``type-list``: name lists that are not documented selections (the figure tracked since the issue);
    ``type-copy``: copies of the type table: a name list naming at least half of the K/V types or every
    block K/V type; a comma-joined string constant of type names only (a CLI default) doing the same
    (shorter ones, such as ``"q8_0,q4_0"``, are argument values, counted nowhere); a dict literal keyed
    by two or more type names (one a block type) whose values are all integer constants (type ids: the
    table's own column);
    ``type-selection``: documented selections, reported and allowed: calls ``selection(reason, names)``
    (``jaxkv.formats.selection``: it needs a non-empty reason and checks every name against ``KV_TYPES``
    when the module is imported); the name lists inside one call count once, as that call.
(c) ``cycles``: import cycles (strongly connected components) and ``local-imports``: function-level imports
    of project or third-party modules that are not optional dependencies (``tests/import_graph.py``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxkv", "fuzz", "benchmarks")
REGISTRY = "jaxkv/ops/"
TYPE_TABLE = "jaxkv/formats.py"

_OPS = r'"(flash_attn_ext|soft_max_attn|mixed_flash_attn|ggml-unfused|ggml-split)"'
OP_COMPARE = re.compile(rf'(==|!=|in \(|in \[|in \{{)[^#]*{_OPS}|{_OPS}[^#]*(==|!=)')
_ALIBI_POW = re.compile(r"2(\.0)?\)?\s*\*\*\s*\(?\s*-\s*\(?\s*(max_bias|mb)\b"
                        r"|power\(\s*(np\.|jnp\.)?(float32\()?2(\.0)?\)?\s*,\s*-\s*\(?\s*(max_bias|mb)\b")
_NMSE_NAME = re.compile(r"^_?nmse$")
_NMSE_FN = re.compile(r"^_?nmse(_from_\w+)?$")
METRICS = ("op-compare", "alibi", "golden", "nmse", "type-list", "type-copy", "type-selection")


def _load_import_graph():
    spec = importlib.util.spec_from_file_location("_import_graph", ROOT / "tests" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def type_names() -> tuple[set[str], set[str]]:
    """(every type name, the block types), read from the ``_fmt(name, type_id, block_size, ...)`` rows of
    the type table."""
    names, blocks = set(), set()
    for n in ast.walk(ast.parse((ROOT / TYPE_TABLE).read_text())):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_fmt" and len(n.args) >= 3
                and isinstance(n.args[0], ast.Constant) and isinstance(n.args[2], ast.Constant)):
            names.add(n.args[0].value)
            if n.args[2].value > 1:
                blocks.add(n.args[0].value)
    return names, blocks


def kv_type_names() -> set[str]:
    """The K/V types: the string constants of the type table's ``KV_TYPES = (...)`` literal."""
    for n in ast.walk(ast.parse((ROOT / TYPE_TABLE).read_text())):
        target = n.target if isinstance(n, ast.AnnAssign) else n.targets[0] if isinstance(n, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id == "KV_TYPES" and isinstance(n.value, (ast.Tuple, ast.List)):
            return {e.value for e in n.value.elts if isinstance(e, ast.Constant)}
    raise SystemExit(f"{TYPE_TABLE}: no KV_TYPES literal")


def files() -> list[pathlib.Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _own_nodes(fn):
    """The nodes of ``fn``'s body, nested function bodies excluded (each function counts for itself)."""
    stack = list(fn.body)
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(n))


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _is_alibi(fn, lines: list[str]) -> bool:
    """``lines``: the file's source lines (a statement's text is its line span)."""
    for n in _own_nodes(fn):
        if isinstance(n, ast.Call) and _call_name(n) == "powf" and len(n.args) == 2:
            return True
        if (isinstance(n, ast.stmt) and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not hasattr(n, "body") and _ALIBI_POW.search("\n".join(lines[n.lineno - 1:n.end_lineno]))):
            return True
    return False


def _is_golden(fn) -> bool:
    return "golden" in fn.name.lower() and any(
        isinstance(n, ast.Call) and _call_name(n) in ("exp", "expf") for n in _own_nodes(fn))


def _is_div(node) -> bool:
    while isinstance(node, ast.Call) and _call_name(node) in ("float", "asarray") and node.args:
        node = node.args[0]
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)


def _nmse_sites(tree) -> list[int]:
    lines = []
    for fn in _functions(tree):
        if _NMSE_FN.match(fn.name) and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
                                             for n in _own_nodes(fn)):
            lines.append(fn.lineno)
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and _is_div(n.value) and any(
                isinstance(t, ast.Name) and _NMSE_NAME.match(t.id) for t in n.targets):
            lines.append(n.lineno)
        elif isinstance(n, ast.keyword) and n.arg and _NMSE_NAME.match(n.arg) and _is_div(n.value):
            lines.append(n.value.lineno)
    return sorted(set(lines))


def _names_in(n, names) -> set[str] | None:
    """The distinct type names of a literal tuple / list / set ``n``, else None."""
    if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
        return {e.value.lower() for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                and e.value.lower() in names}
    return None


def _names_in_string(n, names) -> set[str] | None:
    """The distinct type names of a comma-joined string constant of type names only, else None."""
    if isinstance(n, ast.Constant) and isinstance(n.value, str) and "," in n.value:
        parts = {x.strip().lower() for x in n.value.split(",")}
        return parts if parts <= names else None
    return None


def _type_lists(tree, names, blocks, kv) -> dict[str, list[int]]:
    """{"type-list": [line], "type-copy": [line], "type-selection": [line]} of one module (docstring)."""
    kv_blocks = kv & blocks
    out = {"type-list": [], "type-copy": [], "type-selection": []}
    documented = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and _call_name(n) == "selection":
            inside = {id(m) for a in n.args for m in ast.walk(a)}
            if any((_names_in(m, names) or set()) & blocks for a in n.args for m in ast.walk(a)):
                out["type-selection"].append(n.lineno)
            documented |= inside
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            keys = {k.value.lower() for k in n.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                    and k.value.lower() in names}
            if (len(keys) >= 2 and keys & blocks and n.values and all(
                    isinstance(v, ast.Constant) and type(v.value) is int for v in n.values)):
                out["type-copy"].append(n.lineno)
            continue
        joined = _names_in_string(n, names)
        found = joined if joined is not None else _names_in(n, names)
        if id(n) in documented or not found or len(found) < 2 or not found & blocks:
            continue
        if joined is None:
            out["type-list"].append(n.lineno)
        if 2 * len(found & kv) >= len(kv) or kv_blocks <= found:
            out["type-copy"].append(n.lineno)
    return out


def measure() -> dict:
    """{"files": {path: {metric: [line, ...]}}, "totals": {metric: count}, "cycles": [[module, ...]],
    "local_imports": [[path, line, module]]}; metrics: :data:`METRICS`."""
    names, blocks = type_names()
    kv = kv_type_names()
    per_file: dict[str, dict[str, list[int]]] = {}
    for path in files():
        rel = str(path.relative_to(ROOT))
        src = path.read_text()
        tree = ast.parse(src, rel)
        found: dict[str, list[int]] = {}
        if not rel.startswith(REGISTRY):
            found["op-compare"] = [i for i, line in enumerate(src.splitlines(), 1)
                                   if not line.lstrip().startswith("#") and OP_COMPARE.search(line)]
        fns = _functions(tree)
        lines = src.splitlines()
        found["alibi"] = [f.lineno for f in fns if _is_alibi(f, lines)]
        found["golden"] = [f.lineno for f in fns if _is_golden(f)]
        found["nmse"] = _nmse_sites(tree)
        if rel != TYPE_TABLE:
            found.update(_type_lists(tree, names, blocks, kv))
        found = {k: v for k, v in found.items() if v}
        if found:
            per_file[rel] = found
    ig = _load_import_graph()
    edges, local = ig.graph()
    cycles = ig.cycles(edges)
    totals = {m: sum(len(f.get(m, ())) for f in per_file.values())
              for m in METRICS}
    totals["op-compare-modules"] = sum(1 for f in per_file.values() if f.get("op-compare"))
    totals["cycles"] = len(cycles)
    totals["local-imports"] = len(local)
    return {"files": per_file, "totals": totals, "cycles": cycles,
            "local_imports": [[f, line, name] for f, line, name in local]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tests/arch_metrics.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")
    a = p.parse_args(argv)
    m = measure()
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    for metric in METRICS:
        rows = [(f, v[metric]) for f, v in m["files"].items() if v.get(metric)]
        print(f"## {metric}: {sum(len(x) for _, x in rows)} in {len(rows)} files")
        for f, lines in rows:
            print(f"  {f}: {len(lines)}  (lines {', '.join(map(str, lines))})")
    print(f"## cycles: {len(m['cycles'])}")
    for c in m["cycles"]:
        print("  " + " <-> ".join(c))
    by_file: dict[str, int] = {}
    for f, _, _ in m["local_imports"]:
        by_file[f] = by_file.get(f, 0) + 1
    print(f"## local-imports (function-level, non-optional): {len(m['local_imports'])} in {len(by_file)} files")
    for f, n in sorted(by_file.items()):
        print(f"  {f}: {n}")
    print("## totals: " + ", ".join(f"{k}={v}" for k, v in m["totals"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
