"""The generic ``f16`` precision model: what an honest F16 attention kernel rounds, in no kernel's order.

Layout (canonical)::

    q [B, n_q, H, Dk] float32     k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv] float32 (dequantized)
    mask [B|1, H|1, n_q, n_kv] or None     sinks [H] or None     -> out [B, n_q, H, Dv] float32

Model (each step is a rounding an F16 kernel is entitled to make):
1. the query row is rounded to K's dot-product type (``dot_type``): ``"f16"`` round to nearest even;
   ``"q8_0"`` / ``"q8_1"`` 32-element blocks with ``d = amax / 127`` stored as F16 and
   ``round(x / d)`` (half to even); ``"f32"`` unchanged;
2. K and V are used as given in float32 (rounded to F16 first when ``kv_f16``: the mixed cache's
   concatenation is F16 by definition);
3. logits ``scale * q.k`` in float32, soft cap, ``+ slope * mask``; softmax with the maximum taken
   first (two passes, not ggml's online rescaling), weights ``exp(s - M)`` in float32, their sum in
   float32 (sinks join the maximum and the sum);
4. the V accumulator is F16: ``acc = f16(acc + p_j * v_j)`` key after key (sequential), then
   ``out = f32(acc) / S`` (``acc="f32"``: an F32 accumulator instead, the ``verify`` fallback for
   kernels that accumulate F32 V in F32).

NaN semantics: those of ``jaxkv.attention`` (a NaN input reaching a row makes that row NaN, never
zeros; ``scale``/``softcap`` NaN or inf gives all NaN; a row with no live key and no sink gives zeros).

Its error against the float64 golden reference is the yardstick of ``jaxkv.verify`` for
``--precision f16``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import alibi, formats

__all__ = ["DOT_TYPES", "round_to_dot_type", "f16_attention"]

#: the ``vec_dot_type`` of every K/V type (``jaxkv.formats``): f32, f16, q8_0, q8_1
DOT_TYPES = tuple(dict.fromkeys(formats.FORMATS[n].dot_type for n in formats.KV_TYPES))
_HI = lax.Precision.HIGHEST


def round_to_dot_type(x, dot_type: str):
    """x [..., D] float32 -> the values of x converted to ``dot_type`` (float32). Q8 types need
    ``D % 32 == 0``."""
    if dot_type not in DOT_TYPES:
        raise ValueError(f"dot_type: expected one of {DOT_TYPES}, got {dot_type!r}")
    x = jnp.asarray(x, jnp.float32)
    if dot_type == "f32":
        return x
    if dot_type == "f16":
        return x.astype(jnp.float16).astype(jnp.float32)
    d_all = x.shape[-1]
    if d_all % 32:
        raise ValueError(f"q: last dimension {d_all} is not a multiple of 32 ({dot_type} blocks)")
    blocks = x.reshape(x.shape[:-1] + (d_all // 32, 32))
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    d = amax / jnp.float32(127.0)
    inv = jnp.where(amax > 0, jnp.float32(127.0) / jnp.where(amax > 0, amax, 1), 0)
    qi = jnp.round(blocks * inv)
    d16 = d.astype(jnp.float16).astype(jnp.float32)
    return (qi * d16).reshape(x.shape)


# each trace has its own shapes, so this is compiled once per trace and run once: XLA's optimizing
# passes cost more than they save here (compile ~2x faster, the run stays in milliseconds)
@partial(jax.jit, static_argnames=("dot_type", "kv_f16", "acc_f16"),
         compiler_options={"xla_backend_optimization_level": 0,
                           "xla_llvm_disable_expensive_passes": True})
def _f16_core(q, k, v, scale, mask, softcap, slopes, sinks, *, dot_type, kv_f16, acc_f16):
    f32 = jnp.float32
    B, n_q, H, Dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = H // hkv
    qc = round_to_dot_type(q, dot_type).reshape(B, n_q, hkv, g, Dk)
    k = k.astype(f32)
    v = v.astype(f32)
    if kv_f16:
        k = k.astype(jnp.float16).astype(f32)
        v = v.astype(jnp.float16).astype(f32)
    s = jnp.einsum("bqhgd,bkhd->bqhgk", qc, k, precision=_HI)
    cap = jnp.asarray(softcap, f32)
    on = cap != 0
    cap_s = jnp.where(on, cap, 1)
    s = jnp.where(on, cap_s * jnp.tanh(s * (scale / cap_s)), s * scale)
    if mask is not None:
        bias = jnp.transpose(mask.astype(f32), (0, 2, 1, 3))  # [Bm, n_q, Hm, n_kv]
        bias = bias * slopes.astype(f32)[None, None, :, None]  # -> [Bm, n_q, H, n_kv]
        bias = bias.reshape(bias.shape[0], n_q, hkv, g, -1)
        dead = bias == -jnp.inf
        s = jnp.where(dead, -jnp.inf, s + bias)
        col = jnp.all(jnp.broadcast_to(dead, s.shape), axis=(1, 3))  # [B, Hkv, n_kv]
        v = jnp.where(jnp.transpose(col, (0, 2, 1))[..., None], 0, v)
    m = jnp.max(s, axis=-1)
    if sinks is not None:
        sk = sinks.astype(f32).reshape(hkv, g)
        m = jnp.maximum(m, sk)
    ms = jnp.where(m == -jnp.inf, 0, m)
    p = jnp.where(s == -jnp.inf, 0, jnp.exp(s - ms[..., None]))
    den = jnp.sum(p, axis=-1)
    if sinks is not None:
        den = den + jnp.exp(sk - ms)

    def step(acc, xs):
        pj, vj = xs  # [B, n_q, hkv, g], [B, hkv, dv]
        new = acc.astype(f32) + pj[..., None] * vj[:, None, :, None, :]
        return new.astype(acc.dtype), None

    acc0 = jnp.zeros((B, n_q, hkv, g, dv), jnp.float16 if acc_f16 else f32)
    acc, _ = lax.scan(step, acc0, (jnp.moveaxis(p, -1, 0), jnp.moveaxis(v, 1, 0)))
    empty = den == 0  # no live key, no sink: zeros; a NaN den (NaN input) propagates
    out = jnp.where(empty[..., None], 0, acc.astype(f32) / jnp.where(empty, 1, den)[..., None])
    ok = jnp.isfinite(jnp.asarray(scale, f32)) & jnp.isfinite(cap)
    out = jnp.where(ok, out, jnp.nan)  # scale / softcap NaN or inf: undefined
    return out.reshape(B, n_q, H, dv)


def f16_attention(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None,
                  dot_type="f16", kv_f16=False, acc="f16"):
    """The ``f16`` model (module docstring): q [B, n_q, H, Dk], k/v dense float [B, n_kv, Hkv, D],
    mask [B|1, H|1, n_q, n_kv], sinks [H] -> out [B, n_q, H, Dv] float32. ``acc``: the V
    accumulator, ``"f16"`` (the model) or ``"f32"``."""
    if acc not in ("f16", "f32"):
        raise ValueError(f"acc: expected 'f16' or 'f32', got {acc!r}")
    q = jnp.asarray(q, jnp.float32)
    k = jnp.asarray(np.asarray(k, np.float32))
    v = jnp.asarray(np.asarray(v, np.float32))
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q/k/v: expected 4-d canonical arrays")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k: n_head_kv={k.shape[2]} must divide n_head={q.shape[2]}")
    m = None if mask is None else jnp.asarray(mask, jnp.float32)
    sk = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    slopes = jnp.asarray(alibi.slopes(q.shape[2], float(max_bias), "numpy"), jnp.float32)
    return _f16_core(q, k, v, float(scale), m, float(softcap), slopes, sk, dot_type=dot_type,
                     kv_f16=bool(kv_f16), acc_f16=acc == "f16")
