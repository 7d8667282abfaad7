"""Kernels to fuzz with ``python -m fuzz --target fuzz.targets:NAME``.

Every target has the canonical signature ``fn(q, k, v, *, scale, mask, softcap, max_bias, sinks) -> out``
with q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask [B|1, H|1, n_q, n_kv] or None,
sinks [H] or None, out [B, n_q, H, Dv], computing in float32.

Working kernels: ``flash_decode`` (jaxkv's split-K), ``mixed_cache`` (jaxkv.cache.attend_dense over a
cold region and a hot window), ``numpy_attention`` (plain numpy, exercises the per-case path for kernels
that do not trace under JAX). Deliberately buggy kernels, to show what a found bug looks like:
``buggy_split_k_no_rescale`` (merges split-K partial states without rescaling them to the common
maximum), ``buggy_gqa_modulo`` (query head h reads KV head ``h % Hkv`` instead of ``h // (H / Hkv)``),
``buggy_scale_twice`` (multiplies the logits by ``scale`` twice).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import attention as _att
from jaxkv import cache as _cache

__all__ = ["flash_decode", "mixed_cache", "numpy_attention", "buggy_split_k_no_rescale", "buggy_gqa_modulo",
           "buggy_scale_twice", "CHUNK"]

CHUNK = 16
_HI = lax.Precision.HIGHEST


def flash_decode(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """jaxkv.attention.flash_decode, chunks of CHUNK keys, float32."""
    return _att.flash_decode(q, k, v, chunk=CHUNK, scale=scale, mask=mask, softcap=softcap,
                             max_bias=max_bias, sinks=sinks, precision="f32")


def mixed_cache(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, window=16):
    """Attention over a mixed cache: the last ``window`` tokens are the hot window, the others the cold
    region (given as their float values, so the kernel is exact in its inputs), split-K over both
    regions and merged (jaxkv.cache.attend_dense)."""
    n = k.shape[1]
    w = min(window, n)
    kc, vc, kh, vh = k[:, :n - w], v[:, :n - w], k[:, n - w:], v[:, n - w:]
    return _cache.attend_dense(q, kc, vc, kh, vh, n - w, w, scale=scale, mask=mask, softcap=softcap,
                               max_bias=max_bias, sinks=sinks, chunk=CHUNK, precision="f32")


def _logits(q, k, scale, mask, softcap, max_bias, kv_head, scale_twice=False):
    """s [B, H, n_q, n_kv] float32 with kv_head[h] the KV head of query head h; -inf where masked."""
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    kh = jnp.take(k, kv_head, axis=2)  # [B, n_kv, H, Dk]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kh, precision=_HI) * jnp.float32(scale)
    if scale_twice:
        s = s * jnp.float32(scale)
    cap = jnp.float32(softcap)
    s = jnp.where(cap != 0, cap * jnp.tanh(s / jnp.where(cap != 0, cap, 1.0)), s)
    if mask is not None:
        slopes = _att.alibi_slopes(q.shape[2], max_bias)
        b = jnp.asarray(mask, jnp.float32) * slopes[None, :, None, None]
        s = jnp.where(b == -jnp.inf, -jnp.inf, s + b)
    return s


def _softmax_out(s, v, kv_head, sinks):
    vh = jnp.take(jnp.asarray(v, jnp.float32), kv_head, axis=2)  # [B, n_kv, H, Dv]
    m = jnp.max(s, axis=-1)
    if sinks is not None:
        m = jnp.maximum(m, jnp.asarray(sinks, jnp.float32)[None, :, None])
    ms = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - ms[..., None])
    den = jnp.sum(p, -1)
    if sinks is not None:
        den = den + jnp.exp(jnp.asarray(sinks, jnp.float32)[None, :, None] - ms)
    vz = jnp.where(jnp.isfinite(vh), vh, 0.0)  # unread (fully masked) keys may hold NaN
    num = jnp.einsum("bhqk,bkhd->bqhd", p, vz, precision=_HI)
    den = jnp.transpose(den, (0, 2, 1))[..., None]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _kv_heads(H, Hkv, modulo=False):
    h = np.arange(H)
    return h % Hkv if modulo else h // (H // Hkv)


def buggy_gqa_modulo(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """BUG: query head h reads KV head h % Hkv (right only for MHA or MQA)."""
    kvh = _kv_heads(q.shape[2], k.shape[2], modulo=True)
    return _softmax_out(_logits(q, k, scale, mask, softcap, max_bias, kvh), v, kvh, sinks)


def buggy_scale_twice(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """BUG: the logits are multiplied by ``scale`` twice."""
    kvh = _kv_heads(q.shape[2], k.shape[2])
    return _softmax_out(_logits(q, k, scale, mask, softcap, max_bias, kvh, scale_twice=True), v, kvh, sinks)


def buggy_split_k_no_rescale(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """BUG: split-K over chunks of CHUNK keys whose partial sums and accumulators are added without the
    ``exp(m_chunk - m)`` rescaling to the common maximum (right only when one chunk is live)."""
    kvh = _kv_heads(q.shape[2], k.shape[2])
    s = _logits(q, k, scale, mask, softcap, max_bias, kvh)  # [B, H, n_q, n]
    vh = jnp.take(jnp.asarray(v, jnp.float32), kvh, axis=2)
    vh = jnp.where(jnp.isfinite(vh), vh, 0.0)
    n = s.shape[-1]
    l_tot = jnp.zeros(s.shape[:-1], jnp.float32)
    acc = jnp.zeros(s.shape[:-1] + (vh.shape[-1],), jnp.float32)
    for a in range(0, n, CHUNK):
        sc = s[..., a:a + CHUNK]
        m = jnp.max(sc, axis=-1)
        ms = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp(sc - ms[..., None])
        l_tot = l_tot + jnp.sum(p, -1)  # BUG: should be scaled by exp(m - m_total)
        acc = acc + jnp.einsum("bhqk,bkhd->bhqd", p, vh[:, a:a + CHUNK], precision=_HI)
    if sinks is not None:
        l_tot = l_tot + jnp.exp(jnp.asarray(sinks, jnp.float32)[None, :, None] - 0.0)
    out = jnp.where(l_tot[..., None] > 0, acc / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
    return jnp.transpose(out, (0, 2, 1, 3))


def numpy_attention(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """Plain numpy float32 attention (does not trace under JAX: fuzzed case by case)."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    H, Hkv = q.shape[2], k.shape[2]
    kvh = _kv_heads(H, Hkv)
    s = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kvh]) * np.float32(scale)
    if softcap:
        s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
    if mask is not None:
        slopes = np.asarray(_att.alibi_slopes(H, float(max_bias)), np.float32)
        b = np.asarray(mask, np.float32) * slopes[None, :, None, None]
        with np.errstate(invalid="ignore"):
            s = np.where(b == -np.inf, -np.inf, s + b)
    m = s.max(-1) if s.shape[-1] else np.full(s.shape[:-1], -np.inf, np.float32)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float32)[None, :, None])
    ms = np.where(np.isfinite(m), m, 0).astype(np.float32)
    p = np.exp(s - ms[..., None])
    den = p.sum(-1)
    if sinks is not None:
        den = den + np.exp(np.asarray(sinks, np.float32)[None, :, None] - ms)
    vv = v[:, :, kvh]
    vv = np.where(np.isfinite(vv), vv, 0).astype(np.float32)
    num = np.einsum("bhqk,bkhd->bqhd", p, vv)
    den = np.transpose(den, (0, 2, 1))[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)
