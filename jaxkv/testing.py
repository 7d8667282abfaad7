"""``assert_attention_close``: the verdict of ``python -m fuzz verify`` for users' own pytest suites.

Layout (canonical)::

    out   [B, n_q, H, Dv]       the kernel's output under test
    q     [B, n_q, H, Dk]       float32 (the kernel's query)
    k     [B, n_kv, Hkv, Dk]    float32 / float16 array (F32 / F16 cache) or formats.QuantArray
    v     [B, n_kv, Hkv, Dv]    as k
    mask  [B|1, H|1, n_q, n_kv] additive, -inf masks a key      sinks [H]

The call is judged exactly as a trace of ``flash_attn_ext`` with these tensors is judged by
``jaxkv.verify.verify_trace``: golden float64 reference, budget derived from the honest model of
``precision`` (docs/tolerance.md), the sharp emulation check under ``ggml-cpu``, the diagnosis of a
failure, and ``undecided`` when no verdict can be trusted (an undefined reference, a budget that would
pass an all-zero output). A failure raises AssertionError with a ``torch.testing.assert_close``-style
message (mismatched elements, greatest absolute and relative difference and where) plus NMSE, budget
and diagnosis.
"""

from __future__ import annotations

import math

import numpy as np

from jaxkv import formats
from jaxkv import verify as vf
from jaxkv.trace import Trace

__all__ = ["assert_attention_close", "mismatch_report"]


def _as_kv(x):
    """K/V as the kernel's storage type: QuantArray kept, float16 kept, anything else float32."""
    if formats.is_quant(x):
        return x
    x = np.asarray(x)
    return x if x.dtype == np.float16 else x.astype(np.float32)


def _index(i) -> str:
    return "(" + ", ".join(str(int(a)) for a in i) + ")"


def mismatch_report(out, golden, budget: vf.Budget) -> list[str]:
    """The ``torch.testing.assert_close``-style lines for ``out`` vs ``golden`` (both [B, n_q, H, Dv])
    under ``budget``: mismatched elements (|out - golden| above ``budget.max_abs``, or NaN where the
    golden has none), greatest absolute difference and greatest relative difference (``|d| / |golden|``)
    with their index (b, query, head, dim) and what was allowed there, and the NMSE."""
    got = np.asarray(out, np.float64)
    g = np.asarray(golden, np.float64)
    with np.errstate(all="ignore"):
        d = np.where(np.isnan(got) & np.isnan(g), 0.0, np.abs(got - g))
    d = np.where(np.isnan(d), np.inf, d)
    bad = d > budget.max_abs
    lines = [f"Mismatched elements: {int(bad.sum())} / {d.size} ({100.0 * bad.mean() if d.size else 0:.1f}%)"]
    if d.size:
        ia = np.unravel_index(int(np.argmax(d)), d.shape)
        lines.append(f"Greatest absolute difference: {d[ia]:.6g} at index {_index(ia)} (up to "
                     f"{budget.max_abs:.3g} allowed)")
        with np.errstate(all="ignore"):
            rel = np.where(d == 0, 0.0, d / np.abs(np.where(np.isfinite(g), g, np.nan)))
        rel = np.where(np.isnan(rel), np.inf, rel)
        ir = np.unravel_index(int(np.argmax(rel)), rel.shape)
        ag = abs(g[ir]) if math.isfinite(g[ir]) else 0.0
        allowed = budget.max_abs / ag if ag else math.inf
        lines.append(f"Greatest relative difference: {rel[ir]:.6g} at index {_index(ir)} (up to "
                     f"{allowed:.3g} allowed there: the absolute budget / |golden|)")
    e = vf.errors(got, g)
    lines.append(f"NMSE: {e.nmse:.3g} (up to {budget.nmse:.3g} allowed)")
    return lines


def assert_attention_close(out, q, k, v, *, scale=None, mask=None, sinks=None, softcap=0.0,
                           max_bias=0.0, precision="f32", n_threads=1, isa=None, diagnose=True,
                           allow_undecided=False) -> vf.Verdict:
    """Assert that ``out`` [B, n_q, H, Dv] is ``flash_attn_ext(q, k, v, ...)`` (layout in the module
    docstring) within the budget of ``precision`` (``"f64"``, ``"f32"``, ``"f16"``, ``"ggml-cpu"``:
    ``jaxkv.verify.PRECISIONS``). ``scale`` defaults to ``1 / sqrt(Dk)``; under ``ggml-cpu`` the mask
    is rounded to F16 first (ggml's mask tensor is F16), otherwise used as given; ``n_threads`` and ``isa``
    (``jaxkv.ggml_cpu.ISAS``) configure the ``ggml-cpu`` emulation. Returns the
    :class:`jaxkv.verify.Verdict` when it passes (or is undecided and ``allow_undecided``); raises
    AssertionError on a failure (message: mismatches, greatest differences, NMSE, budget, diagnosis)
    and on an undecided verdict (why no verdict can be trusted) unless ``allow_undecided``."""
    if precision == "auto" or precision not in vf.PRECISIONS:
        raise ValueError(f"precision: expected one of {vf.PRECISIONS[1:]}, got {precision!r}")
    q = np.asarray(q, np.float32)
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, n_q, H, Dk], got shape {list(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    md = {} if isa is None else {"ggml.isa": str(isa)}
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if precision == "ggml-cpu":  # ggml reads its mask as F16: judge against the values it used
            mask = mask.astype(np.float16).astype(np.float32)
    t = Trace(path=None, op="flash_attn_ext", producer="jaxkv.testing", scale=float(scale),
              max_bias=float(max_bias), softcap=float(softcap), n_threads=int(n_threads), kv_order=None,
              metadata=md, q=q, out=np.asarray(out, np.float32), k=_as_kv(k), v=_as_kv(v),
              mask=mask,
              sinks=None if sinks is None else np.asarray(sinks, np.float32))
    verdict = vf.verify_trace(t, precision, name="attention output", diagnose=diagnose)
    if verdict.status == "pass" or (verdict.status == "undecided" and allow_undecided):
        return verdict
    model = verdict.budget.model if verdict.budget is not None else precision
    if verdict.status == "undecided":
        head = (f"Attention output cannot be judged (UNDECIDED under precision {precision}, model "
                f"{model}): {verdict.reason}")
    else:
        head = f"Attention output is not close (FAIL under precision {precision}, model {model})!"
    case = vf.case_from_trace(t)
    g = vf.golden_for(t.op, case, precision)
    lines = [head] + mismatch_report(t.out, g, verdict.budget) + [verdict.details()]
    raise AssertionError("\n".join(lines))
