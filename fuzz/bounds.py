"""A-priori forward-error bound of float32 attention, element by element, for the fuzz properties.

Every attention property judges a float32 kernel against the float64 golden with this bound instead of a
multiple of another float32 implementation's error (docs/tolerance.md, "Fuzz budgets: an a-priori
bound"). The bound is computed inside the property's program, in float64, from the case's own inputs:

    |out_i - g_i| <= T1_i + T2_i + T3_i            (every element of the real output region)

for any kernel that computes the logits with float32 dot products (any order, FMA or not), one
``exp`` per key, at most ``exps`` exp factors (rescalings) multiplying one key's weight, and sums of at
most ``depth`` float32 roundings per term (:class:`Schedule`: ``TWO_PASS`` for attention(f32),
``STREAMING`` for jaxkv's online / split-K / merged kernels, ``GENERIC`` for any other merge order). With u = 2^-24 and, per query row,
golden logits s_t (keys t, plus the sink with value row 0), golden max m, probabilities p_t and
output g:

* logit error   E_t = gamma(nnz + 2) |scale| sum_d |q_d k_td| + [softcap] (C_TANH + 1) u |s_cap|
                      + u |b_t| + u |s_t|          (b: ALiBi bias; nnz: non-zero channels of q);
* weight error  H_t = E_t + (1 + 2u) u (m - s_t + 2 max_t E_t) + 1.01 exps C_EXP u  (|log w~/w| <= H);
* the softmax is shift-invariant, so errors are taken relative to the golden argmax r:
  D_t = H_t + H_r (D_r = 0), rho_+ = sum p_t (e^D_t - 1), rho_- = sum p_t (1 - e^-D_t) (< 1 - p_r),
  f_t p_t = max((p_t e^D_t (1 - e^-D_t) + p_t rho_-) / (1 - rho_-), p_t (1 - e^-D_t / (1 + rho_+)));
* T1 = sum_t f_t p_t |v_t - g|                     (weights perturbed, exact arithmetic otherwise:
  out - g = sum_t (p~_t - p_t)(v_t - g) because both weight sets sum to 1);
* T2 = gamma(depth + 2) (|g| + T1 + sum_t (p_t + f_t p_t) |v_t|)   (numerator/denominator sums, division);
* T3 = (depth + 2) (n + 1) 2^-126 (1 + |g| + max|v|)  (products, exps and sums that underflow to 0 with
  flush-to-zero: each an absolute error <= 2^-126; the denominator is >= 1).

The whole bound is multiplied by (1 + 2^-20) for the float64 golden's own rounding (relative 2^-50
against terms that are at least 2^-24 of the same sums). ``C_EXP``/``C_TANH`` are the relative errors
of the float32 ``exp``/``tanh`` assumed, in units of u: twice the largest measured for XLA's CPU
functions (exp 1.4 u, tanh 4.9 u) and numpy's (exp 3.6 u, tanh 1.8 u); tests/test_budgets.py
re-measures them. A bound is *vacuous* where it reaches the signal (``sum bound^2 >= sum g^2``): the
case then cannot tell a correct kernel from a wrong one (big logits, whose f32 rounding may reorder
the keys); :func:`bound_stats` counts those elements.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from fuzz.engine import differences
from jaxkv import attention as _att

__all__ = ["U", "C_EXP", "C_TANH", "Schedule", "TWO_PASS", "STREAMING", "GENERIC", "Terms", "terms", "bound",
           "bound_stats", "verdict", "STATS"]

U = 2.0 ** -24
#: relative error of float32 exp / tanh, in units of U (2x the largest measured; module docstring)
C_EXP = 8.0
C_TANH = 16.0
_FTZ = 2.0 ** -126
_GOLDEN = 1.0 + 2.0 ** -20


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a kernel's rounding steps grow with the live keys n of a row: ``exps = e0 + e1 * n`` exp
    factors multiply one key's weight (its own exp plus rescalings), or ``e0 + R`` when ``records``
    (R: keys that can raise the running maximum in key order, :func:`terms`); ``depth = d0 + d1 * n``
    roundings in the sum of one term (products, additions, rescaling multiplies)."""

    name: str
    e0: int
    e1: int
    d0: int
    d1: int
    records: bool = False


#: attention(precision="f32"): max first, one exp per key, one sum (n terms, then + sink), one division
TWO_PASS = Schedule("two-pass", 1, 0, 1, 1)
#: jaxkv's online_attention (key order: its own exp, one rescale per later running-max record, the
#: sink merge), flash_decode (own exp, its chunk's merge factor, sequential merges only at records, sink
#: merge) and finalize(merge of 3 partial states) (own exp, 2 merges, sink merge): <= R + 4 exp factors;
#: <= 2 roundings per step (rescale multiply, add)
STREAMING = Schedule("streaming", 4, 0, 6, 2, records=True)
#: any kernel merging partial softmax states in any order or tree (a --target, the mixed cache's
#: cold/hot regions): <= n + 4 exp factors
GENERIC = Schedule("generic", 4, 1, 6, 2)


def _gamma(n):
    n = jnp.asarray(n, jnp.float64)
    return n * U / (1.0 - n * U)


class Terms:
    """Per-case float64 quantities the bound needs (module docstring): ``lp`` log p_t, ``E`` logit
    error, ``gap`` m - s_t, all [PB, H, PNQ, T] (T = n_kv keys + the sink, -inf / 0 where dead),
    ``vabs`` |v_t| and ``vdev`` |v_t - g| as [PB, PNQ, H, T, PD] inputs, ``n`` live terms and
    ``records`` (keys j with s_j + E_j >= max_{i<j} (s_i - E_i): the only ones that can raise a float32
    running maximum in key order) per row [PB, H, PNQ], ``live_row`` (some key or the sink is live)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def terms(a, g) -> Terms:
    """Golden softmax pieces of a padded attention call ``a`` (fuzz.cases.pad_attention: q [PB, PNQ, H,
    PD], k/v [PB, NK, Hkv, PD], mask [PB, H, PNQ, NK], sinks [H] (-inf: none), scale, softcap,
    max_bias; mask broadcastable from [PB|1, H|1, PNQ, NK], sinks may be None) and its float64 golden
    output ``g`` [PB, PNQ, H, PD]."""
    f64 = jnp.float64
    q = jnp.asarray(a["q"]).astype(f64)
    (B, NQ, H, _), (NK, Hkv) = q.shape, jnp.shape(a["k"])[1:3]
    mask = jnp.broadcast_to(jnp.asarray(a["mask"]), (B, H, NQ, NK))
    dead = mask == -jnp.inf  # [PB, H, PNQ, NK]
    k = jnp.repeat(jnp.nan_to_num(jnp.asarray(a["k"]).astype(f64)), H // Hkv, axis=2)  # [PB, NK, H, PD]
    v = jnp.repeat(jnp.nan_to_num(jnp.asarray(a["v"]).astype(f64)), H // Hkv, axis=2)
    scale, cap = jnp.asarray(a["scale"]).astype(f64), jnp.asarray(a["softcap"]).astype(f64)
    dot = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    absdot = jnp.einsum("bqhd,bkhd->bhqk", jnp.abs(q), jnp.abs(k))
    x = scale * dot
    capped = cap * jnp.tanh(x / jnp.where(cap != 0, cap, 1.0))
    s0 = jnp.where(cap != 0, capped, x)
    slopes = _att.alibi_slopes(H, a["max_bias"]).astype(f64)
    bias = jnp.where(dead, 0.0, mask.astype(f64)) * slopes[None, :, None, None]
    s = s0 + bias
    nnz = jnp.sum(q != 0, axis=-1).transpose(0, 2, 1)[..., None]  # [PB, H, PNQ, 1]
    E = (_gamma(nnz + 2) * jnp.abs(scale) * absdot + jnp.where(cap != 0, (C_TANH + 1) * U * jnp.abs(s0), 0.0)
         + U * jnp.abs(bias) + U * jnp.abs(s))
    sk = jnp.full((H,), -jnp.inf, f64) if a.get("sinks") is None else jnp.asarray(a["sinks"]).astype(f64)
    sink = jnp.broadcast_to(sk[None, :, None, None], s.shape[:3] + (1,))
    s = jnp.concatenate([jnp.where(dead, -jnp.inf, s), sink], -1)
    E = jnp.concatenate([jnp.where(dead, 0.0, E), jnp.zeros_like(sink)], -1)
    live = s > -jnp.inf
    m = jnp.max(s, -1, keepdims=True)
    live_row = m > -jnp.inf
    m_safe = jnp.where(live_row, m, 0.0)
    z = jnp.sum(jnp.where(live, jnp.exp(s - m_safe), 0.0), -1, keepdims=True)
    lp = jnp.where(live, s - m_safe - jnp.log(jnp.where(live_row, z, 1.0)), -jnp.inf)
    gap = jnp.where(live, m_safe - s, 0.0)
    # keys that can be a running-maximum record in float32, in key order: s_j + E_j >= max_{i<j} s_i - E_i
    lo = jnp.where(live, s - E, -jnp.inf)[..., :-1]
    first = jnp.full(lo.shape[:-1] + (1,), -jnp.inf)
    prev = jnp.concatenate([first, lax.cummax(lo, axis=lo.ndim - 1)[..., :-1]], -1)
    records = jnp.sum(live[..., :-1] & (s[..., :-1] + E[..., :-1] >= prev), -1)
    vh = jnp.transpose(v, (0, 2, 1, 3))  # [PB, H, NK, PD]
    vt = jnp.concatenate([vh, jnp.zeros_like(vh[:, :, :1])], 2)[:, :, None]  # [PB, H, 1, T, PD]: sink row 0
    gt = jnp.transpose(g.astype(f64), (0, 2, 1, 3))[:, :, :, None]  # [PB, H, PNQ, 1, PD]
    return Terms(lp=lp, E=E, gap=gap, live=live, live_row=live_row[..., 0], n=jnp.sum(live, -1), records=records,
                 vabs=jnp.abs(vt), vdev=jnp.abs(vt - gt), gabs=jnp.abs(gt[..., 0, :]),
                 vmax=jnp.max(jnp.abs(vt), axis=(-2, -1)))


def bound(t: Terms, sched: Schedule):
    """Elementwise bound [PB, PNQ, H, PD] (float64) on |out - g| of a kernel with schedule ``sched``
    (module docstring); 0 on rows with no live key and no sink (their output must be exactly 0)."""
    n = t.n.astype(jnp.float64)  # [PB, H, PNQ]
    exps = sched.e0 + (t.records.astype(jnp.float64) if sched.records else sched.e1 * n)
    depth = sched.d0 + sched.d1 * n
    emax = jnp.max(t.E, -1, keepdims=True)
    Ht = t.E + (1 + 2 * U) * U * (t.gap + 2 * emax) + 1.01 * exps[..., None] * C_EXP * U
    Ht = jnp.where(t.live, Ht, 0.0)
    ref = jnp.argmax(jnp.where(t.live, t.lp, -jnp.inf), -1)[..., None]  # golden argmax
    Hr = jnp.take_along_axis(Ht, ref, -1)
    D = jnp.where(jnp.arange(Ht.shape[-1]) == ref, 0.0, Ht + Hr)
    p = jnp.where(t.live, jnp.exp(t.lp), 0.0)
    one_m = -jnp.expm1(-D)  # 1 - e^-D
    pe = jnp.where(t.live, jnp.exp(t.lp + D), 0.0)  # p e^D (log domain: p may underflow, p e^D not)
    rho_p = jnp.sum(pe * one_m, -1, keepdims=True)  # sum p (e^D - 1)
    rho_m = jnp.sum(p * one_m, -1, keepdims=True)
    fp = jnp.maximum((pe * one_m + p * rho_m) / (1 - rho_m), p * (1 - jnp.exp(-D) / (1 + rho_p)))
    fp = jnp.where(t.live, fp, 0.0)[..., None]  # [PB, H, PNQ, T, 1]
    t1 = jnp.sum(fp * t.vdev, -2)  # [PB, H, PNQ, PD]
    t2 = _gamma(depth + 2)[..., None] * (t.gabs + t1 + jnp.sum((p[..., None] + fp) * t.vabs, -2))
    t3 = ((depth + 2) * (n + 1) * _FTZ)[..., None] * (1 + t.gabs + t.vmax[..., None])
    b = jnp.where(t.live_row[..., None], _GOLDEN * (t1 + t2 + t3), 0.0)
    return jnp.transpose(b, (0, 2, 1, 3))


#: fields of :func:`bound_stats`
STATS = ("e2", "power", "max_abs", "nan_count", "gmax", "b2", "outside", "usage", "vacuous")


def bound_stats(got, ref, b, valid):
    """In-program statistics (float64 vector, :data:`STATS`) of ``got`` against the golden ``ref`` and
    the elementwise bound ``b`` over the real region (``valid`` 1.0): e2 = sum d^2, power = sum ref^2,
    max_abs, nan_count (NaN in got only), gmax = max|ref|, b2 = sum b^2, outside = elements with
    d > b, usage = max d / b (inf where d > 0 = b), vacuous = 1 when sum b^2 >= power > 0 or b is
    not finite (the bound cannot separate a correct output from a wrong one)."""
    d, rf, nan, valid = differences(got, ref, valid)
    b = jnp.where(valid, b, 0.0)
    usage = jnp.where(d == 0, 0.0, d / jnp.where(b > 0, b, 0.0))
    power, b2 = jnp.sum(rf * rf), jnp.sum(b * b)
    vac = (~jnp.isfinite(b2) | ((b2 >= power) & (power > 0))).astype(jnp.float64)
    return jnp.stack([jnp.sum(d * d), power, jnp.max(d), nan, jnp.max(jnp.abs(rf)), b2,
                      jnp.sum(d > b).astype(jnp.float64), jnp.max(usage), vac])


def verdict(st) -> tuple[bool, dict]:
    """(ok, metrics) from :func:`bound_stats`: ok when no element is outside its bound and no NaN
    appears where the golden has none. Metrics: ``nmse`` and ``budget_nmse`` = sum b^2 / sum g^2 (the
    NMSE the elementwise bound implies), ``max_abs``, ``usage`` = max |d| / b (<= 1 passes: the figure
    to read), ``outside`` (elements past their bound), ``nan_count``, ``vacuous``."""
    e2, power, mx, nan, gmax, b2, outside, usage, vac = (float(x) for x in st)
    nmse = 0.0 if e2 == 0 else (e2 / power if power > 0 and e2 < float("inf") else float("inf"))
    bn = 0.0 if b2 == 0 else (b2 / power if power > 0 else float("inf"))
    ok = nan == 0 and outside == 0
    return ok, dict(nmse=nmse, budget_nmse=bn, max_abs=mx, usage=usage, outside=int(outside),
                    nan_count=int(nan), vacuous=bool(vac))
