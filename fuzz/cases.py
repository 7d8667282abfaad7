"""Case parameters (fuzz.strategies) -> arrays, deterministically; padding into bucket shapes.

Layout is jaxkv's canonical one: q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv],
mask [B, H|1, n_q, n_kv] (additive, -inf masks; values exactly representable in F16, as trace v1 stores
them), sinks [H]. All arrays are float32 numpy; K and V hold values representable in their storage
format (``f16``/``bf16`` rounding; quantized formats are handled by the properties that use them).

Decode convention for causal masks: query row ``i`` sits at position ``n_kv - n_q + i``.

Padding (:func:`pad_attention`) embeds a case into the fixed program shapes of its bucket
``[PAD_B, PAD_NQ, H, PAD_D]`` / ``[PAD_B, bucket, Hkv, PAD_D]``: zero rows and channels, padded keys
masked with -inf, padded query rows copying the last real row's mask (so a key dead for every real row
stays dead for the program), padded batch rows fully masked. The padded call is itself a valid attention
call; outputs are compared on the real region only (``valid``).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from fuzz.strategies import FLAGSETS, MENU_BUCKETS, PAD_B, PAD_D, PAD_NQ
from jaxkv import ops, outliers

__all__ = ["menu_values", "menu_mask", "menu_arrays", "DISTRIBUTIONS", "draw_values", "store", "masked_keys", "make_mask", "attention_arrays",
           "pad_attention", "scale_of"]


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _outlier(rng, shape):
    return outliers.FUZZ.apply(rng, rng.standard_normal(shape))


def _big(rng, shape):
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5, 1.0, shape) * 1e4


def _tiny(rng, shape):
    return rng.standard_normal(shape) * 1e-5


def _constant(rng, shape):
    return np.full(shape, rng.uniform(-2, 2))


def _uniform(rng, shape):
    return rng.uniform(-1, 1, shape)


#: name -> fn(rng, shape) float64 samples
DISTRIBUTIONS = dict(normal=_normal, outlier=_outlier, big=_big, tiny=_tiny, constant=_constant,
                     uniform=_uniform)


def draw_values(rng, shape, dist: str) -> np.ndarray:
    """float32 [shape] from ``DISTRIBUTIONS[dist]``."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist: unknown distribution {dist!r}; known: {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[dist](rng, tuple(shape)).astype(np.float32)


def store(x, fmt: str) -> np.ndarray:
    """Round float32 values to a float storage format ('f32', 'f16', 'bf16') and back to float32."""
    x = np.asarray(x, np.float32)
    if fmt == "f32":
        return x
    if fmt == "f16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if fmt == "bf16":
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    raise ValueError(f"fmt: expected f32, f16 or bf16 for dense storage, got {fmt!r}")


def _positions(n_q: int, n_kv: int):
    """(pos [n_q, 1], j [1, n_kv]): query row i sits at position n_kv - n_q + i, key j at j."""
    return n_kv - n_q + np.arange(n_q)[:, None], np.arange(n_kv)[None, :]


def masked_keys(rng, kind: str, param: int, shape, *, key_rate: float, row_rate: float) -> np.ndarray:
    """bool ``shape`` = [B, Hm, n_q, n_kv]: the keys a mask of ``kind`` hides (decode convention).

    'none': nothing; 'causal' / 'alibi': keys after the row's position; 'window': also keys ``param`` or
    more positions before it; 'random': each key with probability ``key_rate``; 'full_rows': random,
    plus whole rows with probability ``row_rate`` (at least one row); 'padded': the last ``param`` keys.
    Draws from ``rng`` for 'random' and 'full_rows' only (key draws first, then rows)."""
    B, Hm, n_q, n_kv = shape
    if kind == "none":
        return np.zeros(shape, bool)
    if kind in ("causal", "window", "alibi"):
        pos, j = _positions(n_q, n_kv)
        dead = j > pos
        if kind == "window":
            dead = dead | (j <= pos - param)
        return np.broadcast_to(dead, shape).copy()
    if kind in ("random", "full_rows"):
        dead = rng.uniform(size=shape) < key_rate
        if kind == "full_rows":
            rows = rng.uniform(size=(B, Hm, n_q)) < row_rate
            rows.flat[rng.integers(rows.size)] = True
            dead = dead | rows[..., None]
        return dead
    if kind == "padded":
        dead = np.zeros(shape, bool)
        dead[..., max(n_kv - param, 0):] = True
        return dead
    raise ValueError(f"mask: unknown kind {kind!r}")


def make_mask(rng, kind: str, param: int, B: int, Hm: int, n_q: int, n_kv: int):
    """Additive mask float32 [B, Hm, n_q, n_kv] (or None for 'none'), F16-representable.

    kinds (:func:`masked_keys`, -inf there): none; causal (decode positions); window (causal, only the
    last ``param`` keys); random (-inf with probability param/80); full_rows (random plus rows with
    probability 1/2, at least one); padded (the last ``param`` keys masked everywhere: unused cache
    slots); alibi (-|pos_i - j| distances, causal). Live entries are 0 except for alibi."""
    if kind == "none":
        return None
    shape = (B, Hm, n_q, n_kv)
    m = np.zeros(shape, np.float32)
    if kind == "alibi":
        pos, j = _positions(n_q, n_kv)
        m[:] = -np.abs(pos - j).astype(np.float32)
    m = np.where(masked_keys(rng, kind, param, shape, key_rate=param / 80.0, row_rate=0.5), -np.inf, m)
    return m.astype(np.float16).astype(np.float32)


def scale_of(c) -> float:
    """The case's scale as float32 value: 'rsqrt' -> 1/sqrt(Dk)."""
    s = c["scale"]
    return float(np.float32(1.0 / math.sqrt(c["Dk"]) if s == "rsqrt" else s))


def attention_arrays(c) -> dict:
    """Case params -> dict(q, k, v, mask (or None), sinks (or None), scale, softcap, max_bias), the real
    (unpadded) attention call, float32 numpy arrays and Python floats."""
    rng = np.random.default_rng(int(c["seed"]))
    H, Hkv = c["heads"]
    B, n_q, Dk, Dv, n = c["B"], c["n_q"], c["Dk"], c["Dv"], c["n_kv"]
    q = draw_values(rng, (B, n_q, H, Dk), c["q_dist"])
    k = store(draw_values(rng, (B, n, Hkv, Dk), c["k_dist"]), c["k_fmt"])
    v = store(draw_values(rng, (B, n, Hkv, Dv), c["v_dist"]), c["v_fmt"])
    Hm = H if c.get("mask_heads") else 1
    mask = make_mask(rng, c["mask"], int(c["mask_param"]), B, Hm, n_q, n)
    sinks = (rng.standard_normal(H) * 2).astype(np.float32) if c.get("sinks") else None
    if c.get("nan_unused") and mask is not None:
        dead = np.all(mask == -np.inf, axis=(1, 2))  # [B, n_kv]: dead for every head and row
        k = np.where(dead[:, :, None, None], np.nan, k).astype(np.float32)
        v = np.where(dead[:, :, None, None], np.nan, v).astype(np.float32)
    return dict(q=q, k=k, v=v, mask=mask, sinks=sinks, scale=scale_of(c),
                softcap=float(np.float32(c.get("softcap", 0.0))),
                max_bias=float(np.float32(c.get("max_bias", 0.0))))


def pad_attention(c, a=None) -> dict:
    """Embed the case into its bucket's program shapes: dict(q [PB, PNQ, H, PD], k/v [PB, NK, Hkv, PD],
    mask [PB, H, PNQ, NK], sinks [H] (-inf when the case has none: exactly "no sink"), scale, softcap,
    max_bias (float32 scalars), valid [PB, PNQ, 1, PD] float32 (1 on the real output region))."""
    a = attention_arrays(c) if a is None else a
    H, Hkv = c["heads"]
    NK = int(c["bucket"])
    B, n_q, Dk, Dv, n = c["B"], c["n_q"], c["Dk"], c["Dv"], c["n_kv"]
    q = np.zeros((PAD_B, PAD_NQ, H, PAD_D), np.float32)
    q[:B, :n_q, :, :Dk] = a["q"]
    q[:B, n_q:, :, :Dk] = a["q"][:, -1:]
    k = np.zeros((PAD_B, NK, Hkv, PAD_D), np.float32)
    k[:B, :n, :, :Dk] = a["k"]
    v = np.zeros((PAD_B, NK, Hkv, PAD_D), np.float32)
    v[:B, :n, :, :Dv] = a["v"]
    mask = np.full((PAD_B, H, PAD_NQ, NK), -np.inf, np.float32)
    m = np.zeros((B, 1, n_q, n), np.float32) if a["mask"] is None else a["mask"]
    mask[:B, :, :n_q, :n] = m
    mask[:B, :, n_q:, :n] = m[:, :, -1:, :]
    sinks = np.full((H,), -np.inf, np.float32) if a["sinks"] is None else a["sinks"]
    valid = np.zeros((PAD_B, PAD_NQ, 1, PAD_D), np.float32)
    valid[:B, :n_q, :, :Dv] = 1.0
    return dict(q=q, k=k, v=v, mask=mask, sinks=sinks, scale=np.float32(a["scale"]),
                softcap=np.float32(a["softcap"]), max_bias=np.float32(a["max_bias"]), valid=valid)


def menu_values(rng, shape, dist):
    """float32 [shape] for the live-ggml case menus (normal; outlier: jaxkv.outliers.MENU, 1/16 of the
    channels x30; uniform; big: x40)."""
    x = rng.standard_normal(shape)
    if dist == "outlier":
        x = outliers.MENU.apply(rng, x)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif dist == "big":
        x = x * 40.0
    return x.astype(np.float32)


def menu_mask(rng, kind, param, B, Hm, n_q, n_kv):
    """Additive mask [B, Hm, n_q, n_kv]: a finite bias in [-2, 0) (ALiBi multiplies it), -inf on the
    keys fuzz.cases.masked_keys hides ('fullrow': its 'full_rows'), rounded to F16; None for 'none'."""
    if kind == "none":
        return None
    shape = (B, Hm, n_q, n_kv)
    m = rng.uniform(-2, 0, shape).astype(np.float32)
    dead = masked_keys(rng, "full_rows" if kind == "fullrow" else kind, param, shape, key_rate=param / 64.0,
                       row_rate=0.3)
    return np.where(dead, -np.inf, m).astype(np.float16).astype(np.float32)


def menu_arrays(c) -> dict:
    """Menu case (fuzz.strategies.draw_menu_case) -> dict(q, k, v (float32; stored by the target in
    k_fmt/v_fmt), mask, sinks, scale, softcap, max_bias, n_threads) for the canonical target signature:
    q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask [B|1, H|1, n_q, n_kv], sinks [H]."""
    B, n_q, H, Hkv, Dk, Dv, n = MENU_BUCKETS[c["bucket"]]
    rng = np.random.default_rng(int(c["seed"]))
    has_mask, per_head, _, _, sinks = FLAGSETS[c["flags"]]
    q = menu_values(rng, (B, n_q, H, Dk), c["dist"])
    k = menu_values(rng, (B, n, Hkv, Dk), c["dist"])
    v = menu_values(rng, (B, n, Hkv, Dv), "normal")
    mask = menu_mask(rng, c["mask"], int(c["mask_param"]), B if per_head else 1, H if per_head else 1, n_q, n)
    takes = ops.by_target(c["op"], "op").takes("sinks")
    s = (rng.standard_normal(H) * 2).astype(np.float32) if sinks and takes else None
    return dict(q=q, k=k, v=v, mask=mask, sinks=s, scale=c["scale"], softcap=c["softcap"],
                max_bias=c["max_bias"], n_threads=int(c["threads"]))
