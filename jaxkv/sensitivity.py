"""Sensitivity of decode attention to KV-cache quantisation: Monte-Carlo sweeps, first-order
predictions, per-channel ranking, sharded over JAX devices.

One *configuration* is ``(k_format, v_format, hot_window W, kv_len L, head_dim D, dist, samples, seed)``.
One *sample* is one decode query of one head::

    q [D]   k [L, D]   v [L, D]        float32 values exactly representable in F16 (the cache's input)

drawn from ``DISTRIBUTIONS[dist]``. The mixed cache keeps the last ``W`` tokens as F16 (exact, since the
samples are F16 values) and stores the first ``L - W`` tokens ("cold") as ``dequantize(quantize(x, fmt))``
with :mod:`jaxkv.formats` (K and V formats may differ; ``f16`` means unquantized). This is what
:func:`jaxkv.cache.attend` computes (``attend == attention(q, concat(dequantize(cold), hot))``; the tests
check it on a real :class:`jaxkv.cache.MixedCache`). Both outputs are computed by
:func:`jaxkv.attention.attention` with ``precision="f64"`` and ``scale = 1/sqrt(D)``::

    ref = attention(q, k, v)                    the float64 reference over the unquantized K/V
    out = attention(q, k_mixed, v_mixed)        the mixed cache
    e   = out - ref
    nmse = |e|^2 / |ref|^2     max_abs = max|e|     cos = <out, ref> / (|out| |ref|)

With ``W >= L`` nothing is quantized, the inputs are bitwise equal and every error is exactly 0.

Gradient-based view: ``t = jvp(attention(q, ., .), (k, v), (dk, dv))`` with ``dk = k_mixed - k`` (zero on
hot tokens), likewise ``dv``: the first-order prediction of ``e``. Reported: ``pred_nmse = |t|^2/|ref|^2``
and ``lin_resid = |e - t|^2 / |e|^2`` (how much of the error the linearisation misses). Per-channel
ranking (at the sweep's smallest hot window): ``t`` splits exactly into per-channel terms,
``t = sum_c tK_c + sum_c tV_c``, with ``tK_c`` the response to the K error in head-dim channel ``c`` only
(a jvp through the logits, all channels vmapped) and ``tV_c = (p . dv[:, c]) e_c``; a channel's
sensitivity is ``E|tK_c|^2 / E|ref|^2`` (resp. V).

Samples are generated from ``fold_in(key(seed, dist, D), sample_index)`` at the longest ``L`` of the
sweep; shorter contexts use the most recent ``L`` tokens. So every format, hot window and context length
sees the same samples (common random numbers: paired comparisons), and a sample's value does not depend on
how samples are batched or sharded. Samples are ``vmap``-ped; the sample axis of each batch is sharded
over a 1-D device mesh (``jax.sharding``); all hot windows and context lengths of a *group*
``(k_format, v_format, dist, D)`` are evaluated from one quantisation of its samples.

Statistics over samples: mean, 95th percentile, and a 95% percentile-bootstrap confidence interval of the
mean (:func:`bootstrap_ci`, 2000 resamples, fixed RNG).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxkv import attention as _att
from jaxkv import formats
from jaxkv.budget import nmse_from_sums
from jaxkv import outliers as _outliers
from jaxkv.outliers import Outliers

__all__ = [
    "Dist", "DISTRIBUTIONS", "Config", "Group", "Sweep", "METRICS", "DEFAULT_FORMATS",
    "outlier_channels", "channel_scales", "draw", "roundtrip", "block_noise_model",
    "sample_outputs", "metrics", "run_group", "summarize", "rank_channels", "run_sweep", "bootstrap_ci",
    "paired_diff_ci", "make_mesh",
]

#: the block K/V types, most bits per element first (q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl)
DEFAULT_FORMATS = tuple(sorted(formats.BLOCK_KV_TYPES,
                               key=lambda n: -formats.FORMATS[n].block_bytes / formats.FORMATS[n].block_size))

#: per-sample metrics, arrays [S, n_L, n_W] in :func:`run_group`'s result
METRICS = ("nmse", "max_abs", "cos", "pred_nmse", "lin_resid", "k_qerr", "v_qerr")

# Elements (samples x L_max x D) per device batch: bounds memory (f64 copies, quantizer temporaries).
_BATCH_ELEMS = 1 << 21
_BATCH_PER_DEVICE = 8  # at most this many samples per device and call


# ----------------------------------------------------------------------------------------------------
# distributions


@dataclasses.dataclass(frozen=True)
class Dist:
    """A sample distribution: q, k, v iid N(0, 1) per element, except that the head-dim channels of
    **k** that ``outliers`` (a :class:`jaxkv.outliers.Outliers` profile, or None) picks are scaled by its
    factor. The outlier channels are fixed per (seed, D) (:func:`outlier_channels`), like the few large
    channels that real K caches show; V has none."""

    name: str
    outliers: Outliers | None = None
    description: str = ""


DISTRIBUTIONS: dict[str, Dist] = {d.name: d for d in (
    Dist("normal", None, "q, k, v iid N(0,1)"),
    Dist("outliers", _outliers.SENSITIVITY, "as normal, but 2 of every 64 K channels have scale 10"),
)}


def _stable_int(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def outlier_channels(seed: int, head_dim: int, dist: str) -> np.ndarray:
    """Sorted int array of the K channels that ``dist`` scales up (empty for ``normal``); a function of
    (seed, head_dim, dist) only."""
    d = _get_dist(dist)
    if d.outliers is None or d.outliers.count(head_dim) == 0:
        return np.zeros((0,), np.int64)
    rng = np.random.default_rng(_stable_int("outliers", seed, head_dim, d.name))
    return np.sort(d.outliers.channels(rng, head_dim)).astype(np.int64)


def channel_scales(seed: int, head_dim: int, dist: str) -> np.ndarray:
    """float32 [D]: the per-channel scale of K under ``dist`` (1 except at :func:`outlier_channels`)."""
    s = np.ones((head_dim,), np.float32)
    d = _get_dist(dist)
    if d.outliers is not None:
        s[outlier_channels(seed, head_dim, dist)] = d.outliers.scale
    return s


def _data_key(seed: int, dist: str, head_dim: int):
    return jax.random.fold_in(jax.random.PRNGKey(seed), _stable_int("data", dist, head_dim))


def draw(key, n_kv: int, head_dim: int, k_scale):
    """One sample: q [D], k [n_kv, D], v [n_kv, D] float32, every value exactly representable in F16
    (drawn N(0,1), K channels multiplied by ``k_scale`` [D], then rounded to F16)."""
    kq, kk, kv = jax.random.split(key, 3)
    f16 = lambda x: x.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
    q = f16(jax.random.normal(kq, (head_dim,), jnp.float32))
    k = f16(jax.random.normal(kk, (n_kv, head_dim), jnp.float32) * jnp.asarray(k_scale, jnp.float32))
    v = f16(jax.random.normal(kv, (n_kv, head_dim), jnp.float32))
    return q, k, v


# ----------------------------------------------------------------------------------------------------
# quantisation


def roundtrip(x, fmt):
    """float32 [..., n] -> ``dequantize(quantize(x, fmt), fmt)`` float32 [..., n] (jaxkv.formats)."""
    f = formats.get_format(fmt)
    return formats.dequantize(formats.quantize(x, f), f)


# uniform-noise model of the block formats: step d from a block statistic, noise d^2/12 per element
_BLOCK_MODEL = {
    "q8_0": ("absmax", 127.0), "q5_0": ("absmax", 16.0), "q4_0": ("absmax", 8.0),
    "q5_1": ("range", 31.0), "q4_1": ("range", 15.0),
}


def block_noise_model(x, fmt):
    """Relative MSE ``sum(noise) / sum(x^2)`` that the uniform-rounding model predicts from block
    statistics alone: step ``d = absmax / (2^(b-1))`` (q4_0: 8, q5_0: 16, q8_0: 127) or
    ``d = (max - min) / (2^b - 1)`` (q4_1, q5_1), noise ``d^2 / 12`` per element. x [..., n] with n a
    multiple of 32; NaN for formats without a uniform grid (iq4_nl) and 0 for f16/f32/bf16 (x is exact
    in F16 here). A scalar float64."""
    f = formats.get_format(fmt)
    if not f.quantized:
        return jnp.zeros((), jnp.float64)
    if f.name not in _BLOCK_MODEL:
        return jnp.full((), jnp.nan, jnp.float64)
    kind, den = _BLOCK_MODEL[f.name]
    x = jnp.asarray(x, jnp.float64)
    b = x.reshape(x.shape[:-1] + (-1, f.block_size))
    if kind == "absmax":
        d = jnp.max(jnp.abs(b), axis=-1) / den
    else:
        d = (jnp.max(b, axis=-1) - jnp.min(b, axis=-1)) / den
    noise = jnp.sum(d ** 2 / 12.0) * f.block_size
    return noise / jnp.maximum(jnp.sum(x ** 2), 1e-300)


# ----------------------------------------------------------------------------------------------------
# configurations


def _get_dist(name) -> Dist:
    if isinstance(name, Dist):
        return name
    d = DISTRIBUTIONS.get(str(name).strip().lower())
    if d is None:
        raise ValueError(f"dist: unknown distribution {name!r}; known: {sorted(DISTRIBUTIONS)}")
    return d


def _fmt_name(name, field: str) -> str:
    try:
        return formats.get_format(name).name
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration (one row of results). ``key`` identifies it (resume)."""

    k_format: str
    v_format: str
    hot_window: int
    kv_len: int
    head_dim: int
    dist: str
    samples: int
    seed: int

    @property
    def n_cold(self) -> int:
        return max(self.kv_len - self.hot_window, 0)

    @property
    def key(self) -> str:
        return (f"{self.k_format}/{self.v_format}/W{self.hot_window}/L{self.kv_len}/D{self.head_dim}/"
                f"{self.dist}/S{self.samples}/seed{self.seed}")


@dataclasses.dataclass(frozen=True)
class Group:
    """Configurations computed together from one quantisation of the samples: every (kv_len, hot_window)
    of one (k_format, v_format, dist, head_dim)."""

    k_format: str
    v_format: str
    dist: str
    head_dim: int
    kv_lens: tuple[int, ...]
    hot_windows: tuple[int, ...]
    samples: int
    seed: int

    def configs(self) -> list[Config]:
        return [Config(self.k_format, self.v_format, w, n, self.head_dim, self.dist, self.samples,
                       self.seed) for n in self.kv_lens for w in self.hot_windows]

    @property
    def label(self) -> str:
        return f"K={self.k_format} V={self.v_format} D={self.head_dim} {self.dist}"


def _int_tuple(vals, field: str, minimum: int) -> tuple[int, ...]:
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{field}: expected integers >= {minimum}, got {v!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{field}: expected at least one value")
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The cross product of its axes. ``format_pairs`` lists (k_format, v_format) pairs (format names as
    in :data:`jaxkv.formats.FORMATS`; ``f16`` = unquantized). Validated on construction (ValueError naming
    the field); lists are normalised (names lower case, integer axes sorted, duplicates dropped)."""

    format_pairs: tuple[tuple[str, str], ...]
    hot_windows: tuple[int, ...] = (0, 32, 128, 512)
    kv_lens: tuple[int, ...] = (512, 4096)
    head_dims: tuple[int, ...] = (64, 128)
    dists: tuple[str, ...] = ("normal", "outliers")
    samples: int = 64
    seed: int = 0

    def __post_init__(self):
        pairs = []
        for p in self.format_pairs:
            if len(p) != 2:
                raise ValueError(f"format_pairs: expected (k_format, v_format) pairs, got {p!r}")
            pair = (_fmt_name(p[0], "k_format"), _fmt_name(p[1], "v_format"))
            if pair not in pairs:
                pairs.append(pair)
        if not pairs:
            raise ValueError("format_pairs: expected at least one (k_format, v_format) pair")
        object.__setattr__(self, "format_pairs", tuple(pairs))
        object.__setattr__(self, "hot_windows", _int_tuple(self.hot_windows, "hot_window", 0))
        object.__setattr__(self, "kv_lens", _int_tuple(self.kv_lens, "kv_len", 1))
        object.__setattr__(self, "head_dims", _int_tuple(self.head_dims, "head_dim", 1))
        dists = []
        for d in self.dists:
            name = _get_dist(d).name
            if name not in dists:
                dists.append(name)
        if not dists:
            raise ValueError("dist: expected at least one distribution")
        object.__setattr__(self, "dists", tuple(dists))
        if isinstance(self.samples, bool) or not isinstance(self.samples, (int, np.integer)) \
                or self.samples < 2:
            raise ValueError(f"samples: expected an integer >= 2, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed < 2 ** 31:
            raise ValueError(f"seed: expected an integer in [0, 2^31), got {self.seed!r}")
        for k, v in self.format_pairs:
            for d in self.head_dims:
                for field, name in (("k_format", k), ("v_format", v)):
                    bs = formats.get_format(name).block_size
                    if d % bs:
                        raise ValueError(f"head_dim: {d} is not a multiple of {name}'s block size {bs} "
                                         f"({field})")

    def groups(self) -> list[Group]:
        """Groups in run order: head_dim, dist, then format pairs."""
        return [Group(k, v, dist, d, self.kv_lens, self.hot_windows, int(self.samples), int(self.seed))
                for d in self.head_dims for dist in self.dists for k, v in self.format_pairs]

    def configs(self) -> list[Config]:
        return [c for g in self.groups() for c in g.configs()]


# ----------------------------------------------------------------------------------------------------
# per-sample computation


def _attn(q, k, v):
    """f64 reference attention of one query / one head: q [D], k [L, D], v [L, Dv] -> [Dv] float64."""
    d = q.shape[-1]
    out = _att.attention(q[None, None, None, :], k[None, :, None, :], v[None, :, None, :],
                         scale=1.0 / math.sqrt(d), precision="f64")
    return out[0, 0, 0]


def _channel_terms(q, k, v, dk, dv):
    """Per-channel first-order terms of one sample (float64). Returns (eK [D], eV [Dv], t [Dv]):
    eK[c] = |tK_c|^2, eV[c] = |tV_c|^2 and t = sum_c tK_c + sum_c tV_c (the full first-order term)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = scale * (k @ q)                                       # [L]
    h = lambda s_: jax.nn.softmax(s_) @ v                     # noqa: E731  logits -> output [Dv]
    ds = scale * dk * q[None, :]                              # [L, D]: logit change from channel c
    tk = jax.vmap(lambda x: jax.jvp(h, (s,), (x,))[1], in_axes=1)(ds)   # [D, Dv]
    p = jax.nn.softmax(s)
    tv = p @ dv                                               # [Dv]: tV_c = tv[c] e_c
    t = jnp.sum(tk, axis=0) + tv
    return jnp.sum(tk * tk, axis=-1), tv * tv, t


def _state(q64, k, v):
    """f64 partial softmax state of one query / one head over keys k [n, D], values v [n, Dv]."""
    return _att.partial_state(q64[None, None, None, :], k[None, :, None, :], v[None, :, None, :],
                              scale=1.0 / math.sqrt(q64.shape[-1]), precision="f64")


def _finish(states):
    """Merge states left to right (a fixed order) and finalize -> [Dv] float64."""
    st = states[0]
    for x in states[1:]:
        st = _att.merge(st, x)
    return _att.finalize(st)[0, 0, 0]


def _segments(n: int, hot_windows: tuple[int, ...]) -> list[tuple[int, int]]:
    """Token ranges [a, b) of a context of n tokens cut at every cold/hot boundary n - W."""
    cuts = sorted({0, n} | {max(n - w, 0) for w in hot_windows})
    return list(zip(cuts[:-1], cuts[1:]))


def sample_outputs(q, k, v, kq, vq, kv_lens: tuple[int, ...], hot_windows: tuple[int, ...], *,
                   channels: bool = True):
    """Attention outputs of one sample at every (kv_len, hot_window), float64. q [D], k/v [L_max, D]
    unquantized, kq/vq [L_max, D] their format round trips (float32); context L uses the last L tokens;
    hot_windows: static ints. Returns a dict:

    ``out`` [n_L, n_W + 1, Dv]: mixed-cache outputs; the last one (nothing cold) is the reference;
    ``t`` [n_L, n_W, Dv]: first-order predictions (jvp); ``k_qerr`` / ``v_qerr`` [n_L, n_W]: relative
    MSE of the cold K / V round trip (0 with no cold token); with ``channels``, at ``hot_windows[0]``:
    ``ch_k`` [n_L, D] / ``ch_v`` [n_L, Dv] per-channel energies |t_c|^2 and ``ch_check`` [n_L]
    (|sum_c t_c - t|^2 / |t|^2, the additivity check).

    Method: the context is cut into segments at every boundary L - W; each segment's partial softmax
    state (:func:`jaxkv.attention.partial_state`, f64) is computed once unquantized and once quantized,
    and the output for window W merges the quantized states of the cold segments with the unquantized
    ones of the hot segments (always in token order) and finalizes: split-K attention, O(L D) per sample
    for all windows together. The reference is the all-unquantized merge (the same expression, so W >= L
    gives bitwise the reference). ``t`` for W is the sum over cold segments of the jvp of the output with
    respect to that segment's K/V in the direction (kq - k, vq - v).

    The error metrics are computed from these on the host (:func:`metrics`): inside one XLA program
    ``o - ref`` may be fused with the producer of ``o`` (FMA contraction), so bitwise-equal outputs need
    not give an exact 0 there."""
    f64 = jnp.float64
    res: dict[str, list] = {m: [] for m in ("out", "t", "k_qerr", "v_qerr", "ch_k", "ch_v", "ch_check")}
    q64 = q.astype(f64)
    for n in kv_lens:
        k64, v64, kq64, vq64 = (x[-n:].astype(f64) for x in (k, v, kq, vq))
        dk_all, dv_all = kq64 - k64, vq64 - v64   # exact: a difference of two f32 values in f64
        segs = _segments(n, hot_windows)
        su = [_state(q64, k64[a:b], v64[a:b]) for a, b in segs]
        sq = [_state(q64, kq64[a:b], vq64[a:b]) for a, b in segs]
        ts, ek, ev, nk, nv = [], [], [], [], []
        for i, (a, b) in enumerate(segs):
            def f(kk, vv, i=i):
                return _finish(su[:i] + [_state(q64, kk, vv)] + su[i + 1:])
            ts.append(jax.jvp(f, (k64[a:b], v64[a:b]), (dk_all[a:b], dv_all[a:b]))[1])
            ek.append(jnp.sum(dk_all[a:b] ** 2))
            ev.append(jnp.sum(dv_all[a:b] ** 2))
            nk.append(jnp.sum(k64[a:b] ** 2))
            nv.append(jnp.sum(v64[a:b] ** 2))
        outs, tw, kqe, vqe = [], [], [], []
        for w in hot_windows:
            c = max(n - w, 0)
            cold = [i for i, (a, b) in enumerate(segs) if b <= c]
            outs.append(_finish([sq[i] if i in cold else su[i] for i in range(len(segs))]))
            zero = jnp.zeros((), f64)
            t = functools.reduce(lambda x, i: x + ts[i], cold, jnp.zeros_like(outs[-1]))
            tw.append(t)
            sk = functools.reduce(lambda x, i: x + ek[i], cold, zero)
            sv = functools.reduce(lambda x, i: x + ev[i], cold, zero)
            dk_ = functools.reduce(lambda x, i: x + nk[i], cold, zero)
            dv_ = functools.reduce(lambda x, i: x + nv[i], cold, zero)
            kqe.append(jnp.where(dk_ > 0, sk / jnp.maximum(dk_, 1e-300), 0.0))
            vqe.append(jnp.where(dv_ > 0, sv / jnp.maximum(dv_, 1e-300), 0.0))
        outs.append(_finish(su))   # the reference: the expression of any W >= n
        res["out"].append(jnp.stack(outs))
        res["t"].append(jnp.stack(tw))
        res["k_qerr"].append(jnp.stack(kqe))
        res["v_qerr"].append(jnp.stack(vqe))
        if channels:
            cold = (jnp.arange(n) < n - hot_windows[0])[:, None]
            dk, dv = jnp.where(cold, dk_all, 0.0), jnp.where(cold, dv_all, 0.0)
            ekc, evc, t_sum = _channel_terms(q64, k64, v64, dk, dv)
            t0 = tw[0]
            tt = jnp.sum(t0 * t0)
            res["ch_k"].append(ekc)
            res["ch_v"].append(evc)
            res["ch_check"].append(
                jnp.where(tt > 0, jnp.sum((t_sum - t0) ** 2) / jnp.maximum(tt, 1e-300), 0.0))
    return {m: jnp.stack(x) for m, x in res.items() if x}


def metrics(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host-side (numpy float64) metrics from :func:`sample_outputs` results with any leading axes
    ``[..., n_L, n_W + 1, Dv]``: METRICS -> ``[..., n_L, n_W]``; channel energies are normalised by
    |ref|^2 (``ch_k``, ``ch_v``) and ``ch_check`` is passed through."""
    o = np.asarray(outputs["out"], np.float64)
    t = np.asarray(outputs["t"], np.float64)
    ref = o[..., -1:, :]
    mix = o[..., :-1, :]
    e = mix - ref
    ref_e = np.sum(ref * ref, axis=-1)                       # [..., n_L, 1]
    ref_n = np.maximum(ref_e, 1e-300)
    ee = np.sum(e * e, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        res = dict(
            nmse=nmse_from_sums(ee, ref_e),
            max_abs=np.max(np.abs(e), axis=-1),
            cos=np.sum(mix * ref, axis=-1) / np.maximum(np.sqrt(np.sum(mix * mix, axis=-1) * ref_e), 1e-300),
            pred_nmse=np.sum(t * t, axis=-1) / ref_n,
            lin_resid=np.where(ee > 0, np.sum((e - t) ** 2, axis=-1) / np.maximum(ee, 1e-300), 0.0),
            k_qerr=np.asarray(outputs["k_qerr"], np.float64),
            v_qerr=np.asarray(outputs["v_qerr"], np.float64))
    if "ch_k" in outputs:
        res["ch_k"] = np.asarray(outputs["ch_k"], np.float64) / ref_n
        res["ch_v"] = np.asarray(outputs["ch_v"], np.float64) / ref_n
        res["ch_check"] = np.asarray(outputs["ch_check"], np.float64)
    return res


def make_mesh(devices: int | None = None) -> Mesh:
    """1-D mesh (axis ``"s"``, the sample axis) over the first ``devices`` JAX devices (default all)."""
    avail = jax.devices()
    n = len(avail) if devices is None else devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"devices: expected a positive integer, got {devices!r}")
    if n > len(avail):
        raise ValueError(f"devices: {n} requested but only {len(avail)} JAX device(s) available "
                         f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return Mesh(np.array(avail[:n]), ("s",))


# Three jitted stages, each vmapped over samples with the sample axis sharded over the mesh: drawing
# (per D), the format round trip (per format) and the outputs (per D, kv_lens, hot_windows; shared by all
# formats and distributions, so a sweep compiles the attention part once per head size).


def _sharded(fn, mesh: Mesh, n_rep: int, n_shard: int):
    """jit(shard_map(fn)): the first ``n_rep`` args replicated, the next ``n_shard`` and the outputs
    split along axis 0 over the mesh axis "s" (each device runs ``fn`` on its slice of samples).

    Reproducibility: with a fixed per-device batch, meshes of 2, 4, ... devices give bitwise-equal
    results; a 1-device mesh compiles as a single-partition program whose f64 reductions XLA may
    associate differently (observed: a few ulp on outputs; up to 3e-12 relative on derived metrics in
    benchmarks/bench_sensitivity.py)."""
    specs = (P(),) * n_rep + (P("s"),) * n_shard
    # check_vma=False: library code (e.g. formats' lax.scan with a fresh zero carry) is written for
    # plain arrays; every value here is per-device anyway
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("s"), check_vma=False))


@functools.lru_cache(maxsize=64)
def _draw_fn(head_dim: int, l_max: int, mesh: Mesh):
    fn = jax.vmap(lambda key, k_scale, i: draw(jax.random.fold_in(key, i), l_max, head_dim, k_scale),
                  in_axes=(None, None, 0))
    return _sharded(fn, mesh, 2, 1)


@functools.lru_cache(maxsize=64)
def _roundtrip_fn(fmt: str, mesh: Mesh):
    return _sharded(jax.vmap(lambda x: roundtrip(x, fmt)), mesh, 0, 1)


@functools.lru_cache(maxsize=64)
def _outputs_fn(kv_lens: tuple, hot_windows: tuple, mesh: Mesh, channels: bool):
    fn = jax.vmap(lambda q, k, v, kq, vq: sample_outputs(q, k, v, kq, vq, kv_lens, hot_windows,
                                                         channels=channels))
    return _sharded(fn, mesh, 0, 5)


def run_group(group: Group, *, mesh: Mesh | None = None, channels: bool = True,
              batch: int | None = None) -> dict[str, np.ndarray]:
    """Per-sample results of a group (numpy float64): METRICS -> [S, n_L, n_W] (axes: samples,
    group.kv_lens, group.hot_windows); with ``channels``: ``ch_k`` [S, n_L, D], ``ch_v`` [S, n_L, D],
    ``ch_check`` [S, n_L] (at the smallest hot window). Samples run in batches of ``batch`` (default:
    mesh size x min(8, memory bound); a multiple of the mesh size), each sharded over ``mesh`` (default:
    all devices). A sample's inputs do not depend on the batching or the mesh; its metrics are bitwise
    equal on meshes of >= 2 devices and within ~1e-11 relative of the 1-device ones (``_sharded``)."""
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    l_max, d = max(group.kv_lens), group.head_dim
    if batch is None:  # per-device batch independent of the device count (reproducibility)
        batch = n_dev * max(1, min(_BATCH_PER_DEVICE, _BATCH_ELEMS // (l_max * d)))
    if batch % n_dev:
        raise ValueError(f"batch: {batch} is not a multiple of the mesh size {n_dev}")
    draw_fn = _draw_fn(d, l_max, mesh)
    rt_k, rt_v = _roundtrip_fn(group.k_format, mesh), _roundtrip_fn(group.v_format, mesh)
    out_fn = _outputs_fn(tuple(group.kv_lens), tuple(group.hot_windows), mesh, bool(channels))
    key = _data_key(group.seed, group.dist, d)
    k_scale = jnp.asarray(channel_scales(group.seed, d, group.dist))
    parts = []
    for start in range(0, group.samples, batch):
        idx = jnp.arange(start, start + batch, dtype=jnp.int32)  # past S: computed, then dropped
        q, k, v = draw_fn(key, k_scale, idx)
        parts.append(jax.device_get(out_fn(q, k, v, rt_k(k), rt_v(v))))
    raw = {m: np.concatenate([p[m] for p in parts])[: group.samples] for m in parts[0]}
    return metrics(raw)


# ----------------------------------------------------------------------------------------------------
# statistics


def bootstrap_ci(x, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of x [S] (``n_boot`` resamples with a fixed
    RNG, so it is deterministic). Returns (lo, hi) float."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        raise ValueError("x: expected at least one sample")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def paired_diff_ci(a, b, **kw) -> tuple[float, float]:
    """Bootstrap CI (as :func:`bootstrap_ci`) of mean(a - b) for paired samples a, b [S] (same draws)."""
    return bootstrap_ci(np.asarray(a, np.float64) - np.asarray(b, np.float64), **kw)


def summarize(group: Group, per_sample: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per configuration of the group: every input (k_format, v_format, hot_window, kv_len,
    n_cold, head_dim, dist, samples, seed, key) and, per metric, ``<m>_mean``, ``<m>_p95``,
    ``<m>_ci_lo``, ``<m>_ci_hi`` (95% bootstrap CI of the mean); ``pred_ratio`` = mean pred_nmse / mean
    nmse (1 where the first-order prediction is exact; NaN when nothing is quantized)."""
    rows = []
    for i, n in enumerate(group.kv_lens):
        for j, w in enumerate(group.hot_windows):
            cfg = Config(group.k_format, group.v_format, w, n, group.head_dim, group.dist,
                         group.samples, group.seed)
            row: dict[str, Any] = dict(
                key=cfg.key, k_format=cfg.k_format, v_format=cfg.v_format, hot_window=w, kv_len=n,
                n_cold=cfg.n_cold, head_dim=cfg.head_dim, dist=cfg.dist, samples=cfg.samples,
                seed=cfg.seed)
            for m in METRICS:
                x = per_sample[m][:, i, j]
                lo, hi = bootstrap_ci(x, seed=_stable_int(cfg.key, m))
                row.update({f"{m}_mean": float(np.mean(x)), f"{m}_p95": float(np.quantile(x, 0.95)),
                            f"{m}_ci_lo": lo, f"{m}_ci_hi": hi})
            mn = row["nmse_mean"]
            row["pred_ratio"] = row["pred_nmse_mean"] / mn if mn > 0 else float("nan")
            rows.append(row)
    return rows


def rank_channels(group: Group, per_sample: dict[str, np.ndarray], top: int = 8) -> list[dict[str, Any]]:
    """Per-channel sensitivity of a group, one record per kv_len (at hot window
    ``group.hot_windows[0]``): ``k`` / ``v`` [D] mean first-order energy |t_c|^2/|ref|^2 per channel,
    ``k_share`` / ``v_share`` (fractions of the summed energy of K and V channels together), ``top``: the
    ``top`` most sensitive channels as ``"K12"`` / ``"V3"`` labels, the outlier channels of the
    distribution, and ``additivity``: max over samples of |sum_c t_c - jvp|^2/|jvp|^2 (a check)."""
    out = []
    outl = outlier_channels(group.seed, group.head_dim, group.dist).tolist()
    for i, n in enumerate(group.kv_lens):
        ek = per_sample["ch_k"][:, i].mean(axis=0)
        ev = per_sample["ch_v"][:, i].mean(axis=0)
        tot = float(ek.sum() + ev.sum())
        labels = [f"K{c}" for c in range(ek.size)] + [f"V{c}" for c in range(ev.size)]
        allv = np.concatenate([ek, ev])
        order = np.argsort(-allv, kind="stable")[:top]
        out.append(dict(
            k_format=group.k_format, v_format=group.v_format, dist=group.dist, head_dim=group.head_dim,
            kv_len=n, hot_window=group.hot_windows[0], samples=group.samples, seed=group.seed,
            outlier_channels=outl, k=ek.tolist(), v=ev.tolist(),
            k_share=(ek / tot).tolist() if tot > 0 else [0.0] * ek.size,
            v_share=(ev / tot).tolist() if tot > 0 else [0.0] * ev.size,
            top=[labels[c] for c in order if allv[c] > 0],
            additivity=float(np.max(per_sample["ch_check"][:, i]))))
    return out


# ----------------------------------------------------------------------------------------------------
# sweeps


def run_sweep(sweep: Sweep, *, mesh: Mesh | None = None, skip: Callable[[Group], bool] | None = None,
              channels: bool = True) -> Iterator[tuple[Group, list[dict], list[dict]]]:
    """Run the sweep group by group, yielding ``(group, rows, channel_records)`` as each group finishes
    (rows: :func:`summarize`; channel records: :func:`rank_channels`, empty without ``channels``).
    Groups for which ``skip(group)`` is true are not run (resume)."""
    mesh = make_mesh() if mesh is None else mesh
    for g in sweep.groups():
        if skip is not None and skip(g):
            continue
        res = run_group(g, mesh=mesh, channels=channels)
        yield g, summarize(g, res), (rank_channels(g, res) if channels else [])


def pairs_from(formats_: Iterable[str] | None = None, k_formats: Iterable[str] | None = None,
               v_formats: Iterable[str] | None = None) -> tuple[tuple[str, str], ...]:
    """Format pairs: with neither ``k_formats`` nor ``v_formats``, (f, f) for f in ``formats_``;
    otherwise the cross product k_formats x v_formats, a missing side taken from ``formats_``."""
    base = tuple(formats_ or DEFAULT_FORMATS)
    if k_formats is None and v_formats is None:
        return tuple((f, f) for f in base)
    ks = tuple(k_formats) if k_formats is not None else base
    vs = tuple(v_formats) if v_formats is not None else base
    return tuple((k, v) for k in ks for v in vs)


__all__.append("pairs_from")
