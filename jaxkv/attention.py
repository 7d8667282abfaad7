"""Reference attention, split-K flash decoding and the partial softmax state.

Layout (every public function)::

    q     [B, n_q, H, Dk]            float
    k     [B, n_kv, Hkv, Dk]         float (float16 means F16 storage) or formats.QuantArray
    v     [B, n_kv, Hkv, Dv]         as k
    mask  [B|1, H|1, n_q, n_kv]      additive float; -inf masks a key
    sinks [H]                        float
    out   [B, n_q, H, Dv]            float64 under "f64", float32 otherwise

Query head ``h`` uses KV head ``h // (H // Hkv)`` (GQA/MQA); K/V are never repeated: q is viewed as
``[B, n_q, Hkv, G, Dk]`` with ``G = H // Hkv``.

Semantics (those of ggml's ``ggml_flash_attn_ext``), for query row ``i``, head ``h``, key ``j``::

    slope_h = alibi_slopes(H, max_bias)[h]             (1 when max_bias == 0)
    b_ij    = slope_h * mask[., h, i, j]               (0 when there is no mask)
    s_ij    = scale * q_i . k_j                        (softcap == 0)
    s_ij    = softcap * tanh(scale * q_i . k_j / softcap)   (softcap != 0; before the mask)
    s_ij    = s_ij + b_ij                              key j skipped entirely where b_ij == -inf
    out_i   = sum_j exp(s_ij - M) v_j / (sum_j exp(s_ij - M) + exp(sink_h - M))

with ``M`` the maximum over the live logits and the sink (the sink term only when sinks are given; a
sink joins the max and the denominator but has no value row). A row with no live key and no sink
returns zeros (no NaN is formed from a mask).

NaN semantics (ggml's, the same in ``jaxkv.precision`` and the float64 golden ``jaxkv.ops.golden.golden``):
a NaN that reaches a row's arithmetic propagates to that row, never to zeros. A NaN in q row ``i``, in
a live key's K entry, in a live mask entry ``mask[., h, i, j]`` or in ``sinks[h]`` makes the logit (or
the maximum) NaN, hence the whole output row NaN, as ggml's online softmax does (``s > M`` is false for
a NaN ``s``, then ``vs = expf(NaN)`` enters ``S`` and the accumulator). A NaN in a live key's V entry
makes that output element NaN (here in every row of the batch row and KV head group, through
``0 * NaN``, where ggml skips the key in the rows that mask it). ``scale`` or ``softcap`` NaN/inf is
undefined: every output is NaN. ``jaxkv.verify`` does not judge an output whose reference holds such
NaN: it gives the verdict "undecided" and names the input (docs/tolerance.md).

A key that is masked for every query row and head of a batch row is skipped like ggml skips it: its K/V
values are never read (they may be NaN/inf, e.g. unused cache slots).

Precision policies: ``"f64"`` casts every input to float64 (the golden reference); ``"f32"`` computes
in float32 (matmuls at HIGHEST precision). Other precision models are their own functions, called
directly (``jaxkv.ggml_cpu.flash_attn_ext``: ggml's CPU kernel bit for bit; ``jaxkv.precision``: the
generic F16 model); the op registry ``jaxkv.ops`` looks them up by precision name.

Split-K: the KV axis is cut into chunks; each chunk yields a partial :class:`State` ``(m, l, acc)``
(running max, sum of ``exp(s - m)``, unnormalised ``sum exp(s - m) v``) and states are merged by
log-sum-exp (:func:`merge`); :func:`finalize` adds the sinks and divides. Under differentiation the
stabiliser ``m`` of a partial state is a constant (``stop_gradient``): ``finalize`` is invariant to it,
so gradients of outputs are exact, and no NaN arises from ``-inf`` masks (double-``where`` guards).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import alibi, formats
from jaxkv._checks import check_attention_shapes

__all__ = [
    "PRECISIONS",
    "State",
    "alibi_slopes",
    "effective_bias",
    "attention",
    "online_attention",
    "flash_decode",
    "empty_state",
    "merge",
    "partial_state",
    "finalize",
]

PRECISIONS = ("f64", "f32")
_COMPUTE = {"f64": jnp.float64, "f32": jnp.float32}
_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# the partial state


@partial(jax.tree_util.register_dataclass, data_fields=["m", "l", "acc"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class State:
    """Partial softmax state of a set of keys: ``m`` [..., ] running max (-inf: no live key), ``l``
    [...] sum of ``exp(s - m)``, ``acc`` [..., Dv] sum of ``exp(s - m) * v``. Public states have
    ``m``, ``l``: [B, n_q, H] and ``acc``: [B, n_q, H, Dv]. The empty state (m=-inf, l=0, acc=0) is the
    identity of :func:`merge`."""

    m: Any
    l: Any
    acc: Any


def empty_state(batch: int, n_q: int, n_head: int, d_v: int, dtype=jnp.float32) -> State:
    """The identity state: m [B, n_q, H] = -inf, l [B, n_q, H] = 0, acc [B, n_q, H, Dv] = 0."""
    return _empty((batch, n_q, n_head), d_v, dtype)


def _empty(lead: tuple, d_v: int, dtype) -> State:
    return State(
        m=jnp.full(lead, -jnp.inf, dtype),
        l=jnp.zeros(lead, dtype),
        acc=jnp.zeros(lead + (d_v,), dtype),
    )


def merge(a: State, b: State) -> State:
    """Log-sum-exp merge of two partial states of disjoint key sets (any matching shapes).

    Associative and commutative up to rounding; the empty state is an exact identity;
    empty (+) empty = empty with no NaN (``-inf - -inf`` is never formed)."""
    m = jnp.maximum(a.m, b.m)
    m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    ca = jnp.exp(a.m - m_safe)  # a.m == -inf -> 0
    cb = jnp.exp(b.m - m_safe)
    return State(
        m=m,
        l=a.l * ca + b.l * cb,
        acc=a.acc * ca[..., None] + b.acc * cb[..., None],
    )


def finalize(state: State, sinks=None):
    """Output ``acc / l`` [..., Dv] of a state; ``sinks`` [H] (last axis of ``m``) join the max and the
    denominator with no value row. Rows with ``l == 0`` (no live key, no sink) give zeros; a NaN
    ``m``/``l``/``acc`` (a NaN input) gives NaN."""
    if sinks is not None:
        sinks = jnp.asarray(sinks).astype(state.l.dtype)
        if sinks.ndim != 1 or sinks.shape[0] != state.m.shape[-1]:
            raise ValueError(f"sinks: expected shape [{state.m.shape[-1]}], got {list(sinks.shape)}")
        sm = jnp.broadcast_to(sinks, state.m.shape)
        sink_state = State(m=sm, l=jnp.ones_like(state.l), acc=jnp.zeros_like(state.acc))
        state = merge(state, sink_state)
    empty = state.l == 0  # no live key, no sink; a NaN l (NaN input) propagates
    l_safe = jnp.where(empty, jnp.ones_like(state.l), state.l)
    return jnp.where(empty[..., None], jnp.zeros_like(state.acc), state.acc / l_safe[..., None])


# ----------------------------------------------------------------------------------------------------
# ALiBi


def alibi_slopes(n_head: int, max_bias) -> jax.Array:
    """ALiBi slopes [H] float32, ggml's formula (:mod:`jaxkv.alibi`) in float32: a concrete ``max_bias``
    with numpy's float32 ``power``, a traced one with XLA float32 ops (:func:`jaxkv.alibi.traced_slopes`).
    All ones when ``max_bias <= 0``."""
    if isinstance(max_bias, jax.core.Tracer):
        return alibi.traced_slopes(n_head, max_bias)
    return jnp.asarray(alibi.slopes(n_head, max_bias, "numpy"), jnp.float32)


def effective_bias(mask, slopes):
    """The additive bias ggml applies: ``slopes[h] * mask`` -> [B|1, H, n_q, n_kv] (mask dtype
    promoted with the slopes'); ``-inf`` stays ``-inf`` (slopes are positive)."""
    mask = jnp.asarray(mask)
    slopes = jnp.asarray(slopes)
    if mask.ndim != 4:
        raise ValueError(f"mask: expected [B|1, H|1, n_q, n_kv], got shape {list(mask.shape)}")
    return mask * slopes[None, :, None, None]


# ----------------------------------------------------------------------------------------------------
# validation and layout helpers


_is_quant = formats.is_quant


def _shape(x) -> tuple:
    return tuple(x.shape)


def _check(q, k, v, mask, sinks, precision, allowed=PRECISIONS):
    if precision not in allowed:
        raise ValueError(f"precision: expected one of {allowed}, got {precision!r} (other precision models are "
                         "functions of their own: jaxkv.ggml_cpu.flash_attn_ext, jaxkv.precision.f16_attention)")
    check_attention_shapes(q, k, v, mask, sinks)


def _operands(q, k, v, mask, sinks, max_bias, precision):
    """Validate (:func:`_check`) and convert the public functions' operands -> (q, k, v, mask, sinks,
    slopes) as JAX arrays (QuantArrays kept), slopes from :func:`_slopes_arg`."""
    _check(q, k, v, mask, sinks, precision)
    q = jnp.asarray(q)
    k = k if _is_quant(k) else jnp.asarray(k)
    v = v if _is_quant(v) else jnp.asarray(v)
    mask = None if mask is None else jnp.asarray(mask)
    sinks = None if sinks is None else jnp.asarray(sinks)
    return q, k, v, mask, sinks, _slopes_arg(q.shape[2], max_bias, mask)


def _to_compute(x, dtype):
    """Float array or QuantArray -> dtype (QuantArrays dequantize to f32 first, exact)."""
    if _is_quant(x):
        x = x.dequantize()
    return jnp.asarray(x).astype(dtype)


def _group_q(q, hkv):
    B, n_q, H, D = q.shape
    return q.reshape(B, n_q, hkv, H // hkv, D)


def _group_mask(mask, hkv, g):
    """[B|1, H|1, n_q, n] -> [B|1, n_q, Hkv|1, G|1, n] (a transpose of the mask, no broadcast)."""
    mb, mh, n_q, n = mask.shape
    t = jnp.transpose(mask, (0, 2, 1, 3))
    if mh == 1:
        return t.reshape(mb, n_q, 1, 1, n)
    return t.reshape(mb, n_q, hkv, g, n)


def _scaled_capped(dot, scale, softcap, dt):
    """Logits from dot products: ``scale * dot``, or ``softcap * tanh(scale * dot / softcap)`` when
    ``softcap != 0``. softcap is traced (one program for every value); tanh only runs when it is on."""
    cap = jnp.asarray(softcap, dt)
    cap_on = cap != 0
    cap_safe = jnp.where(cap_on, cap, jnp.ones_like(cap))
    factor = jnp.where(cap_on, jnp.asarray(scale, dt) / cap_safe, jnp.asarray(scale, dt))
    return lax.cond(cap_on, lambda x: cap_safe * jnp.tanh(x), lambda x: x, dot * factor)


def _logits(qg, kc, scale, softcap, bias, slopes_g):
    """Scaled, soft-capped, biased logits [B, n_q, Hkv, G, c] with -inf at masked keys.

    qg [B, n_q, Hkv, G, Dk]; kc [B, c, Hkv, Dk]; bias [B|1, n_q, Hkv|1, G|1, c] raw mask or None;
    slopes_g [Hkv, G] or None."""
    dt = qg.dtype
    s = _scaled_capped(jnp.einsum("bqhgd,bchd->bqhgc", qg, kc, precision=_HI), scale, softcap, dt)
    if bias is not None:
        b = bias.astype(dt)
        if slopes_g is not None:
            b = b * slopes_g.astype(dt)[:, :, None]
        s = jnp.where(b == -jnp.inf, -jnp.inf, s + b)
    return s


def _zero_dead_columns(kc, vc, dead):
    """Zero K/V rows of keys that are dead for every query row and head of their batch row, so that
    unread values (NaN/inf in unused slots) cannot reach the output or its gradient."""
    if dead is None:
        return kc, vc
    # dead: [B|1, n_q|1, Hkv|1, G|1, c] -> all over (n_q, G) -> [B|1, Hkv|1, c] -> [B|1, c, Hkv|1, 1]
    col = jnp.all(dead, axis=(1, 3))
    col = jnp.transpose(col, (0, 2, 1))[..., None]
    kc = jnp.where(col, jnp.zeros_like(kc), kc)
    vc = jnp.where(col, jnp.zeros_like(vc), vc)
    return kc, vc


def _ungroup_state(st: State) -> State:
    B, n_q, hkv, g = st.m.shape
    return State(m=st.m.reshape(B, n_q, hkv * g), l=st.l.reshape(B, n_q, hkv * g),
                 acc=st.acc.reshape(B, n_q, hkv * g, st.acc.shape[-1]))


def _slopes_arg(n_head, max_bias, mask):
    """Slopes [H] f32 (all ones when max_bias <= 0), or None without a mask (ALiBi only scales the
    mask). Always an array with a mask, so max_bias values never change the compiled program."""
    if mask is None:
        return None
    return alibi_slopes(n_head, max_bias)


def _undefined_params(out, scale, softcap):
    """out with every element NaN when ``scale`` or ``softcap`` is NaN/inf (undefined, module docstring)."""
    ok = jnp.isfinite(jnp.asarray(scale, out.dtype)) & jnp.isfinite(jnp.asarray(softcap, out.dtype))
    return jnp.where(ok, out, jnp.full_like(out, jnp.nan))


# ----------------------------------------------------------------------------------------------------
# the standard reference


def _grouped_logits(q, k, v, scale, mask, softcap, slopes, dt):
    """Grouped operands in dt and all logits: (qg [B, n_q, Hkv, G, Dk], kc, vc (masked-out keys zeroed
    where the mask kills them for every row), s [B|1, n_q, Hkv, G, n_kv])."""
    hkv = k.shape[2]
    qg = _group_q(_to_compute(q, dt), hkv)
    kc, vc = _to_compute(k, dt), _to_compute(v, dt)
    g = qg.shape[3]
    bias = None if mask is None else _group_mask(mask, hkv, g)
    slopes_g = None if slopes is None else slopes.reshape(hkv, g)
    if bias is not None:
        pre = bias if slopes_g is None else bias * slopes_g.astype(bias.dtype)[:, :, None]
        kc, vc = _zero_dead_columns(kc, vc, pre == -jnp.inf)
    s = _logits(qg, kc, scale, softcap, bias, slopes_g)
    return qg, kc, vc, s


@partial(jax.jit, static_argnames=("precision",))
def _attention_core(q, k, v, scale, mask, softcap, slopes, sinks, *, precision):
    dt = _COMPUTE[precision]
    qg, kc, vc, s = _grouped_logits(q, k, v, scale, mask, softcap, slopes, dt)  # s [B, n_q, Hkv, G, n_kv]
    hkv, g = qg.shape[2:4]
    m = jnp.max(s, axis=-1) if s.shape[-1] else jnp.full(s.shape[:-1], -jnp.inf, dt)
    if sinks is not None:
        sk = sinks.astype(dt).reshape(hkv, g)
        m = jnp.maximum(m, sk)
    m = lax.stop_gradient(m)
    m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    p = jnp.exp(s - m_safe[..., None])
    den = jnp.sum(p, axis=-1)
    if sinks is not None:
        den = den + jnp.exp(sk - m_safe)
    num = jnp.einsum("bqhgc,bchd->bqhgd", p, vc, precision=_HI)
    empty = den == 0  # no live key, no sink; a NaN den (NaN input) propagates
    den_safe = jnp.where(empty, jnp.ones_like(den), den)
    out = jnp.where(empty[..., None], jnp.zeros_like(num), num / den_safe[..., None])
    B, n_q = q.shape[:2]
    return _undefined_params(out.reshape(B, n_q, hkv * g, out.shape[-1]), scale, softcap)


def attention(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, precision="f32"):
    """Reference attention. q [B, n_q, H, Dk]; k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv] (float, or
    formats.QuantArray, dequantized first); mask [B|1, H|1, n_q, n_kv]; sinks [H] -> out
    [B, n_q, H, Dv] (float64 for "f64", float32 otherwise). Semantics in the module docstring.

    precision: "f64" or "f32" (:data:`PRECISIONS`). ggml's CPU kernel is not a policy of this function:
    call ``jaxkv.ggml_cpu.flash_attn_ext`` (same layout) for it."""
    q, k, v, mask, sinks, slopes = _operands(q, k, v, mask, sinks, max_bias, precision)
    return _attention_core(q, k, v, scale, mask, softcap, slopes, sinks, precision=precision)


# ----------------------------------------------------------------------------------------------------
# ggml CPU's sequential online softmax


@partial(jax.jit, static_argnames=("precision",))
def _online_core(q, k, v, scale, mask, softcap, slopes, sinks, *, precision):
    dt = _COMPUTE[precision]
    qg, kc, vc, s = _grouped_logits(q, k, v, scale, mask, softcap, slopes, dt)
    B, n_q, hkv, g, _ = qg.shape
    dv = vc.shape[-1]
    s = jnp.broadcast_to(s, (B, n_q, hkv, g, s.shape[-1]))
    s_t = jnp.moveaxis(s, -1, 0)  # [n_kv, B, n_q, Hkv, G]
    v_t = jnp.moveaxis(vc, 1, 0)  # [n_kv, B, Hkv, Dv]

    def step(carry, xs):
        M, S, acc = carry
        sj, vj = xs
        skip = sj == -jnp.inf
        # ggml: if s > M { ms = exp(M - s); M = s; vs = 1 } else { ms = 1; vs = exp(s - M) }.
        # Written as M' = max(M, s), ms = exp(M - M'), vs = exp(s - M'): identical values.
        Mn = lax.stop_gradient(jnp.where(skip, M, jnp.maximum(M, sj)))
        Mn_safe = jnp.where(Mn == -jnp.inf, jnp.zeros_like(Mn), Mn)
        ms = jnp.where(skip, jnp.ones_like(M), jnp.exp(M - Mn_safe))
        sj_safe = jnp.where(skip, Mn_safe, sj)
        vs = jnp.where(skip, jnp.zeros_like(sj), jnp.exp(sj_safe - Mn_safe))
        acc = acc * ms[..., None] + vs[..., None] * vj[:, None, :, None, :]
        S = S * ms + vs
        return (Mn, S, acc), None

    lead = (B, n_q, hkv, g)
    init = (jnp.full(lead, -jnp.inf, dt), jnp.zeros(lead, dt), jnp.zeros(lead + (dv,), dt))
    (M, S, acc), _ = lax.scan(step, init, (s_t, v_t))
    st = State(m=M, l=S, acc=acc)
    return _undefined_params(finalize(_ungroup_state(st), sinks), scale, softcap)


def online_attention(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None,
                     precision="f32"):
    """ggml CPU's sequential online softmax, one key at a time (``lax.scan`` over n_kv): per live key,
    a new maximum rescales the accumulator and sum, otherwise ``vs = exp(s - M)``; sinks join after
    the loop. Same layout and semantics as :func:`attention`; precision "f64" or "f32"."""
    q, k, v, mask, sinks, slopes = _operands(q, k, v, mask, sinks, max_bias, precision)
    return _online_core(q, k, v, scale, mask, softcap, slopes, sinks, precision=precision)


# ----------------------------------------------------------------------------------------------------
# the split-K chunk kernel (key-major)
#
# Inside split-K a chunk's logits are laid out key-major, ``[B, c, Hkv, R]`` with ``R = n_q * G`` query
# rows per KV head, so that both products are reductions that XLA:CPU fuses and streams: q.k reduces
# the contiguous feature axis of each K row, p.v reduces the key axis over contiguous V rows. A
# query-major ``[..., c]`` layout makes XLA transpose every K chunk first (several times slower on CPU;
# measured in docs/benchmarks.md).

_AXES = "bchrd"  # batch, key, KV head, query row (n_q * G), feature

# Split-K runs in two passes (every chunk's logits, then every chunk's (m, p, l) at once and every
# chunk's p.v, then one merge) when the logits of a whole KV region have at most this many elements
# (decode: n_kv * H per query row and batch row), else as a sequential scan that merges one chunk state
# at a time (memory bounded by one chunk). Both compute the same per-chunk states; the two-pass form has
# no loop-carried merge and 2 instead of 15 operations per chunk (faster on CPU, docs/benchmarks.md).
TWO_PASS_MAX_LOGITS = 1 << 22


def _contract(x, xa: str, y, ya: str, out: str):
    """``einsum(f"{xa},{ya}->{out}", x, y)`` as a broadcast multiply and sum, every axis string in
    ``_AXES`` order. Unit axes are dropped before the product and restored in the result: XLA:CPU's
    fused reductions run several times slower with them."""
    size: dict[str, int] = {}
    for t, ta in ((x, xa), (y, ya)):
        for a, n in zip(ta, t.shape):
            size[a] = max(size.get(a, 1), n)
    keep = [a for a in _AXES if size.get(a, 1) != 1]

    def spread(t, ta):
        live = [a for a, n in zip(ta, t.shape) if n != 1]
        t = t.reshape([n for n in t.shape if n != 1])
        return t[tuple(slice(None) if a in live else None for a in keep)]

    red = tuple(i for i, a in enumerate(keep) if a not in out)
    r = jnp.sum(spread(x, xa) * spread(y, ya), axis=red)
    return r.reshape([size.get(a, 1) for a in out])


def _rows_q(qg):
    """[B, n_q, Hkv, G, D] -> [B, Hkv, R = n_q * G, D] (query rows per KV head)."""
    B, n_q, hkv, g, d = qg.shape
    return jnp.transpose(qg, (0, 2, 1, 3, 4)).reshape(B, hkv, n_q * g, d)


def _rows_bias(bias, slopes_g, n_q, hkv, g):
    """Grouped chunk mask [B|1, n_q, Hkv|1, G|1, c] (times ALiBi slopes [Hkv, G]) -> [B|1, c, Hkv, R]."""
    b = bias if slopes_g is None else bias * slopes_g.astype(bias.dtype)[:, :, None]
    b = jnp.broadcast_to(b, (b.shape[0], n_q, hkv, g, b.shape[-1]))
    return jnp.transpose(b, (0, 4, 2, 1, 3)).reshape(b.shape[0], b.shape[-1], hkv, n_q * g)


def _dead_keys(b, live):
    """Dead logits [B|1, c, Hkv|1, R|1] bool (masked with -inf, or not live) or None, and the dead
    columns [B|1, c, Hkv|1, 1]: keys dead for every query row of a batch row and head."""
    dead = None
    if b is not None:
        dead = b == -jnp.inf
    if live is not None:
        nl = ~live[None, :, None, None]
        dead = nl if dead is None else (dead | nl)
    if dead is None:
        return None, None
    return dead, jnp.all(dead, axis=3, keepdims=True)


def _zero_rows(x, col):
    """Zero the K/V rows [B, c, Hkv, D] of dead columns, so that unread values (NaN/inf in unused
    slots) cannot reach the output or its gradient."""
    return x if col is None else jnp.where(col, jnp.zeros_like(x), x)


def _rows_logits(qr, kc, scale, softcap, b, dead):
    """Logits of one chunk, key-major: qr [B, Hkv, R, Dk], kc [B, c, Hkv, Dk] (dead rows zeroed),
    b [B|1, c, Hkv, R] or None, dead or None -> s [B, c, Hkv, R] with -inf at dead keys."""
    dt = qr.dtype
    s = _scaled_capped(_contract(kc, "bchd", qr, "bhrd", "bchr"), scale, softcap, dt)
    if b is not None:
        s = s + b.astype(dt)
    if dead is not None:
        s = jnp.where(dead, -jnp.inf, s)
    return s


def _softmax_part(s, axis):
    """(m, p, l) of logits s along the key axis: m = max (a constant under differentiation; -inf for
    no live key), p = exp(s - m) (0 at -inf), l = sum p."""
    m = lax.stop_gradient(jnp.max(s, axis=axis))
    m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    p = jnp.exp(s - jnp.expand_dims(m_safe, axis))
    return m, p, jnp.sum(p, axis=axis)


def _merge_all(st: State) -> State:
    """Log-sum-exp merge of partial states stacked along their leading axis (an empty state, m = -inf,
    contributes nothing; all empty gives the empty state)."""
    m = jnp.max(st.m, axis=0)
    m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    w = jnp.exp(st.m - m_safe)
    return State(m=m, l=jnp.sum(w * st.l, axis=0), acc=jnp.sum(w[..., None] * st.acc, axis=0))


def _grouped_state(st: State, n_q: int, g: int) -> State:
    """Rows layout (m, l: [B, Hkv, R]; acc [..., Dv]) -> grouped (m, l: [B, n_q, Hkv, G])."""
    B, hkv = st.m.shape[:2]

    def back(x, tail):
        x = x.reshape((B, hkv, n_q, g) + tail)
        return jnp.transpose(x, (0, 2, 1, 3) + tuple(range(4, 4 + len(tail))))

    return State(m=back(st.m, ()), l=back(st.l, ()), acc=back(st.acc, st.acc.shape[-1:]))


# ----------------------------------------------------------------------------------------------------
# split-K flash decoding


def _slice_kv(x, start, size, dtype):
    """Rows [start, start+size) of the KV axis (axis 1) of a float array or QuantArray, as dtype."""
    if _is_quant(x):
        raw = lax.dynamic_slice_in_dim(x.raw, start, size, axis=1)
        return formats.dequantize(raw, x.fmt).astype(dtype)
    return lax.dynamic_slice_in_dim(x, start, size, axis=1).astype(dtype)


def _split_k_state(qg, k, v, scale, softcap, bias, slopes_g, n_valid, chunk: int) -> State:
    """Grouped merged state of all chunks of one KV region.

    qg [B, n_q, Hkv, G, Dk] (compute dtype); k/v [B, n, Hkv, D] float or QuantArray; bias grouped
    [B|1, n_q, Hkv|1, G|1, n] or None; n_valid: keys at index >= n_valid are dead (traced int or None).
    The region is cut into ceil(n / c) chunks of c = min(chunk, n) keys; the last chunk's start is
    clamped to n - c and the keys it shares with the previous chunk are dead in it (no padding copy)."""
    dt = qg.dtype
    B, n_q, hkv, g, _ = qg.shape
    dv = _shape(v)[-1]
    n = _shape(k)[1]
    if n == 0:
        return _empty((B, n_q, hkv, g), dv, dt)
    c = min(int(chunk), n)
    n_chunks = -(-n // c)
    ragged = n_chunks * c != n

    qr = _rows_q(qg)
    rows = (B, hkv, n_q * g)

    def at(i):
        """Chunk i: its first key, rows bias, dead logits and dead columns."""
        start = i * c
        st = jnp.minimum(start, n - c) if ragged else start
        live = None
        if ragged or n_valid is not None:
            pos = st + jnp.arange(c)
            live = pos >= start
            if n_valid is not None:
                live = live & (pos < n_valid)
        b = None
        if bias is not None:
            bc = lax.dynamic_slice_in_dim(bias, st, c, axis=bias.ndim - 1)
            b = _rows_bias(bc, slopes_g, n_q, hkv, g)
        return (st, b) + _dead_keys(b, live)

    def logits(i):
        st, b, dead, col = at(i)
        return _rows_logits(qr, _zero_rows(_slice_kv(k, st, c, dt), col), scale, softcap, b, dead)

    def values(i, p):
        st, _, _, col = at(i)
        return _contract(p, "bchr", _zero_rows(_slice_kv(v, st, c, dt), col), "bchd", "bhrd")

    def chunk_state(i):
        m, p, l = _softmax_part(logits(i), 1)
        return State(m=m, l=l, acc=values(i, p))

    if n_chunks == 1:
        return _grouped_state(chunk_state(0), n_q, g)
    if B * n_q * hkv * g * n <= TWO_PASS_MAX_LOGITS:
        s = lax.map(logits, jnp.arange(n_chunks))  # [n_chunks, B, c, Hkv, R]
        m, p, l = _softmax_part(s, 2)
        acc = lax.map(lambda xs: values(*xs), (jnp.arange(n_chunks), p))  # [n_chunks, B, Hkv, R, Dv]
        return _grouped_state(_merge_all(State(m=m, l=l, acc=acc)), n_q, g)

    def body(carry, i):
        return merge(carry, chunk_state(i)), None

    out, _ = lax.scan(body, _empty(rows, dv, dt), jnp.arange(n_chunks))
    return _grouped_state(out, n_q, g)


def _prep_split(q, k, mask, slopes, precision):
    dt = _COMPUTE[precision]
    hkv = _shape(k)[2]
    qg = _group_q(q.astype(dt), hkv)
    g = qg.shape[3]
    bias = None if mask is None else _group_mask(mask, hkv, g)
    slopes_g = None if slopes is None else slopes.reshape(hkv, g)
    return qg, bias, slopes_g


@partial(jax.jit, static_argnames=("chunk", "precision"))
def _flash_core(q, k, v, scale, mask, softcap, slopes, sinks, *, chunk, precision):
    qg, bias, slopes_g = _prep_split(q, k, mask, slopes, precision)
    st = _split_k_state(qg, k, v, scale, softcap, bias, slopes_g, None, chunk)
    return _undefined_params(finalize(_ungroup_state(st), sinks), scale, softcap)


def _check_chunk(chunk):
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")


def flash_decode(q, k, v, *, chunk, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None,
                 precision="f32"):
    """Split-K flash decoding: same layout, semantics and result as :func:`attention` (up to
    rounding). The KV axis is cut into chunks of ``chunk`` keys (static; ragged last chunk allowed),
    each converted to the compute dtype (QuantArrays dequantized) inside the loop, never the whole
    cache, reduced to a partial :class:`State` and merged by log-sum-exp; sinks join in
    :func:`finalize`. Schedule: two passes over the chunks (all logits, then all p.v, one merge) while
    the logits fit in ``TWO_PASS_MAX_LOGITS`` elements, else a ``lax.scan`` merging chunk by chunk.
    On CPU, chunks of 1-2k keys are fastest (docs/benchmarks.md). precision: "f64" or "f32"."""
    q, k, v, mask, sinks, slopes = _operands(q, k, v, mask, sinks, max_bias, precision)
    _check_chunk(chunk)
    return _flash_core(q, k, v, scale, mask, softcap, slopes, sinks, chunk=int(chunk),
                       precision=precision)


@partial(jax.jit, static_argnames=("precision",))
def _partial_core(q, k, v, scale, mask, softcap, slopes, *, precision):
    qg, bias, slopes_g = _prep_split(q, k, mask, slopes, precision)
    n = _shape(k)[1]  # the whole key set as one chunk
    return _ungroup_state(_split_k_state(qg, k, v, scale, softcap, bias, slopes_g, None, max(n, 1)))


def partial_state(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, precision="f32") -> State:
    """Partial :class:`State` of one chunk of keys: q [B, n_q, H, Dk], k/v [B, c, Hkv, D] (float or
    QuantArray), mask [B|1, H|1, n_q, c] -> State(m, l: [B, n_q, H], acc: [B, n_q, H, Dv]).
    ``finalize(merge(partial_state(chunk 1), partial_state(chunk 2)), sinks)`` equals attention over
    the concatenated keys. ``max_bias`` is ggml's ALiBi (needs the full head count H of q)."""
    q, k, v, mask, _, slopes = _operands(q, k, v, mask, None, max_bias, precision)
    return _partial_core(q, k, v, scale, mask, softcap, slopes, precision=precision)
