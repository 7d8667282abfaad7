"""Hypothesis strategies for fuzz cases.

A *case* is a small JSON-ready dict of parameters (shapes, formats, distributions, mask kind, seeds);
:mod:`fuzz.cases` turns it into arrays deterministically (numpy ``default_rng(seed)``). Drawing
parameters instead of array elements keeps generation cheap and lets hypothesis shrink what matters
(shapes, distribution kinds, mask kinds, seeds -> 0) while the record of a case stays a few hundred
bytes that replay exactly.

Shape menus are deliberately small: every (heads, KV bucket) pair is one compiled program per property
(see :mod:`fuzz.buckets`); the sizes inside a bucket (B, n_q, Dk, Dv, n_kv) vary freely and are padded.
"""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import strategies as st

from jaxkv import formats as F
from jaxkv import ops

__all__ = [
    "menu_strategy", "rng_drawer", "MENU_FORMATS", "MENU_BUCKETS", "MENU_MASKS", "MENU_DISTS", "FLAGSETS", "MENUS",
    "FLOAT_ONLY", "draw_menu_case", "menu_case_strategy",
    "HEADS", "KV_BUCKETS", "DISTS", "MASKS", "FLOAT_FORMATS", "QUANT_FORMATS", "ALL_FORMATS",
    "attention_case", "dist", "format_name", "raw_blocks_case", "values_case", "cache_case",
    "view_case", "merge_case",
]

#: (H, Hkv): MHA, MQA, GQA with a non-power-of-two head count (ALiBi's second slope series, G = 3).
HEADS = ((2, 2), (4, 1), (6, 2))
#: padded KV lengths (one program each) and the split-K chunk used in that bucket (ragged on purpose).
KV_BUCKETS = {64: 24}
#: padded B, n_q, Dk, Dv of every attention program
PAD_B, PAD_NQ, PAD_D = 2, 4, 64
#: value distributions (fuzz.cases.DISTRIBUTIONS)
DISTS = ("normal", "outlier", "big", "tiny", "constant", "uniform")
#: mask kinds (fuzz.cases.make_mask)
MASKS = ("none", "causal", "window", "random", "full_rows", "padded", "alibi")
#: the unquantized and the block-quantized formats, in jaxkv.formats.FORMATS' order
FLOAT_FORMATS = tuple(n for n, f in F.FORMATS.items() if not f.quantized)
QUANT_FORMATS = F.QUANT_TYPES
ALL_FORMATS = FLOAT_FORMATS + QUANT_FORMATS

_SEED = st.integers(0, 2**31 - 1)


def dist(choices=DISTS) -> st.SearchStrategy:
    """A value distribution name (shrinks to 'normal')."""
    return st.sampled_from(choices)


def format_name(choices=ALL_FORMATS) -> st.SearchStrategy:
    return st.sampled_from(choices)


_FLOAT_SCALE = st.one_of(st.just("rsqrt"), st.floats(0.001953125, 4.0, width=32))
_SOFTCAP = st.one_of(st.just(0.0), st.floats(1.0, 50.0, width=32))
_MAX_BIAS = st.one_of(st.just(0.0), st.floats(0.5, 16.0, width=32))


@functools.lru_cache(maxsize=None)
def attention_case(*, heads=HEADS, buckets=tuple(KV_BUCKETS), masks=MASKS, dists=DISTS,
                   formats=FLOAT_FORMATS, nan_unused=False, sinks=True, softcap=True, alibi=True):
    """Parameters of one attention call: heads (H, Hkv), B, n_q, Dk, Dv, n_kv (<= the drawn KV bucket),
    K and V storage formats (independent), value distributions of q/k/v, mask kind and its parameter,
    scale, softcap, max_bias (ALiBi), sinks, seed. ``nan_unused``: keys masked for every row hold NaN.
    (Sub-strategies are built once per argument set: hypothesis draws faster from reused strategies.)"""
    s_heads, s_bucket = st.sampled_from(heads), st.sampled_from(buckets)
    s_b, s_nq, s_d = st.integers(1, PAD_B), st.integers(1, PAD_NQ), st.integers(1, PAD_D)
    s_n = {b: st.integers(1, b) for b in buckets}
    s_fmt, s_dist, s_mask = st.sampled_from(formats), st.sampled_from(dists), st.sampled_from(masks)
    s_param, s_bool = st.integers(1, 64), st.booleans()

    @st.composite
    def case(draw):
        H, Hkv = draw(s_heads)
        bucket = draw(s_bucket)
        return dict(
            heads=[H, Hkv], bucket=bucket, B=draw(s_b), n_q=draw(s_nq), Dk=draw(s_d), Dv=draw(s_d),
            n_kv=draw(s_n[bucket]), k_fmt=draw(s_fmt), v_fmt=draw(s_fmt),
            q_dist=draw(s_dist), k_dist=draw(s_dist), v_dist=draw(s_dist),
            mask=draw(s_mask), mask_param=draw(s_param), mask_heads=draw(s_bool),
            scale=draw(_FLOAT_SCALE),
            softcap=draw(_SOFTCAP) if softcap else 0.0,
            max_bias=draw(_MAX_BIAS) if alibi else 0.0,
            sinks=draw(s_bool) if sinks else False,
            nan_unused=nan_unused,
            seed=draw(_SEED),
        )
    return case()


@st.composite
def merge_case(draw):
    """An attention case plus two cut points splitting its KV axis into three (possibly empty) parts."""
    c = draw(attention_case(masks=("none", "random", "full_rows", "padded"), buckets=(64,)))
    a = draw(st.integers(0, c["n_kv"]))
    b = draw(st.integers(a, c["n_kv"]))
    c["cuts"] = [a, b]
    return c


@st.composite
def raw_blocks_case(draw, formats=ALL_FORMATS):
    """Random ggml blocks: format, number of rows (1..8) and blocks per row (1..8), byte seed, and
    whether the scale fields are forced finite (``sane``: random F16 scales are often inf/NaN)."""
    return dict(fmt=draw(st.sampled_from(formats)), rows=draw(st.integers(1, 8)),
                blocks=draw(st.integers(1, 8)), sane=draw(st.booleans()), seed=draw(_SEED))


@st.composite
def values_case(draw, formats=ALL_FORMATS, dists=DISTS):
    """Float32 values to quantize: format, rows (1..8), blocks per row (1..8), distribution, seed."""
    return dict(fmt=draw(st.sampled_from(formats)), rows=draw(st.integers(1, 8)),
                blocks=draw(st.integers(1, 8)), dist=draw(st.sampled_from(dists)), seed=draw(_SEED))


@st.composite
def cache_case(draw, formats=QUANT_FORMATS + ("f16",)):
    """A mixed cache (K and V cold formats independent, hot window W, head config) filled by a sequence
    of appends of ``steps`` token counts, then one decode query."""
    H, Hkv = draw(st.sampled_from(((2, 2), (4, 1))))
    W = draw(st.sampled_from((4, 16)))
    steps = draw(st.lists(st.integers(0, 24), min_size=1, max_size=5))
    return dict(k_fmt=draw(st.sampled_from(formats)), v_fmt=draw(st.sampled_from(formats)),
                heads=[H, Hkv], W=W, steps=steps, dist=draw(st.sampled_from(DISTS)),
                n_q=draw(st.integers(1, 2)), mask=draw(st.sampled_from(("none", "random", "causal"))),
                mask_param=draw(st.integers(1, 64)), sinks=draw(st.booleans()), seed=draw(_SEED))


@st.composite
def view_case(draw):
    """A ggml view of a canonical tensor inside a larger buffer: logical shape (4 dims, fastest first),
    a permutation of the storage order, padding per axis (strides larger than dense), a byte offset in
    elements, element type, seed."""
    ne = [draw(st.integers(1, 6)) for _ in range(4)]
    return dict(ne=ne, perm=draw(st.permutations(range(4))), pad=[draw(st.integers(0, 3)) for _ in range(4)],
                offset=draw(st.integers(0, 40)), dtype=draw(st.sampled_from(("f32", "f16"))),
                seed=draw(_SEED))


def menu_strategy(draw_case):
    """A hypothesis strategy of the cases ``draw_case(draw)`` builds from a case menu, where
    ``draw(spec)`` picks: ``('int', lo, hi)`` an int in [lo, hi], ``('float', lo, hi)`` a float,
    ``('p', x)`` True with probability x, any other sequence one of its elements (the menu code is
    shared with numpy-driven campaigns, which pass their own ``draw``)."""
    @st.composite
    def case(d):
        def draw(spec):
            if isinstance(spec, tuple) and spec and spec[0] == "int":
                return d(st.integers(spec[1], spec[2]))
            if isinstance(spec, tuple) and spec and spec[0] == "float":
                return d(st.floats(spec[1], spec[2]))
            if isinstance(spec, tuple) and spec and spec[0] == "p":
                return d(st.floats(0.0, 1.0)) < spec[1]
            return d(st.sampled_from(spec))
        return draw_case(draw)
    return case()



def rng_drawer(rng):
    """A ``draw`` for the menu code (:func:`draw_menu_case`, fuzz.ggml_targets.draw_case) from a numpy
    Generator (the same specs :func:`menu_strategy` understands)."""
    def draw(spec):
        if isinstance(spec, tuple) and spec and spec[0] == "int":
            return int(rng.integers(spec[1], spec[2] + 1))
        if isinstance(spec, tuple) and spec and spec[0] == "float":
            return float(rng.uniform(spec[1], spec[2]))
        if isinstance(spec, tuple) and spec and spec[0] == "p":
            return bool(rng.random() < spec[1])
        return spec[int(rng.integers(len(spec)))]
    return draw


# ----------------------------------------------------------------------------------------------------
# the live-ggml case menus (``python -m fuzz --target ggml --menu ci|full|tiled``)
#
# A menu case is a JSON-ready dict: ``op`` (the live-ggml target its op names: 'ggml', 'ggml-unfused',
# 'ggml-mixed'), ``bucket`` (a fixed shape: MENU_BUCKETS), ``k_fmt``/``v_fmt`` (ggml type names, K and V
# independent), ``flags`` (which optional operands exist: FLAGSETS), ``mask`` kind, ``mask_param``,
# ``softcap``, ``max_bias``, ``threads`` (1..4), ``scale``, value ``dist`` and ``seed``. Shapes are
# bucketed so the model compiles a few programs; values, masks and parameters vary freely.

#: the K/V storage types of the menus in ggml's spelling: the floats (alphabetical), then the block
#: types in jaxkv.formats.KV_TYPES' order
MENU_FORMATS = tuple(F.ggml_name(t) for t in sorted(set(F.KV_TYPES) - set(F.BLOCK_KV_TYPES))) + tuple(
    F.ggml_name(t) for t in F.BLOCK_KV_TYPES)
_MENU_FLOATS = MENU_FORMATS[:2]
_MENU_BLOCK = MENU_FORMATS[2:]
#: name -> (B, n_q, H, Hkv, Dk, Dv, n_kv); 'split' is ggml's split-KV path (n_q = B = 1, n_kv >= 512)
MENU_BUCKETS = {
    "row": (2, 3, 4, 2, 64, 64, 96),
    "gqa3": (1, 2, 6, 2, 64, 32, 64),     # G = 3, H = 6: ALiBi's second slope series, Dk != Dv
    "split": (1, 1, 4, 2, 64, 64, 640),
    "split_d80": (1, 1, 8, 1, 80, 80, 530),   # split-KV with a SIMD leftover head size, G = 8
    "tiled": (1, 64, 4, 2, 64, 64, 100),      # n_q >= 64: the tiled path for same-type F16/F32 K/V
    "tiled_d40": (1, 96, 4, 1, 40, 40, 70),   # tiled (or, where Dv % lanes != 0, per-row) with G = 4
    "d60": (1, 3, 4, 2, 60, 60, 33),          # leftover head sizes: F16/F32 only (blocks need 32s)
    "d112": (2, 2, 4, 4, 112, 112, 50),
    "gqa32": (1, 1, 32, 1, 128, 128, 72),     # G = 32
    "tiled_n256": (1, 256, 2, 1, 80, 80, 300),  # four query tiles, five key tiles (the last ragged)
}
#: buckets whose head sizes are no multiple of 32 (F16/F32 K/V only)
FLOAT_ONLY = ("split_d80", "tiled_d40", "d60", "d112")
MENU_MASKS = ("none", "causal", "window", "random", "fullrow")
MENU_DISTS = ("normal", "outlier", "uniform", "big")
#: flag sets: (mask present, per-head mask, softcap, alibi, sinks)
FLAGSETS = {
    "plain": (False, False, False, False, False),
    "mask": (True, False, False, False, False),
    "all": (True, True, True, True, True),
    "alibi_sinks": (True, True, False, True, True),
    "softcap_sinks": (True, False, True, False, True),
    "alibi": (True, True, False, True, False),
}
#: the kinds of case a menu draws: the live-ggml targets (ggml twice: the per-row path), and two
#: flash_attn_ext shape kinds: 'split' (the split-KV buckets, F16/F32) and 'float_kv' (F16/F32 K/V: the
#: tiled path, leftover head sizes, GQA 32)
_FA = ops.get("flash_attn_ext")
_KINDS = (_FA.target, _FA.target, "split") + tuple(o.target for o in ops.OPS.values() if o.target and o is not _FA)
#: menus of what a case may draw: 'ci' keeps the number of distinct compiled model programs small
MENUS = {
    "ci": dict(
        pairs=F.selection(
            "ci: every K/V type at least once in 8 pairs (few compiled model programs): the floats and the "
            "two common llama.cpp cache types same-typed, the other block types paired with each other, "
            "a float K with block V and a block K with float V",
            (("F16", "F16"), ("F32", "F32"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_1", "Q5_0"),
             ("Q5_1", "IQ4_NL"), ("F16", "Q8_0"), ("IQ4_NL", "F32"))),
        mixed_pairs=F.selection("ci: the mixed cache's cold region with one block type for K and V, and "
                                "with two different ones", (("Q4_0", "Q4_0"), ("Q8_0", "Q5_1"))),
        unfused_k=F.selection("ci: the unfused path's K as a float, an 8-bit block and a codebook type",
                              ("F16", "Q8_0", "IQ4_NL")),
        flagsets=("plain", "all", "alibi_sinks"),
        split_flagsets=("all",),
        buckets=("row",),
        split_buckets=("split",),
        float_buckets=(),
    ),
    "full": dict(
        pairs=tuple((a, b) for a in MENU_FORMATS for b in MENU_FORMATS),
        mixed_pairs=tuple((a, b) for a in _MENU_BLOCK for b in _MENU_BLOCK),
        unfused_k=MENU_FORMATS,
        flagsets=tuple(FLAGSETS),
        split_flagsets=tuple(FLAGSETS),
        buckets=("row", "gqa3", "tiled", "gqa32"),
        split_buckets=("split", "split_d80"),
        float_buckets=("tiled", "tiled_d40", "d60", "d112", "gqa32"),
    ),
    # the tiled path only (F16/F32 K/V, n_q >= 64) and the mixed cache on it
    "tiled": dict(
        kinds=("float_kv", "float_kv", ops.get("mixed_flash_attn").target),
        pairs=(), mixed_pairs=tuple((a, b) for a in _MENU_BLOCK for b in _MENU_BLOCK), unfused_k=(),
        flagsets=tuple(FLAGSETS), split_flagsets=(), buckets=("tiled",), split_buckets=(),
        float_buckets=("tiled", "tiled_d40", "tiled_n256"),
    ),
}


def draw_menu_case(draw, menu="ci") -> dict:
    """One menu case (see above); ``draw(choices)`` picks one element of a sequence, ``draw(('int', lo,
    hi))`` an int, ``draw(('float', lo, hi))`` a float (so the same code serves numpy RNGs and
    hypothesis). What an op takes decides its K/V menu and flags: an op whose V is read transposed
    (V floats only: ggml's unfused path) draws ``unfused_k``; an op with an F16 KV cache (``kv_f16``:
    the mixed cache) ``mixed_pairs``; softcap and sinks only where the op takes them."""
    m = MENUS[menu]
    kind = draw(m.get("kinds") or _KINDS + (("float_kv", "float_kv") if m["float_buckets"] else ()))
    if kind == "split":
        op, bucket = _FA, draw(m["split_buckets"])
        kf = vf = draw(_MENU_FLOATS)
        flags = draw(m["split_flagsets"])
    elif kind == "float_kv":  # F16/F32 K/V: the tiled path, leftover head sizes, GQA 32
        op, bucket = _FA, draw(m["float_buckets"])
        kf = draw(_MENU_FLOATS)
        vf = kf if draw((True, True, False)) else draw(_MENU_FLOATS)
        flags = draw(m["flagsets"])
    else:
        op = ops.by_target(kind)
        bucket = draw(m["buckets"])
        if set(op.roles.get("v", F.BLOCK_KV_TYPES)) <= set(F.KV_TYPES) - set(F.BLOCK_KV_TYPES):
            kf, vf = draw(m["unfused_k"]), draw(_MENU_FLOATS)
        elif op.kv_f16:
            kf, vf = draw(m["mixed_pairs"])
        else:
            kf, vf = draw(m["pairs"])
        flags = draw(m["flagsets"])
    has_mask, _, softcap, alibi, sinks = FLAGSETS[flags]
    if (softcap and not op.takes("softcap")) or (sinks and not op.takes("sinks")):
        flags = "alibi" if alibi else "mask"  # e.g. soft_max_ext has no softcap and no sinks
    return dict(
        op=op.target, bucket=bucket, k_fmt=kf, v_fmt=vf, flags=flags,
        mask=draw(MENU_MASKS[1:]) if has_mask else "none", mask_param=draw(("int", 1, 48)),
        softcap=float(np.float32(draw(("float", 1.0, 50.0)))) if softcap and op.takes("softcap") else 0.0,
        max_bias=float(np.float32(draw(("float", 0.5, 12.0)))) if alibi else 0.0,
        threads=draw(("int", 1, 4)),
        scale=float(np.float32(draw(("float", 0.02, 0.5)))),
        dist=draw(MENU_DISTS), seed=draw(("int", 0, 2**31 - 1)),
    )


def menu_case_strategy(menu="ci"):
    """A hypothesis strategy of menu cases (:func:`draw_menu_case`)."""
    return menu_strategy(lambda draw: draw_menu_case(draw, menu))
