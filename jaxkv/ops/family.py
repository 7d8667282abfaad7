"""The attention family's shared pieces, built for one op's rounding facts: the trace roles, the generic
precision models (``f64``, ``f32``, ``f16``) and their dense forms, the fallback model, the golden an
op is judged against, the V accumulator's unit, the ``ggml-cpu`` build keywords and the alternative
build configurations the diagnosis reruns the emulation with.

Every model takes ``(trace, case, **config)`` and returns out [B, n_q, H, Dv] float64, for a trace in
canonical layout (q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask
[B|1, H|1, n_q, n_kv], sinks [H]) and its dense float64 :class:`jaxkv.ops.golden.Case`. ``kv_f16``: the
op rounds its whole KV cache to F16 (the mixed cache): q is then rounded to F16 for ``K . q`` and V is
accumulated in F16.
"""

from __future__ import annotations

import numpy as np

from jaxkv import formats, ggml_cpu
from jaxkv.attention import attention
from jaxkv.budget import U16, U32
from jaxkv.ops import ggml_build
from jaxkv.ops.golden import Case, dead_rows, golden
from jaxkv.ops.operands import dot_type, type_name
from jaxkv.precision import f16_attention

__all__ = ["QUANT", "KV", "COMMON_ROLES", "acc_unit", "unit_of", "f64_model", "f32_model", "f16_model",
           "models", "dense_models", "fallback", "dead_rows_nan", "ggml_kw", "fused_kw", "tries",
           "kv_order_tries", "kv_split", "split_tries", "isa_tries", "live_kv", "live_kw"]

QUANT = formats.BLOCK_KV_TYPES
KV = formats.KV_TYPES
COMMON_ROLES = {"q": ("f32",), "out": ("f32",), "mask": ("f16", "f32"), "sinks": ("f32",)}


def acc_unit(mixed: bool, v_f16: bool) -> float:
    """Unit roundoff of the quantity ggml accumulates V in: ``U16`` for the mixed cache (``mixed``) or
    F16 V (``v_f16``: F16 accumulator, or F16 probabilities of the unfused path), ``U32`` otherwise."""
    return U16 if mixed or v_f16 else U32


def unit_of(kv_f16: bool):
    """``trace -> acc_unit`` for an op (``kv_f16``: the mixed cache, else V's stored type decides)."""
    if kv_f16:
        return lambda trace: U16
    return lambda trace: acc_unit(False, type_name(trace.v) == "f16")


def _q_dot(trace, kv_f16: bool) -> str:
    return "f16" if kv_f16 else dot_type(trace.k)


def f64_model(trace, case: Case, **config) -> np.ndarray:
    """The float64 golden itself (the budget is the floor)."""
    return golden(case)


def _f32(case: Case) -> np.ndarray:
    f = np.float32
    return np.asarray(attention(case.q.astype(f), case.k.astype(f), case.v.astype(f),
                                scale=case.scale, mask=None if case.mask is None
                                else case.mask.astype(f), softcap=case.softcap,
                                max_bias=case.max_bias, sinks=None if case.sinks is None
                                else case.sinks.astype(f), precision="f32"), np.float64)


def f32_model(trace, case: Case, **config) -> np.ndarray:
    """``jaxkv.attention(precision="f32")`` on the case's operands rounded to float32."""
    return _f32(case)


def _f16(case: Case, dot: str, kv_f16: bool, acc=None) -> np.ndarray:
    kw = {} if acc is None else dict(acc=acc)
    return np.asarray(f16_attention(case.q, case.k, case.v, scale=case.scale, mask=case.mask,
                                    softcap=case.softcap, max_bias=case.max_bias, sinks=case.sinks,
                                    dot_type=dot, kv_f16=kv_f16, **kw), np.float64)


def f16_model(kv_f16: bool):
    """The generic F16 model (:func:`jaxkv.precision.f16_attention`) with the trace's dot type."""
    return lambda trace, case, **config: _f16(case, _q_dot(trace, kv_f16), kv_f16)


def models(kv_f16: bool, ggml_cpu_model) -> dict:
    """precision -> model for an op: the generic ``f64``/``f32``/``f16`` models and its own ``ggml-cpu``
    emulation ``ggml_cpu_model``, in :data:`jaxkv.ops.PRECISIONS` order."""
    return {"ggml-cpu": ggml_cpu_model, "f16": f16_model(kv_f16), "f32": f32_model, "f64": f64_model}


def dense_models(kv_f16: bool) -> dict:
    """precision -> ``trace -> (case -> out)``: the honest model of a precision as a function of a dense
    case (budgets re-derived on a bug's inputs); ``f64`` absent (the budget is the floor); ``f32`` ->
    ``attention(precision="f32")``; ``f16`` and ``ggml-cpu`` -> the f16 model with the trace's dot type
    (the emulation needs typed operands; the generic model makes the same roundings)."""
    def f16(trace):
        dot = _q_dot(trace, kv_f16)
        return lambda c: _f16(c, dot, kv_f16)
    return {"ggml-cpu": f16, "f16": f16, "f32": lambda trace: _f32}


def fallback(kv_f16: bool):
    """``(trace, case) -> (out, model name)``: the model used when the declared one does not cover a
    trace (a ggml path ``jaxkv.ggml_cpu`` does not emulate): the generic model with the trace's
    roundings — q rounded to K's dot type (F16 for the mixed cache), the V accumulator of
    :func:`acc_unit`. Its budget holds every kernel that rounds no more than that (ggml's tiled path
    rounds less: q not rounded, F32 accumulator); it has no sharp check."""
    unit = unit_of(kv_f16)

    def fn(trace, case):
        dot = _q_dot(trace, kv_f16)
        acc = "f16" if unit(trace) == U16 else "f32"
        return _f16(case, dot, kv_f16, acc), f"generic model (q as {dot}, {acc} accumulator)"
    return fn


def dead_rows_nan(precisions: tuple[str, ...]):
    """``(case, precision) -> golden`` for an op whose rows with no live key (:func:`dead_rows`) are
    NaN under ``precisions``: ggml's ``soft_max_ext`` of an all -inf row computes ``exp(-inf - -inf)``
    (docs/ggml-findings.md, finding 2), where the fused op's ``S == 0`` guard gives 0. NaN in both the
    golden and the kernel is no error, so a kernel that reproduces ggml passes, and the sharp check
    against the emulation (NaN there too) still requires NaN in exactly those rows."""
    def ref(case, precision):
        g = golden(case)
        if precision in precisions:
            dead = dead_rows(case.q, case.mask, case.sinks)
            if dead.any():
                g = np.where(dead[..., None], np.nan, g)
        return g
    return ref


# ----------------------------------------------------------------------------------------------------
# ggml-cpu


def ggml_kw(trace, case: Case, config: dict) -> dict:
    """The keywords every ``jaxkv.ggml_cpu`` op takes, from the trace and ``config`` (``isa`` overriding
    the trace's :func:`jaxkv.ops.ggml_build.trace_isa`)."""
    isa = config["isa"] if config.get("isa") is not None else ggml_build.trace_isa(trace)
    return dict(scale=case.scale, mask=trace.mask, max_bias=case.max_bias, isa=isa,
                contract=ggml_build.trace_contract(trace, isa))


def fused_kw(trace, case: Case, config: dict) -> dict:
    """:func:`ggml_kw` plus the fused (flash) path's: softcap, sinks, ``n_threads`` (``config`` overriding
    the trace's), the ggml version."""
    return dict(ggml_kw(trace, case, config), softcap=case.softcap, sinks=trace.sinks,
                n_threads=config.get("n_threads", case.n_threads), version=ggml_build.trace_version(trace))


def tries(*parts):
    """``(trace, case) -> [(label, trace', config)]``: the concatenation of ``parts``' tries, in order."""
    return lambda trace, case: [t for part in parts for t in part(trace, case)]


def kv_order_tries(trace, case: Case) -> list:
    """The mixed cache's regions in the other order (mask alike)."""
    other = "hot,cold" if trace.kv_order == "cold,hot" else "cold,hot"
    return [(f"computed with kv_order {other} (mask alike), not the declared {trace.kv_order}",
             trace.with_kv_order(other), {})]


def kv_split(kv_f16: bool, k_roles: tuple[str, ...] = ("k",)):
    """``(trace, n_threads) -> chunks``: ggml's split-KV chunk count of the flash path
    (:func:`jaxkv.ggml_cpu.split_chunks`) for the trace's shapes and types (``k_roles``: the roles
    whose token counts add up to n_kv)."""
    def fn(trace, n_threads):
        kt = "f16" if kv_f16 else type_name(trace.k)
        vt = "f16" if kv_f16 else type_name(trace.v)
        B, n_q = np.shape(trace.q)[:2]
        n_kv = sum(np.shape(getattr(trace, r))[1] for r in k_roles)
        return ggml_cpu.split_chunks(n_q, B, kt, vt, n_kv, n_threads)
    return fn


def split_tries(split):
    """Another thread count (ggml's split-KV chunking of the flash path; ``split``: :func:`kv_split`)."""
    def fn(trace, case):
        chunks = {split(trace, case.n_threads)}
        out = []
        for nt in (1, 2, 3, 4, 6, 8, 16, 32):
            c = split(trace, nt)
            if c not in chunks:
                chunks.add(c)
                out.append((f"ran with n_threads={nt} ({c} split-KV chunks), not the recorded "
                            f"{case.n_threads}", trace, {"n_threads": nt}))
        return out
    return fn


def isa_tries(trace, case: Case) -> list:
    """Another SIMD build of ggml-cpu."""
    declared = ggml_build.trace_isa(trace)
    return [(f"a ggml-cpu {isa} build, not {declared}", trace, {"isa": isa})
            for isa in ggml_cpu.ISAS if isa != declared]


# ----------------------------------------------------------------------------------------------------
# live ggml (jaxkv.oracles.ggml)


def live_kv(ts: dict, role: str) -> tuple:
    """(array, format for ``jaxkv.oracles.ggml``) of a stored K/V tensor ``ts[role] = (ggml type, array)``:
    no format for F16 (the array's dtype says it), the type name otherwise."""
    tname, a = ts[role]
    return a, (None if tname == "F16" else tname)


def live_kw(params: dict) -> dict:
    """The keywords every live ggml attention op takes, from a trace's ``params``."""
    return dict(scale=params["scale"], n_threads=params["n_threads"], mask=params["mask"],
                max_bias=params["max_bias"])
