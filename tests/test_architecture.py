"""Architecture invariants of issue #15, measured from the source by tests/arch_metrics.py.

Each assertion is one that holds on this branch: no op-name comparisons outside jaxkv/ops, one golden
(jaxkv/ops/golden.py), one NMSE (jaxkv/budget.py), ALiBi only in jaxkv/alibi.py, no copies of the type
table and no undocumented type-name lists outside jaxkv/formats.py, no import cycles, and no
non-optional function-level imports in the modules listed in CLEAN.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: modules already clean of type-name lists and non-optional function-level imports
CLEAN = ("jaxkv/ggml_cpu/", "jaxkv/attention.py", "jaxkv/precision.py", "jaxkv/cache.py", "jaxkv/layout.py",
         "jaxkv/formats.py", "jaxkv/alibi.py", "jaxkv/libm.py", "jaxkv/outliers.py", "jaxkv/sensitivity.py",
         "jaxkv/oracles/ggml.py", "jaxkv/oracles/ggml_lib.py", "jaxkv/oracles/__init__.py", "jaxkv/cli.py",
         "jaxkv/__init__.py", "jaxkv/_checks.py", "jaxkv/textsafe.py", "benchmarks/", "jaxkv/budget.py",
         "jaxkv/realstudy.py", "fuzz/engine.py", "fuzz/cases.py", "fuzz/strategies.py", "fuzz/ggml_targets.py",
         "fuzz/sensitivity_cmd.py", "jaxkv/ops/")


@pytest.fixture(scope="module")
def metrics():
    return _load("arch_metrics").measure()


def _in_clean(path: str) -> bool:
    return path.startswith(CLEAN)


def test_no_import_cycles(metrics):
    assert metrics["cycles"] == []


def test_alibi_slopes_have_one_home(metrics):
    homes = {f for f, v in metrics["files"].items() if v.get("alibi")}
    assert homes == {"jaxkv/alibi.py"}


def test_no_op_name_comparisons_outside_the_registry(metrics):
    assert metrics["totals"]["op-compare"] == 0, {f: v["op-compare"] for f, v in metrics["files"].items()
                                                  if v.get("op-compare")}


def test_one_golden_and_one_nmse(metrics):
    for metric, home in (("golden", "jaxkv/ops/golden.py"), ("nmse", "jaxkv/budget.py")):
        sites = {f: v[metric] for f, v in metrics["files"].items() if v.get(metric)}
        assert list(sites) == [home] and len(sites[home]) == 1, (metric, sites)


def test_no_type_table_copies_or_undocumented_type_lists(metrics):
    """Outside jaxkv/formats.py every list of type names derives from the table or is a documented
    selection (jaxkv.formats.selection)."""
    for metric in ("type-copy", "type-list"):
        bad = {f: v[metric] for f, v in metrics["files"].items() if v.get(metric)}
        assert bad == {}, (metric, bad)


def test_clean_modules_hold_no_type_lists(metrics):
    bad = {f: v["type-list"] for f, v in metrics["files"].items() if _in_clean(f) and v.get("type-list")}
    assert bad == {}


def test_imports_at_module_level(metrics):
    """Function-level imports only for optional dependencies (tests/import_graph.py's list: the ggml
    library, llama_cpp, matplotlib, ...): none other in the tree."""
    assert metrics["local_imports"] == [], metrics["local_imports"]


def test_detectors_find_what_they_look_for(tmp_path):
    """The detectors are not vacuous: each finds its pattern in a snippet."""
    am = _load("arch_metrics")
    import ast

    src = ('def s(n, max_bias):\n    return [2 ** (-max_bias / n) for _ in range(n)]\n'
           'def p(a, b):\n    return powf(a, b)\n'
           'def nmse(x, r):\n    return ((x - r) ** 2).sum() / (r ** 2).sum()\n'
           'T = ("q4_0", "Q8_0")\nU = ("f16", "f32")\n'
           'def golden_x(s):\n    return np.exp(s)\n')
    tree = ast.parse(src)
    fns = am._functions(tree)
    assert [f.name for f in fns if am._is_alibi(f, src.splitlines())] == ["s", "p"]
    assert [f.name for f in fns if am._is_golden(f)] == ["golden_x"]
    assert am._nmse_sites(tree) == [5]
    names, blocks = am.type_names()
    kv = am.kv_type_names()
    assert kv == {"f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"}
    assert am._type_lists(tree, names, blocks, kv) == {"type-list": [7], "type-copy": [], "type-selection": []}
    src = ('A = ("f32", "f16", "q4_0", "q8_0")\n'  # half of the K/V types: a copy
           'B = "q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl"\n'  # every block K/V type as a CLI default: a copy
           'C = "q8_0,q4_0"\n'  # an argument value: neither
           'D = {"f32": 0, "q4_0": 2}\n'  # type ids keyed by name: a copy
           'E = {"q4_0": ("absmax", 8.0), "q5_0": ("absmax", 16.0)}\n'  # per-type data: neither
           'F = selection("why", (("F16", "Q8_0"), ("Q4_0", "Q4_1")))\n')  # documented: a selection
    got = am._type_lists(ast.parse(src), names, blocks, kv)
    assert got == {"type-list": [1], "type-copy": [1, 2, 4], "type-selection": [6]}, got
    assert am.OP_COMPARE.search('if op == "soft_max_attn":') and not am.OP_COMPARE.search('op = "soft_max_attn"')
