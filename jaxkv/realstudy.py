"""Studies on captured real-model runs (``python -m fuzz capture`` directories): quantisation
sensitivity of the real K/V per layer and head, the per-layer differential between runs with other
cache types, the F16 accumulator headroom and the thread-count sensitivity of each call.

A *run* is a directory of trace v1 files written by :mod:`jaxkv.capture` (metadata ``capture.layer``,
``capture.step``; step 0 is the prefill). Decode calls have one query row: q [H, D] (canonical q[0, 0]),
K/V [n_kv, Hkv, D] over the layer's cache, mask [n_kv] with -inf on cells not in the context.

Sensitivity (:func:`sensitivity_rows`): for each decode call and query head, the live cells (mask
finite, which must be the cache's first L cells: llama.cpp fills a single sequence's cache in order, so
cell i holds position i; checked) are one sample ``q [D], k [L, D], v [L, Dv]`` of F16 cache values. The
cold part (all but the last ``W`` tokens) is replaced by ``dequantize(quantize(x, fmt))``
(:func:`jaxkv.sensitivity.roundtrip`, per token: the prefix of a longer context quantizes identically)
and the metrics of :mod:`jaxkv.sensitivity` are computed in float64 with the call's own scale and
mask-free softmax over the live keys: ``nmse``, ``max_abs``, ``cos``, and the first-order prediction
``t = sum_j p_j dv_j + sum_j p_j (ds_j - p.ds) v_j`` (``ds_j = scale q.dk_j``) as ``pred_nmse`` and
``lin_resid``. Rows aggregate over the decode steps (mean, 95 % bootstrap CI of the mean,
:func:`jaxkv.sensitivity.bootstrap_ci`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from jaxkv import ops
from jaxkv import trace as T
from jaxkv import verify as V
from jaxkv.budget import nmse
from jaxkv.formats import selection
from jaxkv.ops.operands import dense, type_name
from jaxkv.sensitivity import bootstrap_ci, roundtrip

__all__ = ["Call", "load_run", "decode_sample", "sample_metrics", "sensitivity_rows", "headroom",
           "thread_movement", "differential_rows", "F16_MAX", "hadamard", "rotate", "llama_rotations",
           "STUDY_FORMATS"]

#: the study's default cache types: a documented selection of jaxkv.formats.KV_TYPES
STUDY_FORMATS = selection("real-run study: llama.cpp's two usual quantized KV cache types, 8 and 4 bits",
                          ("q8_0", "q4_0"))

F16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class Call:
    """One captured call: ``path``, ``layer``, ``step``, ``trace`` (jaxkv.trace.Trace)."""

    path: str
    layer: int
    step: int
    trace: object


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix [n, n] (Sylvester order, entries +-1/sqrt(n); symmetric,
    its own inverse): llama.cpp's ``attn_inp_k_rot`` / ``attn_inp_v_rot`` (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n: expected a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def rotate(x, n: int) -> np.ndarray:
    """x [..., D] with each block of ``n`` channels multiplied by :func:`hadamard` (n); n = 0: x."""
    x = np.asarray(x, np.float64)
    if not n:
        return x
    D = x.shape[-1]
    if D % n:
        raise ValueError(f"rotation size {n} does not divide the head size {D}")
    return (x.reshape(x.shape[:-1] + (D // n, n)) @ hadamard(n)).reshape(x.shape)


def llama_rotations(head_k: int, head_v: int) -> tuple[int, int]:
    """(K, V) rotation sizes llama.cpp 0c1e570 applies before a quantized cache (llama-kv-cache.cpp):
    K: the largest power of two >= 64 dividing the K head size; V: 64; 0 where the size is not a multiple
    of 64."""
    rk = 0
    if head_k % 64 == 0:
        rk = 64
        while head_k % (rk * 2) == 0:
            rk *= 2
    return rk, (64 if head_v % 64 == 0 else 0)


def load_run(directory) -> list[Call]:
    """Every capture trace under ``directory`` (recursive), sorted by (step, layer)."""
    out = []
    for p in sorted(pathlib.Path(directory).rglob("*.gguf")):
        t = T.load(p)
        md = t.metadata or {}
        if "capture.layer" not in md or "capture.step" not in md:
            continue
        out.append(Call(str(p), int(md["capture.layer"]), int(md["capture.step"]), t))
    out.sort(key=lambda c: (c.step, c.layer))
    return out


def _dense(x) -> np.ndarray:
    return np.asarray(dense(x), np.float64)


def decode_sample(trace) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """(q [H, D], k [L, Hkv, D], v [L, Hkv, Dv], scale, group) of a one-row call over its live cells
    (float64); raises ValueError unless the live cells are the cache's first L cells."""
    if trace.q.shape[:2] != (1, 1):
        raise ValueError(f"{trace.path}: expected a decode call (B = n_q = 1), got q {list(trace.q.shape)}")
    m = np.zeros(trace.k.shape[1]) if trace.mask is None else np.asarray(trace.mask, np.float64)[0, 0, 0]
    live = np.isfinite(m)
    L = int(live.sum())
    if not live[:L].all() or np.any(m[live] != 0):
        raise ValueError(f"{trace.path}: live cells are not the cache's first {L} cells with mask 0")
    q = np.asarray(trace.q, np.float64)[0, 0]
    k, v = _dense(trace.k)[0, :L], _dense(trace.v)[0, :L]
    return q, k, v, float(trace.scale), q.shape[0] // k.shape[1]


def _attend(q, k, v, scale):
    s = scale * (k @ q)
    p = np.exp(s - s.max())
    p /= p.sum()
    return p, p @ v


def sample_metrics(q, k, v, kq, vq, scale, W) -> dict:
    """Metrics of one head: q [D], k/v [L, D] (float64 F16 values), kq/vq their round trips; the last
    ``W`` tokens stay unquantized. Returns nmse, max_abs, cos, pred_nmse, lin_resid."""
    L = k.shape[0]
    cold = (np.arange(L) < L - W)[:, None]
    dk, dv = np.where(cold, kq - k, 0.0), np.where(cold, vq - v, 0.0)
    p, ref = _attend(q, k, v, scale)
    _, out = _attend(q, k + dk, v + dv, scale)
    ds = scale * (dk @ q)
    t = p @ dv + (p * (ds - p @ ds)) @ v
    e = out - ref
    rr, ee = float(ref @ ref), float(e @ e)
    return dict(nmse=nmse(out, ref), max_abs=float(np.abs(e).max()),
                cos=float(out @ ref / math.sqrt(max(float(out @ out) * rr, 1e-300))),
                pred_nmse=float(t @ t) / rr, lin_resid=float((e - t) @ (e - t)) / ee if ee > 0 else 0.0)


def sensitivity_rows(calls, formats=STUDY_FORMATS, hot_windows=(0, 32), rotation: bool = True,
                     skipped: list | None = None) -> list[dict]:
    """One row per (layer, head, format, hot window) over the decode calls of an F16-cache run
    (module docstring): ``<metric>_mean``, ``_ci_lo``, ``_ci_hi`` and ``samples`` (decode steps).
    ``rotation``: quantize as llama.cpp stores a quantized cache, i.e. ``H dequantize(quantize(H x))``
    with the Hadamard blocks of :func:`llama_rotations` (q.k and p.v are invariant under the rotation,
    only the quantisation error changes); False: quantize the values as they are. A layer whose live
    cells are not the cache's first cells (a sliding-window layer past its window: a ring buffer, cell
    order is not position order) is left out, with the reason appended to ``skipped``."""
    by_layer: dict[int, list] = {}
    for c in calls:
        if c.step == 0:
            continue
        if str(getattr(c.trace.k, "dtype", "")) != "float16" or str(getattr(c.trace.v, "dtype", "")) != "float16":
            raise ValueError(f"{c.path}: sensitivity needs an F16 cache capture (the unquantized K/V), got "
                             f"K {c.trace.types.get('k')} / V {c.trace.types.get('v')}")
        by_layer.setdefault(c.layer, []).append(c)
    rows = []
    for il in sorted(by_layer):
        try:
            samples = [decode_sample(c.trace) for c in by_layer[il]]
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append(f"layer {il}: {e}")
            continue
        Lmax = max(s[1].shape[0] for s in samples)
        longest = next(s for s in samples if s[1].shape[0] == Lmax)
        rk, rv = llama_rotations(longest[1].shape[-1], longest[2].shape[-1]) if rotation else (0, 0)
        rt = {}
        for f in formats:  # quantize the longest context once; a prefix quantizes identically (per token)
            kq = rotate(roundtrip(np.asarray(rotate(longest[1], rk), np.float32), f), rk)
            vq = rotate(roundtrip(np.asarray(rotate(longest[2], rv), np.float32), f), rv)
            rt[f] = (kq, vq)
        H = samples[0][0].shape[0]
        for h in range(H):
            for f in formats:
                for W in hot_windows:
                    per = []
                    for q, k, v, scale, G in samples:
                        L = k.shape[0]
                        if not np.array_equal(k, longest[1][:L]) or not np.array_equal(v, longest[2][:L]):
                            raise ValueError(f"layer {il}: cache cells changed between decode steps")
                        kq, vq = rt[f][0][:L, h // G], rt[f][1][:L, h // G]
                        per.append(sample_metrics(q[h], k[:, h // G], v[:, h // G], kq, vq, scale, W))
                    row = dict(layer=il, head=h, format=f, hot_window=W, rot_k=rk, rot_v=rv, samples=len(per),
                               kv_len_min=min(s[1].shape[0] for s in samples), kv_len_max=Lmax)
                    for m in per[0]:
                        x = np.array([d[m] for d in per])
                        lo, hi = bootstrap_ci(x, seed=il * 1000 + h)
                        row.update({f"{m}_mean": float(x.mean()), f"{m}_ci_lo": lo, f"{m}_ci_hi": hi})
                    mn = row["nmse_mean"]
                    row["pred_ratio"] = row["pred_nmse_mean"] / mn if mn > 0 else float("nan")
                    rows.append(row)
    return rows


def headroom(trace) -> dict:
    """F16 accumulator headroom of a call: the largest |partial sum| of ggml's online V accumulator
    ``acc_j = acc_(j-1) exp(M_(j-1) - M_j) + v_j exp(s_j - M_j)`` (cells in cache order, masked cells
    skipped, float64) over rows, heads and dims, against 65504 (F16's largest finite value). Returns
    ``max_partial``, ``headroom`` (65504 / max_partial) and ``accumulator`` ('f16' when V is F16)."""
    q = np.asarray(trace.q, np.float64)                  # [B, n_q, H, D]
    k, v = _dense(trace.k), _dense(trace.v)              # [B, n_kv, Hkv, D]
    B, n_q, H, _ = q.shape
    G = H // k.shape[2]
    mask = None if trace.mask is None else np.asarray(trace.mask, np.float64)
    worst = 0.0
    for b in range(B):
        for h in range(H):
            kk, vv = k[b, :, h // G], v[b, :, h // G]
            s = trace.scale * (q[b, :, h] @ kk.T)        # [n_q, n_kv]
            if mask is not None:
                s = s + mask[min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1)]
            for i in range(n_q):
                live = np.flatnonzero(np.isfinite(s[i]))
                if live.size == 0:
                    continue
                si = s[i, live]
                M = np.maximum.accumulate(si)
                # acc_j = sum_{l<=j} v_l exp(s_l - M_j): prefix sums of v_l exp(s_l - M_last), rescaled
                w = np.exp(si - M[-1])[:, None] * vv[live]
                acc = np.cumsum(w, axis=0) * np.exp(M[-1] - M)[:, None]
                worst = max(worst, float(np.abs(acc).max()))
    return dict(max_partial=worst, headroom=F16_MAX / worst if worst > 0 else math.inf,
                accumulator="f16" if type_name(trace.v) == "f16" else "f32")


def thread_movement(trace, threads=(1, 2, 4, 8)) -> dict:
    """How the call's output moves with ggml's thread count: ``chunks`` {n_threads: split-KV chunks}
    (jaxkv.ggml_cpu.split_chunks) and, where the chunking differs from the recorded run's, the max
    |emulation(n_threads) - captured out| in units of the row's accumulator rounding (verify.emu_check);
    0 with a note when every thread count gives the same chunking (the kernel's path does not split)."""
    op = ops.get(trace.op, "trace.op")
    if op.kv_split is None:
        return dict(chunks={}, units={}, note="unfused path: mul_mat splits rows, not the softmax")
    kt, vt = type_name(trace.k), type_name(trace.v)
    n_q, n_kv = trace.q.shape[1], trace.n_kv
    rec = int(trace.n_threads)
    chunks = {nt: op.kv_split(trace, nt) for nt in sorted(set(threads) | {rec})}
    units = {}
    case = V.case_from_trace(trace)
    for nt, c in chunks.items():
        if c == chunks[rec]:
            units[nt] = 0.0
            continue
        emu = V.model_output(trace, case, "ggml-cpu", n_threads=nt)
        units[nt] = V.emu_check(trace.out, emu, op.acc_unit(trace)).units
    note = "" if len(set(chunks.values())) > 1 else (f"one chunking for every thread count (n_kv={n_kv}, "
                                                      f"n_q={n_q}, {kt}/{vt}): the output cannot move")
    return dict(chunks=chunks, units=units, note=note)


def differential_rows(base, others: dict) -> list[dict]:
    """Per layer and step: how far each other run's attention output (``others`` {label: calls}) moves
    from ``base``'s (F16 cache), for calls whose step fed the same tokens (``capture.tokens``): ``nmse``
    (|o - b|^2 / |b|^2) and ``max_abs``. Steps after the runs' generated tokens diverge are left out. A
    run whose V went through llama.cpp's Hadamard rotation (metadata ``capture.rot_v``) has its output
    rotated back first (llama.cpp does the same right after the attention)."""
    ref = {(c.layer, c.step): c for c in base}
    rows = []
    for label, calls in others.items():
        for c in calls:
            b = ref.get((c.layer, c.step))
            if b is None:
                continue
            same = list(b.trace.metadata.get("capture.tokens", [])) == list(c.trace.metadata.get("capture.tokens", []))
            if not same:
                continue
            x = rotate(c.trace.out, int(c.trace.metadata.get("capture.rot_v", 0) or 0))  # back from the V basis
            y = rotate(b.trace.out, int(b.trace.metadata.get("capture.rot_v", 0) or 0))
            rows.append(dict(run=label, layer=c.layer, step=c.step, nmse=nmse(x, y),
                             max_abs=float(np.abs(x - y).max())))
    return rows
