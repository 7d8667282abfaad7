"""Tests of jaxkv.attention: reference vs an independent numpy loop, split-K / online forms vs the
reference, merge laws, GQA, masking edge cases, large logits, ALiBi, gradients, ggml traces.

Tolerance conventions: errors are max-abs over the output, relative to the output scale
``max|v|`` (every output row is a convex combination of V rows, plus zero weight for the sink).
"""

import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conftest
from jaxkv import attention as A

# f64 vs f64 with a different summation order: each output is a sum of at most n_kv products of
# O(1) terms, so rounding differences are <= ~n_kv * 2^-53 * max|v| ~ 1e-13 for n_kv <= 300; 1e-12
# leaves an order of magnitude.
F64_TOL = 1e-12

# A few shape buckets (B, n_q, H, Hkv, Dk, Dv, n_kv) so hypothesis reuses compiled programs.
BUCKETS = [
    (1, 1, 8, 2, 128, 128, 67),
    (2, 4, 4, 4, 32, 32, 33),
    (1, 8, 2, 1, 256, 64, 20),
    (2, 3, 8, 8, 64, 96, 45),
    (1, 2, 4, 1, 48, 48, 1),
]
# 1: one key per chunk; 7: ragged last chunk; 32: ragged or a single chunk (n_kv 20, 1)
CHUNKS = [1, 7, 32]
# hypothesis example counts: half of the profile's (each new static shape/chunk compiles)
_HALF = max(6, settings.default.max_examples // 2)
MASK_KINDS = ["none", "causal", "window", "random", "fullrow", "padded"]


def _np_reference(q, k, v, scale, mask, softcap, max_bias, sinks):
    """Independent float64 loop implementation of the semantics in trace-format.md."""
    B, n_q, H, _ = q.shape
    _, n_kv, hkv, _ = k.shape
    dv = v.shape[3]
    g = H // hkv
    n_log2 = 2 ** int(math.floor(math.log2(H)))
    out = np.zeros((B, n_q, H, dv))
    for b in range(B):
        for h in range(H):
            if max_bias > 0:
                m0 = 2.0 ** (-max_bias / n_log2)
                m1 = 2.0 ** (-max_bias / 2 / n_log2)
                slope = m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1)
            else:
                slope = 1.0
            for i in range(n_q):
                logits, rows = [], []
                for j in range(n_kv):
                    mv = 0.0 if mask is None else slope * mask[b % mask.shape[0], h % mask.shape[1], i, j]
                    if mv == -np.inf:
                        continue
                    s = scale * float(np.dot(q[b, i, h], k[b, j, h // g]))
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s + mv)
                    rows.append(v[b, j, h // g])
                if sinks is not None:
                    logits.append(float(sinks[h]))
                    rows.append(np.zeros(dv))
                if not logits:
                    continue
                m = max(logits)
                w = np.exp(np.array(logits) - m)
                out[b, i, h] = (w[:, None] * np.array(rows)).sum(0) / w.sum()
    return out


def _make_mask(rng, kind, B, H, n_q, n_kv, per_batch, per_head):
    mb, mh = (B if per_batch else 1), (H if per_head else 1)
    if kind == "none":
        return None
    pos_q = n_kv - n_q + np.arange(n_q)  # queries are the last n_q positions
    j = np.arange(n_kv)
    base = rng.uniform(-1, 1, (mb, mh, n_q, n_kv))
    if kind == "causal":
        dead = j[None, :] > pos_q[:, None]
    elif kind == "window":
        dead = (j[None, :] > pos_q[:, None]) | (j[None, :] < pos_q[:, None] - 7)
    elif kind == "random":
        dead = rng.random((mb, mh, n_q, n_kv)) < 0.3
    elif kind == "fullrow":
        dead = np.zeros((mb, mh, n_q, n_kv), bool)
        dead[..., 0, :] = True
    elif kind == "padded":  # trailing key columns masked for every query (padding of the KV axis)
        dead = np.broadcast_to(j >= max(1, n_kv - 5), (n_q, n_kv))
    else:
        raise AssertionError(kind)
    return np.where(np.broadcast_to(dead, base.shape), -np.inf, base)


@st.composite
def cases(draw):
    B, n_q, H, hkv, dk, dv, n_kv = draw(st.sampled_from(BUCKETS))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(MASK_KINDS))
    full = draw(st.booleans())  # mask [B, H, ...] or broadcast [1, 1, ...] (others: fixed tests)
    mask = _make_mask(rng, kind, B, H, n_q, n_kv, full, full)
    softcap = draw(st.sampled_from([0.0, 0.0, 1.5, 30.0]))
    max_bias = draw(st.sampled_from([0.0, 0.0, 8.0]))
    sinks = rng.standard_normal(H) * 2 if draw(st.booleans()) else None
    return dict(
        q=rng.standard_normal((B, n_q, H, dk)),
        k=rng.standard_normal((B, n_kv, hkv, dk)),
        v=rng.standard_normal((B, n_kv, hkv, dv)),
        scale=float(draw(st.sampled_from([1.0 / math.sqrt(dk), 0.5]))),
        mask=mask, softcap=softcap, max_bias=max_bias, sinks=sinks,
    )


def _err(a, b, v):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(1.0, float(np.max(np.abs(v))))


# ----------------------------------------------------------------------------------------------------
# the reference itself


@pytest.mark.parametrize("kind", ["none", "causal", "random", "fullrow"])
def test_reference_matches_numpy_loop(kind):
    rng = np.random.default_rng(7)
    B, n_q, H, hkv, d, n_kv = 2, 3, 4, 2, 16, 13
    q, k = rng.standard_normal((B, n_q, H, d)), rng.standard_normal((B, n_kv, hkv, d))
    v = rng.standard_normal((B, n_kv, hkv, 24))
    mask = _make_mask(rng, kind, B, H, n_q, n_kv, True, True)
    for softcap, max_bias, sinks in [(0.0, 0.0, None), (2.0, 8.0, rng.standard_normal(H))]:
        out = A.attention(q, k, v, scale=0.3, mask=mask, softcap=softcap, max_bias=max_bias,
                          sinks=sinks, precision="f64")
        assert out.dtype == jnp.float64 and out.shape == (B, n_q, H, 24)
        ref = _np_reference(q, k, v, 0.3, mask, softcap, max_bias, sinks)
        # alibi slopes are float32 in ggml (and in A) but float64 in the loop: relative 2^-24 on a
        # mask value of magnitude <= 1 changes a logit by <= 6e-8, the output by <= ~1e-7 * max|v|.
        tol = 1e-6 if max_bias else F64_TOL
        assert _err(out, ref, v) <= tol


def test_f32_policy_close_to_f64():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in [(1, 2, 4, 64), (1, 50, 2, 64), (1, 50, 2, 64)])
    o32 = A.attention(q, k, v, scale=0.125, precision="f32")
    o64 = A.attention(q, k, v, scale=0.125, precision="f64")
    assert o32.dtype == jnp.float32
    # f32 rounding: logits |s| <~ 3 carry ~D*2^-24*|s| error, exp and the 50-term sums add
    # ~50*2^-24 relative: 1e-5 * max|v| is a ~10x margin.
    assert _err(o32, o64, v) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# split-K and online forms equal the reference


@settings(max_examples=_HALF)
@given(case=cases(), chunk=st.sampled_from(CHUNKS))
def test_flash_decode_equals_attention(case, chunk):
    ref = A.attention(**case, precision="f64")
    out = A.flash_decode(**case, chunk=chunk, precision="f64")
    assert out.dtype == jnp.float64
    assert not np.isnan(np.asarray(out)).any()
    assert _err(out, ref, case["v"]) <= F64_TOL


@settings(max_examples=max(4, _HALF // 2), deadline=None)
@given(case=cases(), chunk=st.sampled_from(CHUNKS))
def test_split_k_scan_path_equals_attention(case, chunk):
    """flash_decode has two split-K schedules (two passes over the chunks when the logits are small,
    which every other test here hits, and a sequential scan of merges otherwise): force the scan."""
    core = jax.jit(A._flash_core.__wrapped__, static_argnames=("chunk", "precision"))  # fresh trace
    old = A.TWO_PASS_MAX_LOGITS
    A.TWO_PASS_MAX_LOGITS = 0
    try:
        mask = None if case["mask"] is None else jnp.asarray(case["mask"])
        slopes = A._slopes_arg(case["q"].shape[2], case["max_bias"], mask)
        sinks = None if case["sinks"] is None else jnp.asarray(case["sinks"])
        out = core(jnp.asarray(case["q"]), jnp.asarray(case["k"]), jnp.asarray(case["v"]), case["scale"],
                   mask, case["softcap"], slopes, sinks, chunk=chunk, precision="f64")
    finally:
        A.TWO_PASS_MAX_LOGITS = old
    ref = A.attention(**case, precision="f64")
    assert not np.isnan(np.asarray(out)).any()
    assert _err(out, ref, case["v"]) <= F64_TOL


@settings(max_examples=max(4, _HALF // 2))
@given(case=cases())
def test_online_attention_equals_attention(case):
    ref = A.attention(**case, precision="f64")
    out = A.online_attention(**case, precision="f64")
    assert _err(out, ref, case["v"]) <= F64_TOL


def test_partial_states_compose():
    rng = np.random.default_rng(11)
    B, n_q, H, hkv, d, n = 2, 2, 4, 2, 32, 30
    q, k, v = (rng.standard_normal(s) for s in [(B, n_q, H, d), (B, n, hkv, d), (B, n, hkv, d)])
    mask = _make_mask(rng, "random", B, H, n_q, n, True, True)
    sinks = rng.standard_normal(H)
    kw = dict(scale=0.2, softcap=5.0, max_bias=8.0, precision="f64")
    cuts = [0, 7, 7, 19, 30]  # includes an empty chunk
    st_ = A.empty_state(B, n_q, H, d, jnp.float64)
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = A.partial_state(q, k[:, a:b], v[:, a:b], mask=mask[..., a:b], **kw)
        assert part.m.shape == (B, n_q, H) and part.acc.shape == (B, n_q, H, d)
        st_ = A.merge(st_, part)
    ref = A.attention(q, k, v, mask=mask, sinks=sinks, **kw)
    assert _err(A.finalize(st_, sinks), ref, v) <= F64_TOL


# ----------------------------------------------------------------------------------------------------
# merge laws


def _random_states(seed):
    """Three states of disjoint key sets, one with some empty rows, plus an all-empty one."""
    rng = np.random.default_rng(seed)
    B, n_q, H, hkv, d = 1, 3, 4, 2, 16
    q = rng.standard_normal((B, n_q, H, d))
    out = []
    for n in (5, 9, 4):
        k, v = rng.standard_normal((B, n, hkv, d)), rng.standard_normal((B, n, hkv, d)) * 3
        mask = _make_mask(rng, "random", B, H, n_q, n, False, True)
        mask[0, 1, 0, :] = -np.inf  # an empty row
        out.append(A.partial_state(q, k, v, scale=0.7, mask=mask, precision="f64"))
    return out, A.empty_state(B, n_q, H, d, jnp.float64)


def _assert_state_close(x, y, rel):
    np.testing.assert_array_equal(np.asarray(x.m), np.asarray(y.m))  # max is exact
    for a, b in ((x.l, y.l), (x.acc, y.acc)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= rel * max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_laws(seed):
    (a, b, c), e = _random_states(seed)
    # associativity up to rounding: each merge rescales by exp of exact differences of maxima, a
    # few ulps per operation -> 1e-14 relative.
    _assert_state_close(A.merge(A.merge(a, b), c), A.merge(a, A.merge(b, c)), 1e-14)
    # commutativity: + and * are commutative in IEEE arithmetic, so exactly equal
    for x, y in zip(jax.tree.leaves(A.merge(a, b)), jax.tree.leaves(A.merge(b, a))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # identity, exact on both sides
    for s in (a, b, c):
        for x, y in zip(jax.tree.leaves(A.merge(s, e)), jax.tree.leaves(s)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(A.merge(e, s)), jax.tree.leaves(s)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ee = A.merge(e, e)
    assert np.all(np.asarray(ee.m) == -np.inf)
    assert np.all(np.asarray(ee.l) == 0) and np.all(np.asarray(ee.acc) == 0)
    out = np.asarray(A.finalize(ee))
    assert not np.isnan(out).any() and np.all(out == 0)


def test_state_is_pytree():
    (a, _, _), _ = _random_states(0)
    doubled = jax.tree.map(lambda x: x * 2, a)
    assert isinstance(doubled, A.State)
    merged = jax.jit(A.merge)(a, a)
    assert isinstance(merged, A.State)


# ----------------------------------------------------------------------------------------------------
# GQA, masking edge cases, large logits


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa_equals_repeated_heads(hkv):
    rng = np.random.default_rng(5)
    B, n_q, H, d, n = 2, 2, 4, 32, 21
    q, k, v = (rng.standard_normal(s) for s in [(B, n_q, H, d), (B, n, hkv, d), (B, n, hkv, d)])
    mask = _make_mask(rng, "random", B, H, n_q, n, True, True)
    kr, vr = np.repeat(k, H // hkv, axis=2), np.repeat(v, H // hkv, axis=2)  # head h -> h // G
    kw = dict(scale=0.3, mask=mask, softcap=3.0, max_bias=8.0, sinks=rng.standard_normal(H),
              precision="f64")
    assert _err(A.attention(q, k, v, **kw), A.attention(q, kr, vr, **kw), v) <= F64_TOL
    assert _err(A.flash_decode(q, k, v, chunk=8, **kw), A.attention(q, kr, vr, **kw), v) <= F64_TOL


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_fully_masked_rows_give_zeros(precision):
    rng = np.random.default_rng(2)
    B, n_q, H, d, n = 1, 3, 4, 16, 10
    q, k, v = (rng.standard_normal(s) for s in [(B, n_q, H, d), (B, n, 2, d), (B, n, 2, d)])
    mask = np.zeros((1, H, n_q, n))
    mask[0, :, 1, :] = -np.inf  # query row 1 fully masked on all heads
    mask[0, 2, 0, :] = -np.inf  # head 2 of query row 0
    v[0, 3] = np.nan  # a key masked for everybody is never read
    mask[..., 3] = -np.inf
    for sinks in (None, rng.standard_normal(H)):
        outs = [A.attention(q, k, v, scale=0.25, mask=mask, sinks=sinks, precision=precision),
                A.flash_decode(q, k, v, chunk=4, scale=0.25, mask=mask, sinks=sinks,
                               precision=precision),
                A.online_attention(q, k, v, scale=0.25, mask=mask, sinks=sinks, precision=precision)]
        for o in outs:
            o = np.asarray(o)
            assert not np.isnan(o).any()
            assert np.all(o[0, 1] == 0) and np.all(o[0, 0, 2] == 0)
            assert np.any(o[0, 0, 0] != 0)


def test_quantized_kv_equals_dequantized():
    from jaxkv import formats

    rng = np.random.default_rng(12)
    q = rng.standard_normal((1, 2, 4, 32))
    kq = formats.QuantArray.from_float(jnp.asarray(rng.standard_normal((1, 23, 2, 32)), jnp.float32), "q4_0")
    vq = formats.QuantArray.from_float(jnp.asarray(rng.standard_normal((1, 23, 2, 32)), jnp.float32), "q8_0")
    kd, vd = np.asarray(kq.dequantize()), np.asarray(vq.dequantize())
    kw = dict(scale=0.2, mask=_make_mask(rng, "causal", 1, 4, 2, 23, False, False), precision="f64")
    ref = A.attention(q, kd, vd, **kw)
    assert _err(A.attention(q, kq, vq, **kw), ref, vd) <= F64_TOL
    # flash_decode dequantizes chunk by chunk inside its scan
    assert _err(A.flash_decode(q, kq, vq, chunk=7, **kw), ref, vd) <= F64_TOL


def test_ggml_cpu_is_a_model_of_its_own_not_an_attention_policy():
    """attention() keeps to its f64/f32 policies (#15: one precision dispatcher, the ops registry): the
    ggml-cpu model is jaxkv.ggml_cpu.flash_attn_ext, which the error names."""
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, 1, 2, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 9, 1, 32)).astype(np.float16) for _ in range(2))
    kw = dict(scale=0.2, softcap=0.0, max_bias=0.0, mask=None, sinks=None)
    with pytest.raises(ValueError, match="precision.*jaxkv.ggml_cpu.flash_attn_ext"):
        A.attention(q, k, v, precision="ggml-cpu", **kw)


def test_empty_kv_axis_gives_zeros():
    q = np.ones((1, 1, 2, 8))
    k = np.zeros((1, 0, 1, 8))
    for f in (lambda: A.attention(q, k, k, scale=1.0, precision="f64"),
              lambda: A.flash_decode(q, k, k, chunk=4, scale=1.0, precision="f64")):
        o = np.asarray(f())
        assert o.shape == (1, 1, 2, 8) and np.all(o == 0)


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_large_logits_are_finite(precision):
    # logits exactly representable in f32: q = e0, k_j = (1e4 - j) e0 (or -1e4), scale 1.
    d, n = 32, 12
    q = np.zeros((1, 1, 1, d))
    q[..., 0] = 1.0
    k = np.zeros((1, n, 1, d))
    k[0, :, 0, 0] = [1e4, 1e4 - 1, -1e4, 1e4 - 2, -1e4, 1e4 - 0.5, -1e4, -1e4, 1e4 - 3, 1e4, -1e4, 0]
    v = np.random.default_rng(0).standard_normal((1, n, 1, d))
    mask = np.zeros((1, 1, 1, n))
    mask[..., 11] = 1e4  # a +1e4 mask value lifts key 11 (logit 0) to 1e4 as well
    sinks = np.array([1e4 - 1])
    for kw, fns in ((dict(), ("attention",)), (dict(mask=mask, sinks=sinks), ("attention", "flash",
                                                                             "online"))):
        gold = _np_reference(q, k, v, 1.0, kw.get("mask"), 0.0, 0.0, kw.get("sinks"))
        run = {"attention": lambda: A.attention(q, k, v, scale=1.0, precision=precision, **kw),
               "flash": lambda: A.flash_decode(q, k, v, chunk=5, scale=1.0, precision=precision, **kw),
               "online": lambda: A.online_attention(q, k, v, scale=1.0, precision=precision, **kw)}
        # f32: the logits and their differences are exact; exp of differences (<=2^-24 relative)
        # and <= 13-term sums give <= ~15 * 2^-24 ~ 1e-6 relative.
        tol = 1e-6 if precision == "f32" else F64_TOL
        for name in fns:
            o = run[name]()
            assert np.all(np.isfinite(np.asarray(o)))
            assert _err(o, gold, v) <= tol


def test_alibi_slopes():
    for H in (1, 3, 8, 12, 32):
        for mb in (0.0, 8.0, 3.7):
            s = np.asarray(A.alibi_slopes(H, mb))
            assert s.dtype == np.float32 and s.shape == (H,)
            n_log2 = 2 ** int(math.floor(math.log2(H)))
            exp = []
            for h in range(H):
                if mb <= 0:
                    exp.append(1.0)
                elif h < n_log2:
                    exp.append((2.0 ** (-mb / n_log2)) ** (h + 1))
                else:
                    exp.append((2.0 ** (-mb / 2 / n_log2)) ** (2 * (h - n_log2) + 1))
            # float32 powf of a float32-rounded base: base rounding (2^-24) times exponent <= 2H,
            # plus powf's own rounding: <= (2H + 2) * 2^-24 relative.
            assert np.all(np.abs(s / np.array(exp) - 1) <= (2 * H + 2) * 2.0**-24)
            traced = np.asarray(jax.jit(lambda m: A.alibi_slopes(H, m))(jnp.float32(mb)))
            assert np.all(np.abs(traced / s - 1) <= (2 * H + 2) * 2.0**-24)
    bias = A.effective_bias(np.array([[[[0.5, -np.inf]]]]), A.alibi_slopes(2, 8.0))
    np.testing.assert_array_equal(np.asarray(bias)[0, :, 0], [[0.5 * 2**-4, -np.inf],
                                                               [0.5 * 2**-8, -np.inf]])


def test_bad_inputs_raise_value_error():
    q, k = np.zeros((1, 1, 4, 8)), np.zeros((1, 5, 3, 8))
    with pytest.raises(ValueError, match="k"):
        A.attention(q, k, k, scale=1.0)
    k = np.zeros((1, 5, 2, 8))
    with pytest.raises(ValueError, match="mask"):
        A.attention(q, k, k, scale=1.0, mask=np.zeros((1, 1, 1, 4)))
    with pytest.raises(ValueError, match="sinks"):
        A.attention(q, k, k, scale=1.0, sinks=np.zeros(3))
    with pytest.raises(ValueError, match="precision"):
        A.attention(q, k, k, scale=1.0, precision="f16")
    with pytest.raises(ValueError, match="chunk"):
        A.flash_decode(q, k, k, scale=1.0, chunk=0)
    with pytest.raises(ValueError, match="precision"):
        A.flash_decode(q, k, k, scale=1.0, chunk=2, precision="ggml-cpu")
    with pytest.raises(TypeError, match="isa"):  # a ggml_cpu.flash_attn_ext argument, not attention's
        A.attention(q, k, k, scale=1.0, isa="avx2")


# ----------------------------------------------------------------------------------------------------
# gradients


def _grad_case(seed=0):
    rng = np.random.default_rng(seed)
    B, n_q, H, hkv, d, n = 1, 2, 4, 2, 8, 11
    x = dict(q=rng.standard_normal((B, n_q, H, d)), k=rng.standard_normal((B, n, hkv, d)),
             v=rng.standard_normal((B, n, hkv, d)), sinks=rng.standard_normal(H))
    mask = _make_mask(rng, "random", B, H, n_q, n, False, True)
    mask[0, 1, 1] = -np.inf  # a fully masked row (head 1, query 1)
    mask[..., 4:6] = -np.inf  # keys masked for everybody
    w = rng.standard_normal((B, n_q, H, d))
    return x, mask, w


_FNS = {
    "attention": lambda x, **kw: A.attention(x["q"], x["k"], x["v"], sinks=x["sinks"], **kw),
    "flash_decode": lambda x, **kw: A.flash_decode(x["q"], x["k"], x["v"], sinks=x["sinks"], chunk=3,
                                                   **kw),
}


@pytest.mark.parametrize("name", sorted(_FNS))
def test_gradients_match_central_differences(name):
    x, mask, w = _grad_case()
    kw = dict(scale=0.4, mask=mask, softcap=2.0, max_bias=8.0, precision="f64")

    def loss(x):
        return jnp.sum(w * _FNS[name](x, **kw))

    g = jax.grad(loss)(x)
    assert all(not np.isnan(np.asarray(t)).any() for t in jax.tree.leaves(g))
    rng = np.random.default_rng(1)
    h = 1e-5
    for _ in range(3):
        d = {key: rng.standard_normal(np.shape(val)) for key, val in x.items()}
        fp = loss({key: x[key] + h * d[key] for key in x})
        fm = loss({key: x[key] - h * d[key] for key in x})
        fd = float(fp - fm) / (2 * h)
        an = sum(float(np.sum(np.asarray(g[key]) * d[key])) for key in x)
        # central difference: truncation h^2/6 |f'''| ~ 1e-10 * |f'''| plus rounding
        # 2^-53 |f| / h ~ 1e-11 for O(1) losses; 1e-7 absolute allows |f'''| up to ~1e3.
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an))
    # the split-K gradient equals the reference's
    if name == "flash_decode":
        g_ref = jax.grad(lambda x: jnp.sum(w * _FNS["attention"](x, **kw)))(x)
        for key in x:
            # same math, different summation order: rounding only (see F64_TOL)
            assert np.max(np.abs(np.asarray(g[key]) - np.asarray(g_ref[key]))) <= F64_TOL


# ----------------------------------------------------------------------------------------------------
# semantics against ggml's own output (traces with F16/F32 K and V)


def _load_trace(path):
    r = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("trace.")}
    t = {}
    for ten in r.tensors:
        if ten.tensor_type.name not in ("F16", "F32"):
            return None, None
        ne = [int(e) for e in ten.shape] + [1] * (4 - len(ten.shape))
        t[ten.name] = (ten.tensor_type.name, np.asarray(ten.data).reshape(ne[::-1]))
    return meta, t


def _float_traces():
    out = []
    for p in conftest.GGML_TRACES:
        if p.name.startswith("fa_"):
            meta, t = _load_trace(p)
            if meta is not None and "trace.v_transposed" not in meta:
                out.append(p)
    return out


@pytest.mark.parametrize("path", _float_traces(), ids=lambda p: p.stem)
def test_reference_matches_ggml_trace(path):
    meta, t = _load_trace(path)
    q = t["q"][1].transpose(0, 2, 1, 3)  # [B, H, n_q, Dk] -> canonical
    n_q = q.shape[1]
    f16 = t["k"][0] == "F16"
    if f16:
        q = q.astype(np.float16)  # ggml converts q to F16 for an F16 K dot product (exact here)
    k, v = t["k"][1].transpose(0, 2, 1, 3), t["v"][1].transpose(0, 2, 1, 3)
    mask = t["mask"][1][:, :, :n_q, :] if "mask" in t else None
    sinks = t["sinks"][1].reshape(-1) if "sinks" in t else None
    kw = dict(scale=float(meta["trace.scale"]), mask=mask, softcap=float(meta["trace.logit_softcap"]),
              max_bias=float(meta["trace.max_bias"]), sinks=sinks, precision="f64")
    out = t["out"][1]  # [B, n_q, H, Dv] already
    err = _err(A.attention(q, k, v, **kw), out, v.astype(np.float64))
    # F32 K/V: ggml computes in f32: ~n_kv * 2^-24 ~ 6e-6 relative worst case. F16 V: ggml
    # accumulates V in F16, each key's mad rounding the running accumulator (unit roundoff 2^-11);
    # the errors are unbiased and damped by later rescales: we allow 4 units of 2^-11 (observed
    # <= 2.1 units on these traces).
    tol = 4 * 2.0**-11 if f16 else 6e-6
    assert err <= tol
    # the check can fail: dropping any of the optional semantics moves the result beyond tol
    for off in ("sinks", "softcap", "max_bias"):
        if kw[off] is not None and (off == "sinks" or kw[off] != 0):
            bad = dict(kw, **{off: None if off == "sinks" else 0.0})
            assert _err(A.attention(q, k, v, **bad), out, v.astype(np.float64)) > tol
