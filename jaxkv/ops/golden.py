"""The float64 golden of the attention family and the dense case it reads (:class:`Case`).

Everything here is numpy float64 on dense arrays (quantized K/V already dequantized): a golden is
evaluated for every bug hypothesis of a failing trace (:mod:`jaxkv.verify.mutations`), each with its
own shapes, so a compiled JAX function per variant would cost more than the arithmetic. ``golden(case)``
without a hook equals ``jaxkv.attention.attention(..., precision="f64")`` (tested).

Layout (canonical, see ``jaxkv.attention``)::

    q [B, n_q, H, Dk]   k [B, n_kv, Hkv, Dk]   v [B, n_kv, Hkv, Dv]   (KV axis in the kernel's order)
    mask [B|1, H|1, n_q, n_kv] additive (-inf masks) or None   sinks [H] or None   out [B, n_q, H, Dv]

The hooks of :func:`golden` are the bugs inside the computation that the diagnosis tests (softcap
applied twice, a split-K chunk merged without rescaling). :func:`dead_rows` is the one dead-row rule
(rows with no live key and no sink).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxkv import alibi

__all__ = ["Case", "golden", "logits", "weighted_values", "alibi_slopes_np", "dead_rows"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call on dense float64 operands (the trace's exact, dequantized inputs).

    ``regions``: the KV axis as named contiguous pieces ``((name, start, stop), ...)`` in the kernel's
    order (``mixed_flash_attn``: ``cold`` and ``hot``; otherwise empty). ``n_threads`` drives ggml's
    split-KV chunking. ``mask_f16``: the mask is stored as F16 (trace v1 always stores it so).
    ``kv_exact``: for a mixed cache, ``(k, v)`` at the cache's own dequantized values before the op's
    F16 rounding of the concatenated cache (a kernel may skip that rounding: :func:`readings`), else
    None."""

    op: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None
    sinks: np.ndarray | None = None
    scale: float = 1.0
    softcap: float = 0.0
    max_bias: float = 0.0
    n_threads: int = 1
    regions: tuple = ()
    mask_f16: bool = True
    kv_exact: tuple | None = None

    @property
    def dims(self):
        """(B, n_q, H, Hkv, n_kv, Dk, Dv)."""
        B, n_q, H, Dk = self.q.shape
        return B, n_q, H, self.k.shape[2], self.k.shape[1], Dk, self.v.shape[3]



def alibi_slopes_np(n_head: int, max_bias: float) -> np.ndarray:
    """ggml's ALiBi slopes [H] (float32 arithmetic like ggml's powf), as float64; ones if max_bias <= 0."""
    return alibi.slopes(n_head, max_bias, "numpy")


def logits(case: Case, softcap_twice: bool = False) -> np.ndarray:
    """Per-key logits s [B, H, n_q, n_kv] float64: ``scale q.k``, soft cap, ``+ slope * mask``; -inf
    where the key is skipped (``slope * mask == -inf``)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    g = H // Hkv
    qg = np.transpose(case.q.reshape(B, n_q, Hkv, g, Dk), (0, 2, 3, 1, 4)).reshape(B, Hkv, g * n_q, Dk)
    kt = np.transpose(case.k, (0, 2, 3, 1))  # [B, Hkv, Dk, n_kv]
    with np.errstate(all="ignore"):
        s = np.matmul(qg, kt).reshape(B, H, n_q, n_kv) * case.scale
        c = case.softcap
        if c:
            s = c * np.tanh(s / c)
            if softcap_twice:
                s = c * np.tanh(s / c)
        if case.mask is not None:
            bias = case.mask * alibi_slopes_np(H, case.max_bias)[None, :, None, None]
            s = np.where(bias == -np.inf, -np.inf, s + bias)
    return s


def weighted_values(case: Case, p: np.ndarray) -> np.ndarray:
    """sum_j p[b, h, i, j] v[b, j, h // G] -> [B, H, n_q, Dv] for weights p [B, H, n_q, n_kv]
    (p == 0 marks skipped keys: their V is never read, so NaN/inf there cannot reach the result)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    g = H // Hkv
    v = case.v
    if not np.all(np.isfinite(v)):
        used = np.any(p != 0, axis=(2,))  # [B, H, n_kv]
        ve = np.transpose(np.repeat(v, g, axis=2), (0, 2, 1, 3))  # [B, H, n_kv, Dv]
        ve = np.where(used[..., None], ve, 0.0)
        return np.matmul(p, ve)
    pg = p.reshape(B, Hkv, g * n_q, n_kv)
    return np.matmul(pg, np.transpose(v, (0, 2, 1, 3))).reshape(B, H, n_q, Dv)


def golden(case: Case, *, softcap_twice: bool = False, unrescaled=None) -> np.ndarray:
    """float64 attention of ``case`` -> out [B, n_q, H, Dv], with ``jaxkv.attention``'s NaN semantics
    (a NaN input reaching a row makes it NaN, never zeros). Hooks (bugs): ``softcap_twice`` applies
    the soft cap a second time; ``unrescaled=(bounds, i)`` computes the KV chunks ``bounds`` (list of
    (start, stop)) as partial states and merges chunk ``i`` without its ``exp(m_i - M)`` factor."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    s = logits(case, softcap_twice)
    bounds = [(0, n_kv)] if unrescaled is None else list(unrescaled[0])
    ms = []
    for a, b in bounds:
        sc = s[..., a:b]
        ms.append(sc.max(axis=-1) if b > a else np.full(s.shape[:-1], -np.inf))
    M = np.max(np.stack(ms), axis=0)
    if case.sinks is not None:
        sk = np.broadcast_to(np.asarray(case.sinks, np.float64)[None, :, None], (B, H, n_q))
        M = np.maximum(M, sk)
    Ms = np.where(M == -np.inf, 0.0, M)
    # each key's weight exp(s - M); a chunk merged without rescaling keeps exp(s - m_chunk)
    ref = np.broadcast_to(Ms[..., None], s.shape).copy()
    if unrescaled is not None:
        a, b = bounds[unrescaled[1]]
        mi = ms[unrescaled[1]]
        ref[..., a:b] = np.where(mi == -np.inf, 0.0, mi)[..., None]
    with np.errstate(all="ignore"):
        p = np.where(s == -np.inf, 0.0, np.exp(s - ref))
    L = p.sum(-1)
    if case.sinks is not None:
        L = L + np.exp(sk - Ms)
    A = weighted_values(case, p)
    with np.errstate(all="ignore"):  # L == 0: no live key, no sink -> 0; a NaN L propagates
        out = np.where(L[..., None] == 0, 0.0, A / np.where(L == 0, 1.0, L)[..., None])
    if not (math.isfinite(case.scale) and math.isfinite(case.softcap)):
        out = np.full_like(out, np.nan)  # undefined (jaxkv.attention's NaN semantics)
    return np.transpose(out, (0, 2, 1, 3))


def dead_rows(q, mask, sinks=None) -> np.ndarray:
    """bool [B, n_q, H]: output rows with no live key (every mask value -inf) and no sink, for q
    [B, n_q, H, Dk], mask [B|1, H|1, n_q, n_kv] or None, sinks [H] or None."""
    B, n_q, H = np.shape(q)[:3]
    if mask is None or sinks is not None:
        return np.zeros((B, n_q, H), bool)
    d = np.all(np.asarray(mask) == -np.inf, axis=-1)  # [B|1, H|1, n_q]
    return np.broadcast_to(np.transpose(d, (0, 2, 1)), (B, n_q, H)).copy()
