"""Buggy references: the op's float64 golden with named, injectable bugs (the hypotheses of ``diagnose``).

The golden and the dense :class:`Case` it reads live with the ops (:mod:`jaxkv.ops.golden`, re-exported
here); everything here is numpy float64 on dense arrays (quantized K/V already dequantized): a mutated
reference is evaluated for every hypothesis of a failing trace, each with its own shapes, so a
compiled JAX function per variant would cost more than the arithmetic.

Layout (canonical, see ``jaxkv.attention``)::

    q [B, n_q, H, Dk]   k [B, n_kv, Hkv, Dk]   v [B, n_kv, Hkv, Dv]   (KV axis in the kernel's order)
    mask [B|1, H|1, n_q, n_kv] additive (-inf masks) or None   sinks [H] or None   out [B, n_q, H, Dv]

A bug is a :class:`Variant`: a label and a function ``Case -> out`` (float64). Bugs that a kernel
could make in how it reads its inputs are input transforms (``case -> case'``, then the correct
reference); bugs inside the computation (softcap applied twice, a split-K chunk merged without
rescaling) are hooks of :func:`golden`; bugs in how the output is written are permutations of the
correct output. :func:`hypotheses` lists, for one case, every variant of every hypothesis that applies
to it (a hypothesis that cannot change this case's output is not listed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import numpy as np

from jaxkv.ops.golden import Case, alibi_slopes_np, golden, logits, weighted_values

__all__ = ["Case", "Variant", "HYPOTHESES", "golden", "logits", "weighted_values", "hypotheses",
           "kv_chunks", "f16_bits_as_f32", "alibi_slopes_np", "readings", "EXACT_READING"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One concrete bug: ``hypothesis`` (its class), ``label`` (what exactly), ``compute(case)`` -> the
    output [B, n_q, H, Dv] float64 that a kernel with this bug produces on ``case``. Input bugs also
    give ``transform`` (case -> the inputs the buggy kernel effectively uses: apply any reference to
    them); output-order bugs give ``out_index`` (flat gather of the correct output)."""

    hypothesis: str
    label: str
    compute: Callable[[Case], np.ndarray]
    out_index: np.ndarray | None = None
    transform: Callable[[Case], Case] | None = None

    def output(self, case: Case, reference: np.ndarray | None = None) -> np.ndarray:
        """The buggy output on ``case``; an output-permutation bug permutes ``reference`` (the correct
        output, if given) instead of recomputing it."""
        if self.out_index is not None and reference is not None:
            return np.asarray(reference).reshape(-1)[self.out_index].reshape(reference.shape)
        return self.compute(case)


# ----------------------------------------------------------------------------------------------------
# the reference with hooks


# ----------------------------------------------------------------------------------------------------
# chunking facts


def kv_chunks(case: Case) -> list[tuple[int, int]]:
    """ggml's split-KV chunks of ``case`` when more than one: ``n_threads`` contiguous chunks of
    ``ceil(n_kv / n_threads)`` keys; for a mixed cache the region boundaries instead."""
    n_kv = case.k.shape[1]
    if len(case.regions) > 1:
        return [(a, b) for _, a, b in case.regions if b > a]
    if case.n_threads > 1 and n_kv > 1:
        c = -(-n_kv // case.n_threads)
        return [(a, min(a + c, n_kv)) for a in range(0, n_kv, c)]
    return []


# ----------------------------------------------------------------------------------------------------
# input transforms


def f16_bits_as_f32(mask: np.ndarray) -> np.ndarray:
    """The mask [Bm, Hm, n_q, n_kv] as a kernel sees it that reads the F16 buffer as F32: row (h, i)
    starts at its F16 row's byte offset and reads ``n_kv`` F32 words = ``2 n_kv`` F16 values (the
    odd one of each pair is the high half, little endian), running into the next rows; past the end
    of the buffer it reads F16 padding rows of -inf (llama.cpp fills the mask's padding with -inf)."""
    Bm, Hm, n_q, n_kv = mask.shape
    h16 = mask.astype(np.float16).view(np.uint16).reshape(Bm, Hm * n_q * n_kv)
    pad = np.full((Bm, 2 * n_kv), np.float16(-np.inf)).view(np.uint16)
    mem = np.concatenate([h16, pad], axis=1)
    rows = np.arange(Hm * n_q) * n_kv
    idx = rows[:, None] + np.arange(2 * n_kv)[None, :]
    halves = mem[:, idx].astype(np.uint32)  # [Bm, Hm*n_q, 2 n_kv]
    words = halves[..., 0::2] | (halves[..., 1::2] << 16)
    return words.view(np.float32).astype(np.float64).reshape(Bm, Hm, n_q, n_kv)


def _replace(case: Case, **kw) -> Case:
    return dataclasses.replace(case, **kw)


def _drop_keys(case: Case, keep: np.ndarray) -> Case:
    mask = None if case.mask is None else case.mask[..., keep]
    regions, pos = [], 0
    for name, a, b in case.regions:
        n = int(np.count_nonzero(keep[a:b]))
        regions.append((name, pos, pos + n))
        pos += n
    return _replace(case, k=case.k[:, keep], v=case.v[:, keep], mask=mask, regions=tuple(regions))


def _token_head_swap(x: np.ndarray, direction: int) -> np.ndarray:
    """x [B, n, Hkv, D] read through swapped token/head strides. direction 0: memory is head-major
    ([B, Hkv, n, D], ggml's own order) but read as token-major; 1: the reverse."""
    B, n, hkv, d = x.shape
    if direction == 0:
        return np.transpose(x, (0, 2, 1, 3)).reshape(B, n, hkv, d)
    return np.transpose(x.reshape(B, hkv, n, d), (0, 2, 1, 3))


def _per_region(case: Case, x: np.ndarray, fn) -> np.ndarray:
    if not case.regions:
        return fn(x)
    return np.concatenate([fn(x[:, a:b]) for _, a, b in case.regions], axis=1)


# ----------------------------------------------------------------------------------------------------
# hypotheses


class _Via:
    """compute = golden after an input transform (the transform stays visible to other references)."""

    def __init__(self, transform: Callable[[Case], Case]):
        self.transform = transform

    def __call__(self, c: Case) -> np.ndarray:
        return golden(self.transform(c))


_via = _Via


_GGML_AXES = ("Dv", "H", "n_q", "B")  # ne order of out, fastest first; canonical memory order


def _out_permutations(case: Case):
    """Output written in another axis order: the kernel's memory holds out in order ``perm`` (ggml ne
    notation, fastest first) while the reader takes the canonical [Dv, H, n_q, B]."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    shape = (B, n_q, H, Dv)  # numpy order of canonical memory = reversed ne
    base = np.arange(B * n_q * H * Dv)
    seen = {}
    for perm in itertools.permutations(range(4)):
        if perm == (0, 1, 2, 3):
            continue
        idx = np.transpose(base.reshape(shape), perm).reshape(-1)
        if np.array_equal(idx, base):
            continue
        ne = [("B", "n_q", "H", "Dv")[p] for p in perm][::-1]
        label = f"out written as [{', '.join(ne)}] instead of [Dv, H, n_q, B]"
        seen.setdefault(idx.tobytes(), (idx, label))
    out = []
    for idx, label in seen.values():
        out.append((label, lambda c, idx=idx: golden(c).reshape(-1)[idx].reshape(c.q.shape[:3]
                                                                          + (c.v.shape[3],)), idx))
    return out


def _h_out_perm(case):
    return _out_permutations(case)


def _h_gqa(case):
    B, n_q, H, Hkv, *_ = case.dims
    if Hkv in (1, H):
        return []
    idx = np.arange(H) % Hkv
    return [("query head h uses KV head h % Hkv", _via(lambda c: _replace(
        c, k=c.k[:, :, idx], v=c.v[:, :, idx])))]


def _h_kv_swap(case):
    if case.k.shape[3] != case.v.shape[3] or np.array_equal(case.k, case.v):
        return []
    return [("K and V swapped", _via(lambda c: _replace(c, k=c.v, v=c.k)))]


def _h_scale(case):
    dk = case.q.shape[3]
    cands = [("scale 1", 1.0), (f"scale 1/Dk (1/{dk})", 1.0 / dk),
             ("scale applied twice", case.scale * case.scale)]
    return [(lab, _via(lambda c, s=s: _replace(c, scale=s))) for lab, s in cands
            if not math.isclose(s, case.scale, rel_tol=1e-12)]


def _h_softcap(case):
    if not case.softcap:
        return []
    return [("softcap missing", _via(lambda c: _replace(c, softcap=0.0))),
            ("softcap applied twice", lambda c: golden(c, softcap_twice=True))]


def _h_mask(case):
    m = case.mask
    if m is None:
        return []
    out = [("mask ignored", _via(lambda c: _replace(c, mask=None)))]
    Bm, Hm, n_q, n_kv = m.shape
    t = np.swapaxes(m.reshape(Bm, Hm, n_kv, n_q), -1, -2)
    if not np.array_equal(t, m):
        out.append(("mask transposed (read with the query and key strides swapped)",
                    _via(lambda c: _replace(c, mask=np.swapaxes(
                        c.mask.reshape(Bm, Hm, n_kv, n_q), -1, -2)))))
    H, Hkv = case.q.shape[2], case.k.shape[2]
    if Hm > 1:
        g = H // Hkv
        for lab, idx in (("mask of head 0 used for every head", np.zeros(H, int)),
                         ("mask of head h // (H/Hkv) used for head h", np.arange(H) // g),
                         ("mask of head h % Hkv used for head h", np.arange(H) % Hkv)):
            if not np.array_equal(m[:, idx], m):
                out.append((lab, _via(lambda c, idx=idx: _replace(c, mask=c.mask[:, idx]))))
    return out


def _h_alibi(case):
    if case.mask is None or not case.max_bias > 0:
        return []
    return [("ALiBi missing (max_bias ignored)", _via(lambda c: _replace(c, max_bias=0.0)))]


def _h_sinks(case):
    if case.sinks is None:
        return []
    return [("sinks missing", _via(lambda c: _replace(c, sinks=None)))]


def _h_drop(case):
    n_kv = case.k.shape[1]
    if n_kv < 2:
        return []
    pts = [("first KV token dropped", 0), ("last KV token dropped", n_kv - 1)]
    for name, a, b in case.regions:
        if b > a:
            pts += [(f"first {name} KV token dropped", a), (f"last {name} KV token dropped", b - 1)]
    dead = np.zeros(n_kv, bool)
    if case.mask is not None:
        dead = np.all(case.mask == -np.inf, axis=(0, 1, 2))
    out, seen = [], set()
    for lab, j in pts:
        if j in seen or dead[j]:  # a key skipped by every row is never read: dropping it is invisible
            continue
        seen.add(j)
        keep = np.ones(n_kv, bool)
        keep[j] = False
        out.append((lab, _via(lambda c, keep=keep: _drop_keys(c, keep))))
    return out


def _h_regions(case):
    if len(case.regions) != 2:
        return []
    (n0, a0, b0), (n1, a1, b1) = case.regions
    out = []
    order = np.r_[a1:b1, a0:b0]
    m = case.mask
    # with the mask permuted alike the swap would only reorder the keys: it shows only through the mask
    if b0 > a0 and b1 > a1 and m is not None and not np.array_equal(m[..., order], m):

        def swapped(c, order=order):
            return _replace(c, k=c.k[:, order], v=c.v[:, order])

        out.append((f"{n0} and {n1} regions swapped on the KV axis (mask in the declared order)",
                    _via(swapped)))
    for name, a, b in case.regions:
        if name == "cold" and b > a:
            keep = np.ones(case.k.shape[1], bool)
            keep[a:b] = False
            out.append(("cold region ignored", _via(lambda c, keep=keep: _drop_keys(c, keep))))
    return out


def _h_chunk(case):
    bounds = kv_chunks(case)
    if len(bounds) < 2:
        return []
    s = logits(case)
    M = s.max(axis=-1)
    if case.sinks is not None:
        M = np.maximum(M, np.asarray(case.sinks, np.float64)[None, :, None])
    out = []
    for i, (a, b) in enumerate(bounds):
        m_i = s[..., a:b].max(axis=-1)
        if np.all((m_i == M) | (m_i == -np.inf)):
            continue  # every row's maximum is in this chunk (or it is dead): the bug changes nothing
        out.append((f"split-K chunk of keys {a}..{b - 1} merged without rescaling",
                    lambda c, i=i, bounds=bounds: golden(c, unrescaled=(bounds, i))))
    return out


def _h_token_head(case):
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    if Hkv < 2 or n_kv < 2:
        return []
    out = []
    for which in ("K", "V"):
        for d, how in ((0, "head-major memory read token-major"),
                       (1, "token-major memory read head-major")):
            attr = which.lower()

            def tf(c, attr=attr, d=d):
                x = getattr(c, attr)
                return _replace(c, **{attr: _per_region(c, x, lambda r: _token_head_swap(r, d))})

            out.append((f"{which} read with token and head axes swapped ({how})", _via(tf)))
    return out


def _h_mask_f32(case):
    if case.mask is None or not case.mask_f16:
        return []
    return [("F16 mask read as F32 (pairs of F16 values taken as one F32; -inf never masks)",
             _via(lambda c: _replace(c, mask=f16_bits_as_f32(c.mask))))]


_PAD_MULTIPLES = (16, 32, 64, 128, 256)


def _h_padding(case):
    n_kv = case.k.shape[1]
    by_pad: dict[int, list[int]] = {}
    for p in _PAD_MULTIPLES:
        n_pad = -(-n_kv // p) * p - n_kv
        if n_pad:
            by_pad.setdefault(n_pad, []).append(p)
    out = []
    for n_pad, ps in by_pad.items():
        def pad(c, n_pad=n_pad):
            B, _, hkv, dk = c.k.shape
            z = np.zeros((B, n_pad, hkv, dk))
            zv = np.zeros((B, n_pad, hkv, c.v.shape[3]))
            mask = c.mask
            if mask is not None:
                mask = np.concatenate([mask, np.zeros(mask.shape[:3] + (n_pad,))], axis=-1)
            return _replace(c, k=np.concatenate([c.k, z], 1), v=np.concatenate([c.v, zv], 1),
                            mask=mask, regions=())
        mult = "/".join(str(p) for p in ps)
        out.append((f"{n_pad} zero-filled padding keys left unmasked (n_kv padded to a multiple of "
                    f"{mult})", _via(pad)))
    return out


#: note of the reading that takes a mixed cache at its dequantized values (findings carry it)
EXACT_READING = "cold region at its dequantized values, not rounded to F16"


def _exact(case: Case) -> Case:
    k, v = case.kv_exact
    return _replace(case, k=np.asarray(k, np.float64), v=np.asarray(v, np.float64), kv_exact=None)


def readings(case: Case) -> list[tuple[str, Case]]:
    """The ways a kernel may read ``case``'s K/V: ``[("", case)]``, plus ``(EXACT_READING, case')`` for a
    mixed cache whose dequantized values differ from their F16 rounding (the op rounds the concatenated
    cache to F16; a kernel that dequantizes the cold region inside its loop, like ``jaxkv.cache``, does
    not). Every hypothesis is judged on each reading: the reading is not the bug."""
    out = [("", case)]
    if case.kv_exact is not None:
        k, v = case.kv_exact
        if not (np.array_equal(k, case.k, equal_nan=True) and np.array_equal(v, case.v, equal_nan=True)):
            out.append((EXACT_READING, _exact(case)))
    return out


def _h_cold_unrounded(case):
    if len(readings(case)) < 2:
        return []
    return [("mixed cache not rounded to F16 (" + EXACT_READING + ")", _via(_exact))]


#: hypothesis name -> generator of (label, compute) for a case; order is the report order
HYPOTHESES: dict[str, Callable] = {
    "out_permuted": _h_out_perm,
    "gqa_modulo": _h_gqa,
    "kv_swapped": _h_kv_swap,
    "scale_wrong": _h_scale,
    "softcap_wrong": _h_softcap,
    "mask_wrong": _h_mask,
    "alibi_missing": _h_alibi,
    "sinks_missing": _h_sinks,
    "kv_token_dropped": _h_drop,
    "regions_wrong": _h_regions,
    "chunk_unrescaled": _h_chunk,
    "kv_token_head_swapped": _h_token_head,
    "mask_f16_as_f32": _h_mask_f32,
    "padding_unmasked": _h_padding,
    "cold_unrounded": _h_cold_unrounded,
}


def _same(a: Case, b: Case) -> bool:
    for f in dataclasses.fields(Case):
        if f.name == "kv_exact":
            continue  # another reading of the same inputs, not an input
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "mask" and (x is None) != (y is None):
            m = x if y is None else y
            if m.shape[-1] == a.k.shape[1] and not np.any(m):
                continue  # an all-zero mask is no mask
            return False
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if x is None or y is None or x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                return False
        elif x != y:
            return False
    return True


def hypotheses(case: Case, names=None) -> list[Variant]:
    """Every variant of every hypothesis (or of ``names``) that applies to ``case``: an input bug whose
    effective inputs equal the case's own is left out (it cannot change the output)."""
    out = []
    for name, gen in HYPOTHESES.items():
        if names is not None and name not in names:
            continue
        for item in gen(case):
            label, fn = item[0], item[1]
            idx = item[2] if len(item) > 2 else None
            tf = getattr(fn, "transform", None)
            if tf is not None and _same(case, tf(case)):
                continue  # the bug leaves this case's inputs as they are: nothing to observe
            out.append(Variant(name, label, fn, idx, tf))
    return out
