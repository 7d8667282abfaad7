"""Undecided verdicts: an undefined reference (a non-finite input the golden reads, or a golden that
overflows), a budget above the signal (it would pass the all-zero output).

Layout: ``case`` a dense :class:`jaxkv.ops.golden.Case` (q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk],
v [B, n_kv, Hkv, Dv], mask [B|1, H|1, n_q, n_kv], sinks [H]); golden, emu [B, n_q, H, Dv].
"""

from __future__ import annotations

import math

import numpy as np

from jaxkv import ops
from jaxkv.budget import U32, Budget, emu_check, errors
from jaxkv.ops.golden import Case

__all__ = ["undefined_inputs", "reference_undefined", "below_signal"]

_LAYOUTS = {"q": "b, query, head, dim", "k": "b, key, kv head, dim", "v": "b, key, kv head, dim",
            "mask": "b, head, query, key", "sinks": "head"}


def _live_keys(case: Case) -> np.ndarray:
    """bool [B, n_kv, Hkv]: keys that some query row of their batch row and KV head group reads (the
    mask is not -inf for it in every row); all True without a mask."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    if case.mask is None:
        return np.ones((B, n_kv, Hkv), bool)
    m = np.asarray(case.mask)
    read = np.any(m != -np.inf, axis=2)  # [Bm, Hm, n_kv]
    if read.shape[1] == 1:
        read = np.broadcast_to(read, (read.shape[0], Hkv, n_kv))
    else:
        read = np.any(read.reshape(read.shape[0], Hkv, H // Hkv, n_kv), axis=2)
    return np.broadcast_to(np.transpose(read, (0, 2, 1)), (B, n_kv, Hkv))


def _first_bad(name: str, x: np.ndarray, bad: np.ndarray) -> str | None:
    n = int(np.count_nonzero(bad))
    if not n:
        return None
    i = tuple(int(a) for a in np.argwhere(bad)[0])
    return (f"{name}[{', '.join(map(str, i))}] ({_LAYOUTS[name]}) = {float(x[i])}"
            f"{f' (first of {n})' if n > 1 else ''}")


def undefined_inputs(case: Case) -> tuple[str, ...]:
    """The inputs of ``case`` that make the reference undefined, one string each naming the tensor,
    its first offending index (with the layout) and value: ``scale``, ``softcap`` NaN/inf,
    ``max_bias`` NaN; q NaN/inf; K or V NaN/inf at a key some row reads (:func:`_live_keys`; a key
    masked in every row is never read); a mask entry NaN or +inf; a sink NaN or +inf. Empty when all
    are defined."""
    out = [f"{n} = {x}" for n, x in (("scale", case.scale), ("softcap", case.softcap))
           if not math.isfinite(x)]
    if math.isnan(case.max_bias):
        out.append(f"max_bias = {case.max_bias}")
    q = np.asarray(case.q)
    out.append(_first_bad("q", q, ~np.isfinite(q)))
    live = _live_keys(case)[..., None]
    for name, x in (("k", np.asarray(case.k)), ("v", np.asarray(case.v))):
        out.append(_first_bad(name, x, ~np.isfinite(x) & live))
    for name, x in (("mask", case.mask), ("sinks", case.sinks)):
        if x is not None:
            x = np.asarray(x)
            out.append(_first_bad(name, x, np.isnan(x) | (x == np.inf)))
    return tuple(x for x in out if x)


def reference_undefined(case: Case, golden=None) -> str | None:
    """Why the float64 reference of ``case`` is undefined (its output holds NaN or inf), or None.
    ``golden``: the op's golden of the case if already computed."""
    g = ops.get(case.op, "case.op").golden(case) if golden is None else np.asarray(golden, np.float64)
    bad = ~np.isfinite(g)
    if not bad.any():
        return None
    causes = undefined_inputs(case)
    if causes:
        return "reference undefined: non-finite input " + "; ".join(causes)
    i = tuple(int(a) for a in np.argwhere(bad)[0])
    return (f"reference undefined: the golden overflows to {g[i]} at out[{', '.join(map(str, i))}] "
            f"(b, query, head, dim) on finite inputs")


def below_signal(budget: Budget, golden, emu=None, emu_unit: float = U32) -> bool:
    """Whether a verdict can tell a result from nothing: True when it rejects the all-zero output
    (on the golden's finite elements) — by the golden budget (NMSE 1 > ``budget.nmse`` or
    ``max|golden|`` > ``budget.max_abs``) or by the sharp check against ``emu`` [B, n_q, H, Dv].
    A verdict that rejects zero also rejects the sign-flipped output (NMSE 4, max-abs
    ``2 max|golden|``, twice the emulation distance). True when the golden is zero everywhere (a zero
    output is then the right answer)."""
    g = np.asarray(golden, np.float64)
    fin = np.isfinite(g)
    if not np.any(g[fin] != 0):
        return True
    zero = np.where(fin, 0.0, g)
    if not budget.allows(errors(zero, g)):
        return True
    if emu is not None:
        e = np.asarray(emu, np.float64)
        return not emu_check(np.where(np.isfinite(e), 0.0, e), e, emu_unit).ok
    return False
