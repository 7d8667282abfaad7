"""The attention family's shared pieces: the trace roles, the generic precision models (f64, f32,
f16) and the fallback, built for one op's rounding facts.

SKELETON (step 1 of #15): the behaviour still lives in ``jaxkv.verify``; these wrappers give the
registry its final interface while the code moves here.
"""

from __future__ import annotations

import importlib


class _Verify:
    """jaxkv.verify, imported on first use (verify imports the ops registry's users; the skeleton must
    not load it, and its diagnosis, when only the registry is imported)."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("jaxkv.verify"), name)


_V = _Verify()

QUANT = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")
KV = ("f32", "f16") + QUANT
COMMON_ROLES = {"q": ("f32",), "out": ("f32",), "mask": ("f16", "f32"), "sinks": ("f32",)}


def _trace_model(precision):
    return lambda trace, case, **config: _V.model_output(trace, case, precision, **config)


def models(precisions=("ggml-cpu", "f16", "f32", "f64")):
    """precision -> model (trace, case, **config) -> out, the ones verify.model_output has."""
    return {p: _trace_model(p) for p in precisions}


def case(trace):
    return _V.case_from_trace(trace)


def golden(case_):
    return _V.golden_output(case_)


def reference(op_name):
    return lambda case_, precision: _V.golden_for(op_name, case_, precision)


def acc_unit(trace):
    return _V._acc_unit(trace)


def fallback(trace, case_):
    return _V.fallback_model(trace, case_)
