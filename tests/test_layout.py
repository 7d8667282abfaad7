"""jaxkv.layout: named role remappings, ggml view descriptors and their algebra, resolve / store.

Expected values come from numpy's own stride machinery (``as_strided``, ``transpose``, slicing) or from
the ggml semantics written out index by index here, never from the code under test.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxkv import formats
from jaxkv import layout as L

# ----------------------------------------------------------------------------------------------------
# roles


def _elementwise_ggml(role, x):
    """The ggml array of ``role`` built element by element from the ne tables in trace-format.md."""
    B, A1, A2, D = x.shape
    if role in ("q", "k", "v", "k_cold", "v_cold", "k_hot", "v_hot"):  # canonical [B,n,heads,D]
        g = np.empty((B, A2, A1, D), x.dtype)                          # ne [D,n,heads,B]
        for b, n, h in itertools.product(range(B), range(A1), range(A2)):
            g[b, h, n, :] = x[b, n, h, :]
        return g
    if role == "v_t":                                                  # ne [n_kv,Dv,Hkv,B]
        g = np.empty((B, A2, D, A1), x.dtype)
        for b, n, h, d in itertools.product(range(B), range(A1), range(A2), range(D)):
            g[b, h, d, n] = x[b, n, h, d]
        return g
    if role in ("out", "mask"):  # out canonical [B,n_q,H,Dv] = ne [Dv,H,n_q,B]; mask [B,H,n_q,n_kv]
        return x.copy()
    raise AssertionError(role)


ROLES4 = [r for r in L.ROLES if r != "sinks"]


@pytest.mark.parametrize("role", ROLES4)
def test_role_matches_ne_table(role):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(L.canonical_to_ggml(role, x), _elementwise_ggml(role, x))


@given(role=st.sampled_from(L.ROLES), shape=st.tuples(*[st.integers(1, 4)] * 4), use_jax=st.booleans())
def test_role_round_trip(role, shape, use_jax):
    x = np.random.default_rng(0).standard_normal(shape[:1] if role == "sinks" else shape).astype(np.float32)
    xx = jnp.asarray(x) if use_jax else x
    g = L.canonical_to_ggml(role, xx)
    assert isinstance(g, type(xx))
    back = L.ggml_to_canonical(role, g)
    np.testing.assert_array_equal(np.asarray(back), x)
    # and the other way round, from a ggml array
    np.testing.assert_array_equal(np.asarray(L.canonical_to_ggml(role, L.ggml_to_canonical(role, g))),
                                  np.asarray(g))


def test_mask_padding_pair():
    m = np.random.default_rng(1).standard_normal((1, 2, 3, 10)).astype(np.float32)
    g = L.canonical_to_ggml("mask", m, pad_to=8)
    assert g.shape == (1, 2, 8, 10)
    assert np.all(g[:, :, 3:] == -np.inf)
    np.testing.assert_array_equal(L.ggml_to_canonical("mask", g, n_q=3), m)
    gj = L.canonical_to_ggml("mask", jnp.asarray(m), pad_to=8, fill=0.0)
    np.testing.assert_array_equal(np.asarray(gj)[:, :, 3:], 0.0)
    with pytest.raises(ValueError, match="pad_to"):
        L.canonical_to_ggml("mask", m, pad_to=2)
    with pytest.raises(ValueError, match="pad_to"):
        L.canonical_to_ggml("q", m, pad_to=8)
    with pytest.raises(ValueError, match="n_q"):
        L.ggml_to_canonical("mask", g, n_q=9)


def test_role_dropped_trailing_dims_and_quant():
    # gguf drops trailing ne of 1: ne [D, n_kv, Hkv] comes back as numpy [Hkv, n_kv, D]
    k = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    c = L.ggml_to_canonical("k", k)
    assert c.shape == (1, 5, 2, 64)
    np.testing.assert_array_equal(c[0, 3, 1], k[1, 3])
    qa = formats.QuantArray.from_float(np.random.default_rng(3).standard_normal((1, 5, 2, 64)), "q4_0")
    g = L.canonical_to_ggml("k", qa)
    assert isinstance(g, formats.QuantArray) and g.shape == (1, 2, 5, 64)
    np.testing.assert_array_equal(np.asarray(g.raw[0, 1, 3]), np.asarray(qa.raw[0, 3, 1]))
    back = L.ggml_to_canonical("k", g)
    np.testing.assert_array_equal(np.asarray(back.raw), np.asarray(qa.raw))
    with pytest.raises(ValueError, match="v_t"):
        L.canonical_to_ggml("v_t", qa)
    with pytest.raises(ValueError, match="role"):
        L.canonical_to_ggml("kq", k)


# ----------------------------------------------------------------------------------------------------
# views

FLOAT_TYPES = list(formats.FLOAT_KV_TYPES)  # f32, f16
QUANT_TYPES = list(formats.BLOCK_KV_TYPES)  # q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl


@st.composite
def strided_views(draw, types=tuple(FLOAT_TYPES + QUANT_TYPES), max_ne=5):
    """A non-overlapping view: ne[0] along blocks, other axes in a random stride order with random gaps."""
    t = draw(st.sampled_from(types))
    f = formats.get_format(t)
    ne = [f.block_size * draw(st.integers(1, 3)) if f.quantized else draw(st.integers(1, max_ne))]
    ne += [draw(st.integers(1, max_ne)) for _ in range(3)]
    row = ne[0] // f.block_size * f.block_bytes
    order = draw(st.permutations([1, 2, 3]))
    nb = [f.block_bytes, 0, 0, 0]
    span = row
    for ax in order:
        gap = draw(st.integers(0, 2)) * f.block_bytes
        nb[ax] = span + gap
        span = nb[ax] * ne[ax]
    offset = draw(st.integers(0, 3)) * f.block_bytes
    return L.View(t, tuple(ne), tuple(nb), offset), offset + span + draw(st.integers(0, 8))


def _values(view, rng):
    x = rng.standard_normal(view.shape).astype(np.float32)
    if view.type == "f16":
        return x.astype(np.float16)
    return x


@given(vb=strided_views(), seed=st.integers(0, 2**16))
def test_resolve_store_round_trip(vb, seed):
    view, size = vb
    rng = np.random.default_rng(seed)
    filler = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    f = formats.get_format(view.type)
    if f.quantized:
        # raw rows are stored and read back byte for byte; values dequantize as formats says
        raw = rng.integers(0, 256, view.shape[:3] + (view.ne[0] // f.block_size * f.block_bytes,),
                           dtype=np.uint8)
        raw[..., 0::f.block_bytes] = 0  # keep the F16 scales finite: low byte of d
        raw[..., 1::f.block_bytes] = 0x30
        buf = L.store(raw, view.type, view.ne, view.nb, view.offset, buffer=filler)
        np.testing.assert_array_equal(L.resolve_raw(buf, view), raw)
        np.testing.assert_array_equal(L.resolve(buf, view), np.asarray(formats.dequantize(raw, view.type)))
    else:
        x = _values(view, rng)
        buf = L.store(x, view.type, view.ne, view.nb, view.offset, buffer=filler)
        assert len(buf) == size
        np.testing.assert_array_equal(L.resolve(buf, view), x)
    # bytes outside the view are untouched
    touched = np.zeros(size, bool)
    f_bytes = f.block_bytes
    for i3, i2, i1, ib in itertools.product(*[range(n) for n in view.shape[:3]],
                                            range(view.ne[0] // f.block_size)):
        o = view.offset + i3 * view.nb[3] + i2 * view.nb[2] + i1 * view.nb[1] + ib * view.nb[0]
        touched[o:o + f_bytes] = True
    b = np.frombuffer(buf, np.uint8)
    np.testing.assert_array_equal(b[~touched], np.frombuffer(filler, np.uint8)[~touched])


@given(vb=strided_views(types=("f32", "f16")), seed=st.integers(0, 2**16))
def test_resolve_equals_as_strided(vb, seed):
    view, size = vb
    raw = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    dt = {"f32": np.float32, "f16": np.float16}[view.type]
    # numpy's own reading of the same bytes: reinterpret an aligned copy from the offset
    item = np.dtype(dt).itemsize
    start = raw[view.offset:]
    n_items = start.size // item
    base = start[:n_items * item].copy().view(dt)
    want = np.lib.stride_tricks.as_strided(base, shape=view.shape, strides=view.nb[::-1])
    got = L.resolve(raw.tobytes(), view)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _np_axes_for_permute(axes):
    """numpy transpose equivalent to ggml_permute(axes): ggml axis i moves to axes[i]; numpy axis of
    ggml axis j is 3 - j."""
    out = [0] * 4
    for i, a in enumerate(axes):
        out[3 - a] = 3 - i
    return tuple(out)


@given(vb=strided_views(types=("f32", "f16")), axes=st.permutations(range(4)), seed=st.integers(0, 99))
def test_permute_matches_numpy_transpose(vb, axes, seed):
    view, size = vb
    buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    base = L.resolve(buf, view)
    p = L.permute(view, *axes)
    want = base.transpose(_np_axes_for_permute(axes))
    got = L.resolve(buf, p)
    assert got.shape == want.shape
    np.testing.assert_array_equal(_bits(got), _bits(want))  # bitwise: random bytes include NaNs
    np.testing.assert_array_equal(_bits(L.resolve(buf, L.transpose(view))), _bits(np.swapaxes(base, 2, 3)))


@given(vb=strided_views(types=("q4_0", "q8_0")), axes=st.permutations(range(1, 4)), seed=st.integers(0, 99))
def test_permute_quantized_keeps_rows(vb, axes, seed):
    # permutations that keep axis 0 (the block row) resolve for block formats
    view, size = vb
    buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    buf[:] = np.where(np.arange(size) % 2 == 1, 0x30, buf)  # finite F16 scales wherever they land
    axes = (0,) + tuple(axes)
    base = L.resolve(buf.tobytes(), view)
    got = L.resolve(buf.tobytes(), L.permute(view, *axes))
    np.testing.assert_array_equal(got, base.transpose(_np_axes_for_permute(axes)))


@given(vb=strided_views(types=("f32",)), p1=st.permutations(range(4)), p2=st.permutations(range(4)))
def test_permutations_compose(vb, p1, p2):
    view, _ = vb
    composed = tuple(p2[p1[i]] for i in range(4))
    assert L.permute(L.permute(view, *p1), *p2) == L.permute(view, *composed)


def test_llama_cache_view_3d():
    # llama.cpp: K cache [D*Hkv, kv_size] read as [D, n_kv, Hkv] with nb1 = row(D*Hkv), nb2 = row(D)
    D, Hkv, kv_size, n_kv = 8, 3, 10, 6
    rng = np.random.default_rng(4)
    cache = rng.standard_normal((kv_size, Hkv * D)).astype(np.float16)
    cache[n_kv:] = np.nan
    whole = L.View.contiguous("f16", (D * Hkv, kv_size))
    v = L.view_3d(whole, D, n_kv, Hkv, 2 * D * Hkv, 2 * D, 0)
    got = L.resolve(cache.tobytes(), v)                       # [Hkv, n_kv, D]
    want = cache.reshape(kv_size, Hkv, D)[:n_kv].transpose(1, 0, 2)
    np.testing.assert_array_equal(got[0], want)
    assert not np.isnan(got).any()
    # quantized: same algebra over block rows
    qcache = np.asarray(formats.quantize(rng.standard_normal((kv_size, Hkv * 32)), "q4_0"))
    qv = L.view_3d(L.View.contiguous("q4_0", (32 * Hkv, kv_size)), 32, n_kv, Hkv,
                   formats.row_bytes("q4_0", 32 * Hkv), formats.row_bytes("q4_0", 32), 0)
    deq = np.asarray(formats.dequantize(qcache, "q4_0")).reshape(kv_size, Hkv, 32)
    np.testing.assert_array_equal(L.resolve(qcache.tobytes(), qv)[0], deq[:n_kv].transpose(1, 0, 2))


def test_view_1d_2d_4d_offsets():
    x = np.arange(60, dtype=np.float32)
    buf = x.tobytes()
    base = L.View.contiguous("f32", (60,))
    np.testing.assert_array_equal(L.resolve(buf, L.view_1d(base, 7, 4 * 5))[0, 0, 0], x[5:12])
    v2 = L.view_2d(base, 3, 4, 4 * 10, 4 * 2)
    np.testing.assert_array_equal(L.resolve(buf, v2)[0, 0], x[2:].reshape(-1)[:40].reshape(4, 10)[:, :3])
    v4 = L.view_4d(base, 2, 2, 2, 2, 4 * 3, 4 * 7, 4 * 20, 0)
    want = np.array([[[[x[i3 * 20 + i2 * 7 + i1 * 3 + i0] for i0 in range(2)] for i1 in range(2)]
                      for i2 in range(2)] for i3 in range(2)])
    np.testing.assert_array_equal(L.resolve(buf, v4), want)
    # a view of a view adds offsets, as ggml's view_src chain does
    np.testing.assert_array_equal(L.resolve(buf, L.view_1d(L.view_1d(base, 20, 4 * 10), 3, 4 * 2))[0, 0, 0],
                                  x[12:15])


def test_contiguity_reshape_cont_repeat():
    v = L.View.contiguous("f16", (4, 3, 2))
    assert L.is_contiguous(v) and not L.is_contiguous(L.transpose(v))
    assert L.is_contiguous(L.permute(L.View.contiguous("f16", (4, 1, 2)), 0, 2, 1, 3))  # size-1 axes free
    r = L.reshape(v, 12, 2)
    assert r.ne == (12, 2, 1, 1) and r.nb == (2, 24, 48, 48)
    with pytest.raises(ValueError, match="contiguous"):
        L.reshape(L.transpose(v), 12, 2)
    with pytest.raises(ValueError, match="ne"):
        L.reshape(v, 5, 5)
    x = np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float16)
    t = L.transpose(v)
    c = L.cont(t)
    assert L.is_contiguous(c) and c.ne == t.ne
    buf = x.tobytes()
    np.testing.assert_array_equal(L.resolve(L.resolve_raw(buf, t).tobytes(), c), L.resolve(buf, t))
    assert L.can_repeat((4, 1, 1, 1), (4, 5, 8, 1)) and not L.can_repeat((4, 3), (4, 5))
    m = np.arange(6, dtype=np.float32).reshape(1, 2, 3)              # ne [3, 2, 1]
    rep = L.repeat(m, (3, 2, 4))
    assert rep.shape == (1, 4, 2, 3)
    for h in range(4):
        np.testing.assert_array_equal(rep[0, h], m[0])
    kv = np.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4)
    e = L.gqa_expand(kv, 6)
    for h in range(6):
        np.testing.assert_array_equal(e[:, :, h], kv[:, :, h // 3])


@pytest.mark.parametrize("kwargs, field", [
    (dict(type="q4_0", ne=(48, 2, 1, 1), nb=(18, 36, 72, 72)), "ne[0]"),
    (dict(type="q4_0", ne=(32, 2, 1, 1), nb=(18, 20, 40, 40)), "nb[1]"),
    (dict(type="q8_0", ne=(32, 2, 1, 1), nb=(34, 34, 68, 68), offset=5), "offset"),
    (dict(type="f16", ne=(-1, 2, 1, 1), nb=(2, 2, 4, 4)), "ne[0]"),
    (dict(type="f16", ne=(2, 2, 1, 1), nb=(2, -4, 4, 4)), "nb[1]"),
    (dict(type="f16", ne=(2, 2, 1, 1), nb=(2, 4, 8, 8), offset=-2), "offset"),
    (dict(type="q3_k", ne=(2, 2, 1, 1), nb=(2, 4, 8, 8)), "q3_k"),
])
def test_invalid_views_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        L.View(**kwargs)


def test_out_of_bounds_and_bad_quant_stride():
    v = L.View.contiguous("f32", (4, 4))
    with pytest.raises(ValueError, match="past the buffer"):
        L.resolve(bytes(63), v)
    L.resolve(bytes(64), v)
    bad = L.View("q8_0", (64, 1, 1, 1), (40, 80, 80, 80))
    with pytest.raises(ValueError, match=r"nb\[0\]"):
        L.resolve(bytes(200), bad)
    with pytest.raises(ValueError, match="overlaps"):
        L.store(np.zeros((1, 1, 2, 4), np.float32), "f32", (4, 2), (4, 8))
