"""A trace's operands as the ops read them: dense float64 K/V, ggml type names, the dense :class:`Case`.

Layout (canonical): q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv] (np.float32,
np.float16 or a ``formats.QuantArray``), mask [B|1, H|1, n_q, n_kv], sinks [H].
"""

from __future__ import annotations

import jax
import numpy as np

from jaxkv import formats
from jaxkv.ops.golden import Case

__all__ = ["is_quant", "dense", "type_name", "dot_type", "regions_order", "kv_case", "regions_case"]


is_quant = formats.is_quant


#: ``formats.dequantize`` compiled once per shape (eager, it dispatches dozens of small ops, each
#: compiled for the trace's shape)
_dequantize = jax.jit(formats.dequantize, static_argnums=1)


def dense(x) -> np.ndarray:
    """A K/V operand (np.float32, np.float16 or QuantArray) as float64."""
    if is_quant(x):
        return np.asarray(_dequantize(x.raw, x.fmt), np.float64)
    return np.asarray(x, np.float64)


def type_name(x) -> str:
    """The ggml type name (lower case) an operand is stored in."""
    if is_quant(x):
        return formats.get_format(x.fmt).name
    return {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(np.asarray(x).dtype, "f32")


def dot_type(x) -> str:
    """The type q is rounded to for ``K . q`` (ggml's ``vec_dot_type`` of K's type)."""
    if not is_quant(x):
        return type_name(x)
    f = formats.get_format(x.fmt)
    return str(f.dot_type)


def regions_order(trace) -> list[str]:
    """A mixed trace's region names in KV order (``trace.kv_order``, default ``cold,hot``)."""
    order = [s.strip() for s in str(trace.kv_order or "cold,hot").split(",")]
    if sorted(order) != ["cold", "hot"]:
        raise ValueError(f"kv_order: expected 'cold,hot' or 'hot,cold', got {trace.kv_order!r}")
    return order


def _case(trace, k, v, regions=(), exact=None) -> Case:
    mask = None if trace.mask is None else np.asarray(trace.mask, np.float64)
    sinks = None if trace.sinks is None else np.asarray(trace.sinks, np.float64)
    return Case(op=trace.op, q=np.asarray(trace.q, np.float64), k=k, v=v, mask=mask, sinks=sinks,
                scale=float(trace.scale), softcap=float(trace.softcap or 0.0),
                max_bias=float(trace.max_bias or 0.0),
                n_threads=int(trace.n_threads or 1), regions=regions,
                mask_f16=True, kv_exact=exact)


def kv_case(trace) -> Case:
    """The exact inputs of a trace with roles ``k``/``v`` as a dense float64 :class:`Case`
    (quantized K/V dequantized)."""
    return _case(trace, dense(trace.k), dense(trace.v))


def regions_case(trace) -> Case:
    """The exact inputs of a mixed-cache trace (roles ``k_<region>``/``v_<region>``) as a dense
    float64 :class:`Case`: the regions concatenated in ``kv_order`` and rounded to F16, as the op
    defines; their values before that rounding in ``kv_exact``, for the diagnosis."""
    ks, vs, regions, pos = [], [], [], 0
    for name in regions_order(trace):
        kx, vx = dense(getattr(trace, f"k_{name}")), dense(getattr(trace, f"v_{name}"))
        ks.append(kx)
        vs.append(vx)
        regions.append((name, pos, pos + kx.shape[1]))
        pos += kx.shape[1]
    exact = (np.concatenate(ks, 1), np.concatenate(vs, 1))
    k = exact[0].astype(np.float16).astype(np.float64)
    v = exact[1].astype(np.float16).astype(np.float64)
    return _case(trace, k, v, tuple(regions), exact)
