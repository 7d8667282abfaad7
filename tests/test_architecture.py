"""Architecture invariants of issue #15, measured from the source by tests/arch_metrics.py.

Each assertion is one that holds on this branch; the others (op-name comparisons outside jaxkv/ops, one
golden, one NMSE, no type lists anywhere) become assertions here as the work lands.
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
         "jaxkv/__init__.py", "jaxkv/_checks.py", "jaxkv/textsafe.py", "benchmarks/")


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


def test_clean_modules_hold_no_type_lists(metrics):
    bad = {f: v["type-list"] for f, v in metrics["files"].items() if _in_clean(f) and v.get("type-list")}
    assert bad == {}


def test_clean_modules_import_at_module_level(metrics):
    bad = [x for x in metrics["local_imports"] if _in_clean(x[0])]
    assert bad == []


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
    assert am._type_lists(tree, names, blocks) == [7]
    assert am.OP_COMPARE.search('if op == "soft_max_attn":') and not am.OP_COMPARE.search('op = "soft_max_attn"')
