"""Search for the split-K chunk a kernel merged without rescaling (float64 numpy, vectorised).

Layout: ``case`` a :class:`jaxkv.ops.golden.Case` (q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk],
v [B, n_kv, Hkv, Dv]); outputs [B, n_q, H, Dv].

The bug: a kernel splits the KV axis into chunks, computes each chunk's partial state (running max
``m_c``, sum ``L_c``, accumulator ``A_c``) and merges them, but for one chunk skips the factor
``exp(m_c - M)``. The output then depends only on that chunk's key range ``[a, b)``: its keys weigh
``exp(s - m_c)`` instead of ``exp(s - M)``, i.e. the chunk is over-weighted by ``f = exp(M - m_c)`` per
row, and

    out' = (A + (f - 1) A_c) / (L + (f - 1) L_c)        (A, L over all keys, sinks in L)

Where the chunk boundaries lie is searched, not assumed: :func:`candidate_ranges` lists the chunks of
every candidate chunking (fixed sizes 16..1024 keys from the start of the KV axis and from the start
of each region of a mixed cache, a ragged last chunk; ggml's split-KV thread split for 2..16 threads;
the cold/hot regions themselves), deduplicated by key range. :func:`unrescaled_outputs` evaluates them
all at once from per-segment partial sums (the segments are the pieces between all candidate
boundaries), so the search costs about one attention pass plus ``O(ranges * B * n_q * H * Dv)``.
:func:`best_ranges` ranks them by how much of ``got - golden`` they explain.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxkv.verify import mutations

__all__ = ["CHUNK_SIZES", "THREADS", "ChunkRange", "candidate_ranges", "unrescaled_outputs",
           "best_ranges", "range_label"]

#: fixed chunk sizes (keys) of GPU split-K kernels and of the mixed kernel's cold-region scan
CHUNK_SIZES = tuple(2 ** i for i in range(4, 11))  # 16 .. 1024
#: thread counts whose ggml split-KV chunking (ceil(n_kv / n_threads) keys per chunk) is tried
THREADS = tuple(range(2, 17))


@dataclasses.dataclass(frozen=True)
class ChunkRange:
    """A chunk ``[start, stop)`` of the KV axis and the chunkings (names) it belongs to."""

    start: int
    stop: int
    chunkings: tuple


def range_label(a: int, b: int) -> str:
    """The hypothesis label of the chunk of keys ``[a, b)`` merged without rescaling."""
    return f"split-K chunk of keys {a}..{b - 1} merged without rescaling"


def _split(a: int, b: int, size: int) -> list[tuple[int, int]]:
    return [(x, min(x + size, b)) for x in range(a, b, size)]


def chunkings(case: mutations.Case) -> dict[str, list[tuple[int, int]]]:
    """Candidate chunkings of ``case``'s KV axis: name -> list of (start, stop) covering [0, n_kv)."""
    n = case.k.shape[1]
    out: dict[str, list[tuple[int, int]]] = {}
    regions = [(name, a, b) for name, a, b in case.regions if b > a]
    for size in CHUNK_SIZES:
        if size < n:
            out[f"{size}-key chunks"] = _split(0, n, size)
        if len(regions) > 1:
            out[f"{size}-key chunks per region"] = [c for _, a, b in regions for c in _split(a, b, size)]
    for nt in THREADS:
        c = -(-n // nt)
        if c < n:
            out.setdefault(f"ggml split-KV, {nt} threads", _split(0, n, c))
    if len(regions) > 1:
        out["regions (" + ",".join(r[0] for r in regions) + ")"] = [(a, b) for _, a, b in regions]
    return out


def candidate_ranges(case: mutations.Case) -> list[ChunkRange]:
    """Every chunk of every candidate chunking, one entry per distinct key range (whole-axis ranges
    excluded: a single chunk's own maximum is the row maximum)."""
    n = case.k.shape[1]
    by: dict[tuple[int, int], list[str]] = {}
    for name, chunks in chunkings(case).items():
        for a, b in chunks:
            if (a, b) != (0, n) and b > a:
                by.setdefault((a, b), []).append(name)
    return [ChunkRange(a, b, tuple(names)) for (a, b), names in sorted(by.items())]


def _weights(case: mutations.Case):
    """s [B, H, n_q, n_kv] logits, p = exp(s - M) (0 for skipped keys), M [B, H, n_q] (sinks
    included; 0 where -inf), L [B, H, n_q] (sinks included)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    s = mutations.logits(case)
    M = s.max(axis=-1) if n_kv else np.full((B, H, n_q), -np.inf)
    sk = None
    if case.sinks is not None:
        sk = np.broadcast_to(np.asarray(case.sinks, np.float64)[None, :, None], M.shape)
        M = np.maximum(M, sk)
    Ms = np.where(M == -np.inf, 0.0, M)
    with np.errstate(all="ignore"):
        p = np.where(s == -np.inf, 0.0, np.exp(s - Ms[..., None]))
    L = p.sum(-1)
    if sk is not None:
        L = L + np.exp(sk - Ms)
    return s, p, M, L


#: float64 elements a block of the search may hold (about 64 MiB per array)
BLOCK_ELEMENTS = 8_000_000


def _query_slices(case: mutations.Case, per_query: int):
    """Query ranges of ``case`` whose per-query work ``per_query`` fits in :data:`BLOCK_ELEMENTS`."""
    n_q = case.q.shape[1]
    step = max(1, min(n_q, BLOCK_ELEMENTS // max(per_query, 1)))
    return [(i, min(i + step, n_q)) for i in range(0, n_q, step)]


def _rows(case: mutations.Case, i0: int, i1: int) -> mutations.Case:
    """The queries ``[i0, i1)`` of ``case`` (mask rows alike)."""
    if (i0, i1) == (0, case.q.shape[1]):
        return case
    mask = None if case.mask is None else case.mask[..., i0:i1, :]
    return dataclasses.replace(case, q=case.q[:, i0:i1], mask=mask)


def _ranges_of(case, rs, block):
    """(i0, outs [r, B, n_q, H, Dv]) for blocks of ``rs`` on ``case`` (all of its queries at once)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    g = H // Hkv
    s, p, M, L = _weights(case)
    cuts = sorted({0, n_kv} | {x for r in rs for x in r})
    seg = list(zip(cuts[:-1], cuts[1:]))
    pos = {x: i for i, x in enumerate(cuts)}
    # per-segment partial sums: P[..., k] = sum of the first k segments (prefix sums over segments)
    vT = np.transpose(case.v, (0, 2, 1, 3))  # [B, Hkv, n_kv, Dv]
    pg = p.reshape(B, Hkv, g * n_q, n_kv)
    A_seg = np.stack([np.matmul(pg[..., a:b], vT[:, :, a:b]) for a, b in seg], axis=0)
    A_seg = A_seg.reshape(len(seg), B, H, n_q, Dv)
    L_seg = np.stack([p[..., a:b].sum(-1) for a, b in seg], axis=0)  # [S, B, H, n_q]
    m_seg = np.stack([s[..., a:b].max(-1) for a, b in seg], axis=0)
    PA = np.concatenate([np.zeros((1,) + A_seg.shape[1:]), np.cumsum(A_seg, axis=0)], axis=0)
    PL = np.concatenate([np.zeros((1,) + L_seg.shape[1:]), np.cumsum(L_seg, axis=0)], axis=0)
    A = PA[-1]
    for i0 in range(0, len(rs), block):
        part = rs[i0:i0 + block]
        k0 = np.array([pos[a] for a, _ in part])
        k1 = np.array([pos[b] for _, b in part])
        Ac = PA[k1] - PA[k0]  # [r, B, H, n_q, Dv]
        Lc = PL[k1] - PL[k0]
        mc = np.stack([m_seg[x:y].max(axis=0) for x, y in zip(k0, k1)], axis=0)
        with np.errstate(all="ignore"):
            f = np.where((mc == -np.inf) | (M == -np.inf), 1.0, np.exp(M - mc))
            num = A + (f - 1.0)[..., None] * Ac
            den = L + (f - 1.0) * Lc
            out = np.where(den[..., None] > 0, num / np.where(den > 0, den, 1.0)[..., None], 0.0)
        yield i0, np.transpose(out, (0, 1, 3, 2, 4))


def _plan(case, rs):
    """(query slices, range block size) keeping the search's arrays within BLOCK_ELEMENTS."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    n_cuts = len({0, n_kv} | {x for r in rs for x in r})
    per_query = B * H * (Dv * (n_cuts + 1) + n_kv)
    slices = _query_slices(case, per_query)
    rows = slices[0][1] - slices[0][0]
    block = max(1, min(64, BLOCK_ELEMENTS // max(B * H * rows * Dv, 1)))
    return slices, block


def unrescaled_outputs(case: mutations.Case, ranges):
    """Yield (i0, outs) blocks: ``outs`` [r, B, n_q, H, Dv], the outputs with ``ranges[i0 + j]``
    merged without rescaling (float64). ``ranges``: sequence of (start, stop) or :class:`ChunkRange`.
    (All queries at once: for many ranges on a long prefill use :func:`best_ranges`, which slices.)"""
    rs = [(r.start, r.stop) if isinstance(r, ChunkRange) else tuple(r) for r in ranges]
    if rs:
        yield from _ranges_of(case, rs, _plan(case, rs)[1])


def best_ranges(case: mutations.Case, deviation, golden, top: int = 3, ranges=None):
    """The ``top`` candidate ranges whose effect ``out' - golden`` best explains ``deviation`` (an
    observed error, e.g. ``got - golden``), best first, as (ChunkRange, out' [B, n_q, H, Dv],
    residual) with ``residual = ||deviation - (out' - golden)||^2 / ||deviation||^2`` (0: explains all
    of it; candidates with non-finite outputs are left out). Works through the queries in slices
    that keep every array within :data:`BLOCK_ELEMENTS`."""
    dev = np.asarray(deviation, np.float64)
    golden = np.asarray(golden, np.float64)
    ranges = candidate_ranges(case) if ranges is None else list(ranges)
    with np.errstate(all="ignore"):
        d2 = float(np.sum(dev ** 2))
    if not ranges or not np.isfinite(d2) or d2 == 0:
        return []
    rs = [(r.start, r.stop) if isinstance(r, ChunkRange) else tuple(r) for r in ranges]
    target = golden + dev
    r2 = np.zeros(len(rs))
    slices, block = _plan(case, rs)
    for q0, q1 in slices:
        t = target[:, q0:q1]
        for i0, outs in _ranges_of(_rows(case, q0, q1), rs, block):
            with np.errstate(all="ignore"):
                r2[i0:i0 + len(outs)] += np.sum((t[None] - outs) ** 2, axis=(1, 2, 3, 4))
    r2 = r2 / d2
    order = [int(i) for i in np.argsort(r2) if np.isfinite(r2[i])][:top]
    if not order:
        return []
    outs = np.concatenate([o for _, o in unrescaled_outputs(case, [rs[i] for i in order])], axis=0)
    return [(ranges[i], outs[j], float(r2[i])) for j, i in enumerate(order)]
