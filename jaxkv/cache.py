"""Mixed KV cache: a quantized cold region plus an F16 hot window, and attention over it.

Layout::

    k_cold.raw  [B, cap_cold, Hkv, row_bytes(k_format, Dk)]  uint8 ggml blocks (formats.QuantArray)
    v_cold.raw  [B, cap_cold, Hkv, row_bytes(v_format, Dv)]  (K and V formats may differ)
    k_hot       [B, W, Hkv, Dk]  float16                     the W most recent tokens at most
    v_hot       [B, W, Hkv, Dv]  float16
    n_cold, n_hot                int32 scalars (traced, so the cache jits)

Slots ``[0, n_cold)`` of the cold region and ``[0, n_hot)`` of the hot window hold the tokens, oldest
first; the logical KV sequence is ``cold[:n_cold]`` followed by ``hot[:n_hot]`` (``kv_order``
``cold,hot``). Slots past the lengths are unused and never read.

:func:`append` stores new tokens in the hot window as F16 (float64 input is first rounded to float32,
then float32 -> F16 round to nearest even, like ggml's F32 -> F16 copy); tokens pushed out of
the window (oldest first) are quantized with ``formats.quantize`` from their **F16 values converted to
F32** and written to the cold region in order.

Masks for :func:`attend` are in **slot layout**: ``[B|1, H|1, n_q, cap_cold + W]``, column ``j <
cap_cold`` is cold slot ``j``, column ``cap_cold + j`` is hot slot ``j``; unused slots are masked
automatically whatever the mask says. :func:`slot_mask` converts a mask over the logical positions
``[.., n_kv]`` (cold then hot) to slot layout.

:func:`attend` is split-K attention over the two regions (chunks of the cold region are dequantized
inside the scan, never the whole cache), merged by log-sum-exp; it equals
``attention(q, concat(dequantize(cold[:n_cold]), hot[:n_hot]))``. :func:`attend_dense` runs the same
math on explicit dequantized cold values (differentiable inputs).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import attention as _att
from jaxkv import formats

__all__ = ["MixedCache", "init", "append", "attend", "attend_dense", "slot_mask", "to_dense"]


@partial(jax.tree_util.register_dataclass,
         data_fields=["k_cold", "v_cold", "k_hot", "v_hot", "n_cold", "n_hot"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class MixedCache:
    """Mixed KV cache (layout in the module docstring). Build with :func:`init`."""

    k_cold: Any  # formats.QuantArray, logical [B, cap_cold, Hkv, Dk]
    v_cold: Any  # formats.QuantArray, logical [B, cap_cold, Hkv, Dv]
    k_hot: Any   # float16 [B, W, Hkv, Dk]
    v_hot: Any   # float16 [B, W, Hkv, Dv]
    n_cold: Any  # int32 []
    n_hot: Any   # int32 []

    @property
    def batch(self) -> int:
        return self.k_hot.shape[0]

    @property
    def n_head_kv(self) -> int:
        return self.k_hot.shape[2]

    @property
    def cap_cold(self) -> int:
        return self.k_cold.raw.shape[1]

    @property
    def window(self) -> int:
        return self.k_hot.shape[1]

    @property
    def n_slots(self) -> int:
        """Mask width for :func:`attend`: cap_cold + W."""
        return self.cap_cold + self.window


def init(batch: int, n_head_kv: int, d_k: int, d_v: int | None = None, *, cap_cold: int, window: int,
         k_format="Q8_0", v_format=None) -> MixedCache:
    """Empty cache: cold region of ``cap_cold`` token slots in ``k_format`` / ``v_format`` (any
    formats registry name or Format; v_format defaults to k_format), hot F16 window of ``window``
    slots; d_v defaults to d_k. Head dims must be multiples of the formats' block sizes."""
    d_v = d_k if d_v is None else d_v
    for name, val in (("batch", batch), ("n_head_kv", n_head_kv), ("d_k", d_k), ("d_v", d_v)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    for name, val in (("cap_cold", cap_cold), ("window", window)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    kf = formats.get_format(k_format)
    vf = formats.get_format(k_format if v_format is None else v_format)
    for name, fmt, d in (("k_format", kf, d_k), ("v_format", vf, d_v)):
        bs = getattr(fmt, "block_size", None) or getattr(fmt, "block", 1)
        if d % int(bs) != 0:
            raise ValueError(f"{name}: head dim {d} is not a multiple of {fmt.name}'s block {bs}")
    kq = formats.QuantArray(
        raw=jnp.zeros((batch, cap_cold, n_head_kv, formats.row_bytes(kf, d_k)), jnp.uint8),
        fmt=kf, n=int(d_k))
    vq = formats.QuantArray(
        raw=jnp.zeros((batch, cap_cold, n_head_kv, formats.row_bytes(vf, d_v)), jnp.uint8),
        fmt=vf, n=int(d_v))
    return MixedCache(
        k_cold=kq, v_cold=vq,
        k_hot=jnp.zeros((batch, window, n_head_kv, d_k), jnp.float16),
        v_hot=jnp.zeros((batch, window, n_head_kv, d_v), jnp.float16),
        n_cold=jnp.zeros((), jnp.int32), n_hot=jnp.zeros((), jnp.int32))


def _to_f16(x):
    """float -> float16: inputs are taken as float32 (float64 rounded to float32 first, as ggml's
    activations are F32), then rounded to nearest even F16 (ggml's F32 -> F16 copy)."""
    return x.astype(jnp.float32).astype(jnp.float16)


@jax.jit
def _append_core(cache: MixedCache, k_new, v_new) -> MixedCache:
    t = k_new.shape[1]
    w = cache.window
    n_hot, n_cold = cache.n_hot, cache.n_cold

    def stage(hot, new):
        # [hot slots | t free slots], new tokens written right after the n_hot live ones
        buf = jnp.concatenate([hot, jnp.zeros(hot.shape[:1] + (t,) + hot.shape[2:], hot.dtype)], 1)
        return jax.lax.dynamic_update_slice_in_dim(buf, _to_f16(new), n_hot, axis=1)

    kb, vb = stage(cache.k_hot, k_new), stage(cache.v_hot, v_new)
    total = n_hot + t
    n_evict = jnp.maximum(total - w, 0)  # <= t since n_hot <= W: the evicted tokens are buf[:, :t]
    # cold slots n_cold + j for j < n_evict; others are sent out of bounds and dropped
    j = jnp.arange(t)
    dest = jnp.where(j < n_evict, n_cold + j, cache.cap_cold)

    def spill(cold, buf):
        rows = formats.quantize(buf[:, :t].astype(jnp.float32), cold.fmt)
        raw = cold.raw.at[:, dest].set(rows, mode="drop")
        return formats.QuantArray(raw=raw, fmt=cold.fmt, n=cold.n)

    kc, vc = spill(cache.k_cold, kb), spill(cache.v_cold, vb)
    k_hot = jax.lax.dynamic_slice_in_dim(kb, n_evict, w, axis=1)
    v_hot = jax.lax.dynamic_slice_in_dim(vb, n_evict, w, axis=1)
    return MixedCache(k_cold=kc, v_cold=vc, k_hot=k_hot, v_hot=v_hot,
                      n_cold=(n_cold + n_evict).astype(jnp.int32),
                      n_hot=(total - n_evict).astype(jnp.int32))


def append(cache: MixedCache, k_new, v_new) -> MixedCache:
    """Append t tokens: k_new [B, t, Hkv, Dk], v_new [B, t, Hkv, Dv] float (stored as F16: float64 ->
    float32 -> F16, round to nearest even). Tokens that leave the hot window (oldest first) are
    quantized (``formats.quantize`` of their F16 values converted to F32) into the cold region.

    With concrete lengths a cold-region overflow raises ValueError; under ``jit`` the tokens past the
    cold capacity are dropped (n_cold then overstates; keep ``cap_cold`` large enough)."""
    if not isinstance(cache, MixedCache):
        raise ValueError(f"cache: expected a MixedCache, got {type(cache).__name__}")
    k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
    B, W, hkv, dk = cache.k_hot.shape
    dv = cache.v_hot.shape[3]
    if k_new.ndim != 4 or k_new.shape[0] != B or k_new.shape[2:] != (hkv, dk):
        raise ValueError(f"k_new: expected [{B}, t, {hkv}, {dk}], got {list(k_new.shape)}")
    if v_new.shape != k_new.shape[:3] + (dv,):
        raise ValueError(f"v_new: expected {list(k_new.shape[:3]) + [dv]}, got {list(v_new.shape)}")
    if not jnp.issubdtype(k_new.dtype, jnp.floating) or not jnp.issubdtype(v_new.dtype, jnp.floating):
        raise ValueError("k_new/v_new: expected float arrays")
    t = k_new.shape[1]
    if t == 0:
        return cache
    if not isinstance(cache.n_cold, jax.core.Tracer) and not isinstance(cache.n_hot, jax.core.Tracer):
        n_hot, n_cold = int(cache.n_hot), int(cache.n_cold)
        need = n_cold + max(n_hot + t - W, 0)
        if need > cache.cap_cold:
            raise ValueError(f"cache: cold region overflow ({need} tokens > cap_cold={cache.cap_cold})")
    return _append_core(cache, k_new, v_new)


def slot_mask(cache: MixedCache, mask):
    """Logical mask [B|1, H|1, n_q, L] over positions cold-then-hot (L >= n_cold + n_hot; columns past
    n_cold + n_hot are ignored) -> slot-layout mask [B|1, H|1, n_q, cap_cold + W] for :func:`attend`
    (unused slots get -inf). Jittable: the lengths may be traced."""
    mask = jnp.asarray(mask)
    if mask.ndim != 4:
        raise ValueError(f"mask: expected [B|1, H|1, n_q, L], got shape {list(mask.shape)}")
    L = mask.shape[3]
    cold_idx = jnp.arange(cache.cap_cold)
    hot_idx = cache.n_cold + jnp.arange(cache.window)
    idx = jnp.concatenate([cold_idx, hot_idx])
    used = jnp.concatenate([cold_idx < cache.n_cold, jnp.arange(cache.window) < cache.n_hot])
    used = used & (idx < L)
    vals = jnp.take(mask, jnp.clip(idx, 0, max(L - 1, 0)), axis=3) if L else jnp.zeros(
        mask.shape[:3] + idx.shape, mask.dtype)
    return jnp.where(used, vals, jnp.asarray(-jnp.inf, mask.dtype))


def to_dense(cache: MixedCache):
    """Logical K, V [B, n_cold + n_hot, Hkv, D] float32: dequantized cold tokens then the hot ones.
    Eager only (needs concrete lengths); materialises the whole cache (tests, traces)."""
    if isinstance(cache.n_cold, jax.core.Tracer) or isinstance(cache.n_hot, jax.core.Tracer):
        raise ValueError("cache: to_dense needs concrete lengths (call it outside jit)")
    nc, nh = int(cache.n_cold), int(cache.n_hot)

    def cold(q):
        if nc == 0:  # an empty row set: nothing to dequantize
            return jnp.zeros((cache.batch, 0, cache.n_head_kv, q.n), jnp.float32)
        return formats.dequantize(q.raw[:, :nc], q.fmt)

    k = jnp.concatenate([cold(cache.k_cold), cache.k_hot[:, :nh].astype(jnp.float32)], axis=1)
    v = jnp.concatenate([cold(cache.v_cold), cache.v_hot[:, :nh].astype(jnp.float32)], axis=1)
    return k, v


def _regions(q, k_cold, v_cold, k_hot, v_hot, n_cold, n_hot, scale, mask, softcap, slopes, sinks,
             chunk, precision):
    """Shared math of attend / attend_dense: split-K over cold (QuantArray or float) and hot
    regions with live lengths n_cold / n_hot, merged, finalized. Mask in slot layout."""
    cap = _att._shape(k_cold)[1]
    qg, bias, slopes_g = _att._prep_split(q, k_hot, mask, slopes, precision)
    bc = bh = None
    if bias is not None:
        bc, bh = bias[..., :cap], bias[..., cap:]
    st_c = _att._split_k_state(qg, k_cold, v_cold, scale, softcap, bc, slopes_g, n_cold, chunk)
    st_h = _att._split_k_state(qg, k_hot, v_hot, scale, softcap, bh, slopes_g, n_hot, chunk)
    st = _att.merge(st_c, st_h)
    return _att.finalize(_att._ungroup_state(st), sinks)


_regions_jit = jax.jit(_regions, static_argnames=("chunk", "precision"))


def _check_attend(q, shapes, mask, sinks, precision, chunk):
    if precision not in ("f64", "f32"):
        raise ValueError(f"precision: expected 'f64' or 'f32', got {precision!r}")
    _att._check_chunk(chunk)
    k_cold, v_cold, k_hot, v_hot = shapes
    qs = _att._shape(q)
    if len(qs) != 4:
        raise ValueError(f"q: expected [B, n_q, H, Dk], got shape {list(qs)}")
    B, n_q, H, dk = qs
    hkv = k_hot[2]
    if k_hot[0] != B or k_hot[3] != dk or H % hkv:
        raise ValueError(f"q: shape {list(qs)} does not match the cache (B={k_hot[0]}, Hkv={hkv}, "
                         f"Dk={k_hot[3]})")
    for name, s, ref in (("k_cold", k_cold, (B, None, hkv, dk)), ("v_cold", v_cold, (B, None, hkv, v_hot[3])),
                         ("v_hot", v_hot, (B, k_hot[1], hkv, None))):
        if len(s) != 4 or any(r is not None and a != r for a, r in zip(s, ref)):
            raise ValueError(f"{name}: shape {list(s)} does not match {ref}")
    if k_cold[1] != v_cold[1]:
        raise ValueError(f"v_cold: {v_cold[1]} slots, k_cold has {k_cold[1]}")
    n_slots = k_cold[1] + k_hot[1]
    if mask is not None:
        ms = _att._shape(mask)
        if len(ms) != 4 or ms[0] not in (1, B) or ms[1] not in (1, H) or ms[2] != n_q or ms[3] != n_slots:
            raise ValueError(f"mask: expected slot layout [{B}|1, {H}|1, {n_q}, {n_slots}], got {list(ms)}")
    if sinks is not None and _att._shape(sinks) != (H,):
        raise ValueError(f"sinks: expected shape [{H}], got {list(_att._shape(sinks))}")


def attend(cache: MixedCache, q, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, chunk=256,
           precision="f32"):
    """Attention of q [B, n_q, H, Dk] over the cache's tokens (cold then hot) -> out [B, n_q, H, Dv]
    (float64 for "f64", float32 for "f32"). mask: slot layout [B|1, H|1, n_q, cap_cold + W] (see
    :func:`slot_mask`); sinks [H]; softcap / max_bias as in :func:`jaxkv.attention.attention`. Each
    region is split into chunks of ``chunk`` slots (static); cold chunks are dequantized inside the
    scan. Equals ``attention(q, *to_dense(cache), mask=logical mask)`` up to rounding."""
    if not isinstance(cache, MixedCache):
        raise ValueError(f"cache: expected a MixedCache, got {type(cache).__name__}")
    q = jnp.asarray(q)
    shapes = (cache.k_cold.shape, cache.v_cold.shape, cache.k_hot.shape, cache.v_hot.shape)
    _check_attend(q, shapes, mask, sinks, precision, chunk)
    mask = None if mask is None else jnp.asarray(mask)
    sinks = None if sinks is None else jnp.asarray(sinks)
    slopes = _att._slopes_arg(q.shape[2], max_bias, mask)
    return _regions_jit(q, cache.k_cold, cache.v_cold, cache.k_hot, cache.v_hot, cache.n_cold,
                        cache.n_hot, scale, mask, softcap, slopes, sinks, chunk=int(chunk),
                        precision=precision)


def attend_dense(q, k_cold, v_cold, k_hot, v_hot, n_cold, n_hot, *, scale, mask=None, softcap=0.0,
                 max_bias=0.0, sinks=None, chunk=256, precision="f32"):
    """:func:`attend` with the cold region given as dequantized float values (differentiable):
    k_cold [B, cap_cold, Hkv, Dk], v_cold [B, cap_cold, Hkv, Dv], k_hot [B, W, Hkv, Dk],
    v_hot [B, W, Hkv, Dv] (any float dtype), live lengths n_cold, n_hot (int, may be traced);
    mask in slot layout [B|1, H|1, n_q, cap_cold + W]. Same math as :func:`attend`."""
    q = jnp.asarray(q)
    k_cold, v_cold, k_hot, v_hot = (jnp.asarray(x) for x in (k_cold, v_cold, k_hot, v_hot))
    _check_attend(q, (k_cold.shape, v_cold.shape, k_hot.shape, v_hot.shape), mask, sinks, precision,
                  chunk)
    mask = None if mask is None else jnp.asarray(mask)
    sinks = None if sinks is None else jnp.asarray(sinks)
    slopes = _att._slopes_arg(q.shape[2], max_bias, mask)
    return _regions_jit(q, k_cold, v_cold, k_hot, v_hot, jnp.asarray(n_cold, jnp.int32),
                        jnp.asarray(n_hot, jnp.int32), scale, mask, softcap, slopes, sinks,
                        chunk=int(chunk), precision=precision)
