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

from hypothesis import strategies as st

__all__ = [
    "menu_strategy",
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
FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "iq4_nl")
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

