"""Properties over jaxkv.layout and jaxkv.trace (registered by fuzz.properties when both import).

``layout``: store a random tensor through a ggml view (permuted storage order, padded strides, an offset
into a larger buffer) and resolve it back (bitwise); ``permute`` on the descriptor equals transposing
the resolved array; ``transpose`` twice is the identity; canonical <-> ggml remappings round-trip per
role; a view reaching past its buffer raises ValueError.

``trace_roundtrip``: ``trace.save`` then ``trace.load`` of an attention call gives back the same operands
(q, out, mask, sinks bitwise; K/V bitwise for F32, F16-rounded for F16, the quantizer's bytes for block
formats), the same scalars, also when K is stored through a view into a larger cache buffer.

``trace_robustness``: a valid trace with corrupted bytes (truncated, bytes flipped, ranges overwritten,
zeroed or inserted) either loads or raises ``TraceError``; any other exception is a failure.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from hypothesis import strategies as st

from fuzz import cases as C
from fuzz import strategies as S
from fuzz.registry import Property, each_case
from fuzz.registry import fixed as _s
from fuzz.registry import outcome as _outcome
from fuzz.registry import register as _register

from jaxkv import formats as F
from jaxkv import layout as L
from jaxkv import trace as T

__all__ = ["layout_check", "trace_case", "write_case_trace", "save_call"]

_ITEM = {"f32": 4, "f16": 2}


def _storage_view(c):
    """(X ggml-order array, View) for a view case: axes laid out in ``perm`` order (perm[0] fastest),
    each padded by ``pad`` elements, starting ``offset`` elements into the buffer."""
    rng = np.random.default_rng(int(c["seed"]))
    ne = tuple(c["ne"])
    dt = np.float32 if c["dtype"] == "f32" else np.float16
    x = rng.standard_normal(ne[::-1]).astype(dt)
    item = _ITEM[c["dtype"]]
    nb = [0] * 4
    cur = item
    for ax in c["perm"]:
        nb[ax] = cur
        cur *= ne[ax] + c["pad"][ax]
    return x, L.View(c["dtype"], ne, tuple(nb), c["offset"] * item), cur + c["offset"] * item


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def layout_check(c) -> dict:
    errs = []
    x, view, size = _storage_view(c)
    nan = np.full(size // _ITEM[c["dtype"]], np.nan, x.dtype).tobytes()
    buf = L.store(x, c["dtype"], view.ne, view.nb, view.offset, buffer=nan)
    got = L.resolve(buf, view)
    if not _same(got, x):
        errs.append("resolve(store(x)) != x")
    perm = list(c["perm"])
    pv = L.permute(view, *perm)
    inv = [0] * 4
    for i, p in enumerate(perm):
        inv[p] = i
    axes = [3 - inv[3 - j] for j in range(4)]
    if not _same(L.resolve(buf, pv), np.transpose(x, axes)):
        errs.append(f"resolve(permute(view, {perm})) != transpose of the tensor")
    if L.transpose(L.transpose(view)) != view:
        errs.append("transpose(transpose(view)) != view")
    canon = x.astype(np.float32).reshape(x.shape)
    for role in ("q", "k", "v", "mask", "out", "v_t"):
        back = L.ggml_to_canonical(role, L.canonical_to_ggml(role, canon))
        if not _same(back, canon):
            errs.append(f"ggml_to_canonical(canonical_to_ggml({role!r})) != identity")
    bad = L.View(view.type, view.ne, view.nb, view.offset + size)
    try:
        L.resolve(buf, bad)
        errs.append("a view past the buffer's end resolved without error")
    except ValueError:
        pass
    return _outcome(not errs, 5 + 5, "; ".join(errs) or None)


# ----------------------------------------------------------------------------------------------------
# traces

_TRACE_FORMATS = F.KV_TYPES  # the K/V types a trace stores (jaxkv.formats)


@st.composite
def trace_case(draw):
    """An attention case plus the trace storage types of K and V and whether K is stored through a view
    into a larger cache buffer (extra rows, offset)."""
    c = draw(S.attention_case(formats=("f32", "f16")))
    c["k_trace"] = draw(st.sampled_from(_TRACE_FORMATS))
    c["v_trace"] = draw(st.sampled_from(_TRACE_FORMATS))
    for fmt, d in ((c["k_trace"], "Dk"), (c["v_trace"], "Dv")):
        if fmt.startswith(("q", "iq")):
            c[d] = 32 * max(1, -(-c[d] // 32))
    if c["k_trace"].startswith(("q", "iq")):
        c["Dk"] = 32 * max(1, -(-c["Dk"] // 32))
    c["Dk"] = min(c["Dk"], S.PAD_D)
    c["Dv"] = min(c["Dv"], S.PAD_D)
    c["k_view"] = draw(st.booleans())
    c["view_extra"] = draw(st.integers(0, 8))
    c["view_offset"] = draw(st.integers(0, 4))
    return c


def _k_view(c, k_fmt):
    """View of K's ggml operand [Dk, n_kv, Hkv, B] inside a cache buffer of n_kv + extra rows per head,
    starting ``view_offset`` rows in."""
    H, Hkv = c["heads"]
    ne = (c["Dk"], c["n_kv"], Hkv, c["B"])
    row = F.row_bytes(k_fmt, c["Dk"])
    rows = c["n_kv"] + c["view_extra"] + c["view_offset"]
    nb = (F.get_format(k_fmt).block_bytes, row, row * rows, row * rows * Hkv)
    return L.View(k_fmt, ne, nb, c["view_offset"] * row)


def _random_blocks(rng, lead, d, fmt):
    """QuantArray of random ggml blocks [*lead, d] with finite F16 scale fields (no quantizer needed:
    a trace stores whatever bytes it is given)."""
    f = F.get_format(fmt)
    nblk = d // f.block_size
    raw = rng.integers(0, 256, tuple(lead) + (nblk, f.block_bytes), dtype=np.uint8)
    for fld in f.fields:
        if fld.kind == "f16":
            vals = rng.uniform(-1, 1, tuple(lead) + (nblk,)).astype(np.float16)
            raw[..., fld.offset:fld.offset + 2] = vals.view(np.uint8).reshape(vals.shape + (2,))
    return F.QuantArray(raw=raw.reshape(tuple(lead) + (-1,)), fmt=f, n=d)


def write_case_trace(path, c, out=None):
    """Write case ``c`` (a trace_case) as trace v1 at ``path``; returns the arrays written (K/V in a
    block format are random blocks, QuantArray)."""
    a = C.attention_arrays(c)
    rng = np.random.default_rng(int(c["seed"]) + 2)
    for role, fmt in (("k", c["k_trace"]), ("v", c["v_trace"])):
        if fmt not in ("f32", "f16"):
            a[role] = _random_blocks(rng, a[role].shape[:3], a[role].shape[3], fmt)
    if out is None:
        out = np.random.default_rng(int(c["seed"]) + 1).standard_normal(
            (c["B"], c["n_q"], c["heads"][0], c["Dv"])).astype(np.float32)
    views = {"k": _k_view(c, c["k_trace"])} if c.get("k_view") else None
    T.save(path, q=a["q"], k=a["k"], v=a["v"], mask=a["mask"], sinks=a["sinks"], out=out, scale=a["scale"],
           softcap=a["softcap"], max_bias=a["max_bias"], producer="fuzz trace_roundtrip",
           formats={"k": c["k_trace"], "v": c["v_trace"]}, views=views)
    return dict(a, out=out)


def _expect_kv(x, fmt):
    if fmt == "f32":
        return x
    if fmt == "f16":
        return x.astype(np.float16)
    return np.asarray(x.raw)


def _roundtrip_check(c) -> dict:
    errs = []
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "case.gguf")
        a = write_case_trace(p, c)
        t = T.load(p)
        for role in ("q", "out", "sinks", "mask"):
            want, got = a[role], getattr(t, role)
            if (want is None) != (got is None) or (want is not None and not _same(np.asarray(got, np.float32), want)):
                errs.append(f"{role} differs after save/load")
        for role, fmt in (("k", c["k_trace"]), ("v", c["v_trace"])):
            got = getattr(t, role)
            got = np.asarray(got.raw) if F.is_quant(got) else np.asarray(got)
            if not _same(got, _expect_kv(a[role], fmt)):
                errs.append(f"{role} ({fmt}{', view' if role == 'k' and c.get('k_view') else ''}) differs after save/load")
        for key in ("scale", "softcap", "max_bias"):
            if np.float32(getattr(t, key)) != np.float32(a[key]):
                errs.append(f"{key}: {getattr(t, key)} != {a[key]}")
    return _outcome(not errs, 8, "; ".join(errs) or None)


_CORRUPTIONS = ("truncate", "flip", "overwrite", "zero", "insert", "header")


@st.composite
def corrupt_case(draw):
    c = draw(trace_case())
    c["corrupt"] = draw(st.sampled_from(_CORRUPTIONS))
    c["where"] = draw(st.floats(0.0, 1.0))
    c["amount"] = draw(st.integers(1, 64))
    c["corrupt_seed"] = draw(st.integers(0, 2**31 - 1))
    return c


def _corrupt(data: bytes, c) -> bytes:
    rng = np.random.default_rng(int(c["corrupt_seed"]))
    n = len(data)
    kind, amount = c["corrupt"], int(c["amount"])
    pos = min(int(c["where"] * n), n - 1)
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:pos])
    if kind == "flip":
        for i in rng.integers(0, n, amount):
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == "overwrite":
        b[pos:pos + amount] = rng.integers(0, 256, len(b[pos:pos + amount]), dtype=np.uint8).tobytes()
        return bytes(b)
    if kind == "zero":
        b[pos:pos + amount] = bytes(len(b[pos:pos + amount]))
        return bytes(b)
    if kind == "insert":
        return bytes(b[:pos]) + rng.integers(0, 256, amount, dtype=np.uint8).tobytes() + bytes(b[pos:])
    # header: overwrite bytes in the first 512 (counts, lengths, types)
    p = int(c["where"] * min(n, 512))
    for i in range(min(amount, 8)):
        if p + i < n:
            b[p + i] = int(rng.integers(256))
    return bytes(b)


def _robust_check(c) -> dict:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "case.gguf")
        write_case_trace(p, c)
        with open(p, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(_corrupt(data, c))
        try:
            t = T.load(p)
            with np.errstate(all="ignore"):
                for r, x in t.operands().items():  # touching the operands must not crash either
                    np.asarray(x.raw if F.is_quant(x) else x).sum()
        except T.TraceError:
            pass
        except Exception as e:
            return _outcome(False, 1, f"{c['corrupt']} corruption raised {type(e).__name__} (not TraceError): "
                                      f"{str(e).splitlines()[0][:160] if str(e) else ''}")
    return _outcome(True, 1)


def save_call(path, a, ctx, producer=None, out=None, op=None) -> str:
    """Save an attention call ``a`` and a kernel's output on it (``out``; None: the --target of ``ctx``
    on ``a``) as a trace v1 file of op ``op`` (None: the op its roles say, ``jaxkv.ops.infer``)."""
    if out is None:
        out = np.asarray(ctx.target(a["q"], a["k"], a["v"], scale=a["scale"], mask=a["mask"],
                                    softcap=a["softcap"], max_bias=a["max_bias"], sinks=a["sinks"]), np.float32)
    T.save(path, op=op, q=a["q"], k=a["k"], v=a["v"], mask=a["mask"], sinks=a["sinks"], out=out,
           scale=float(a["scale"]), softcap=float(a["softcap"]), max_bias=float(a["max_bias"]),
           producer=producer or f"fuzz --target {ctx.target_spec}")
    return str(path)


_register(Property(
    "layout", "ggml views: store/resolve through permuted, padded, offset views (bitwise), permute == "
    "transpose, transpose twice == id, canonical<->ggml per role, out-of-buffer views raise",
    _s(S.view_case()), each_case(layout_check), batch=1))
_register(Property(
    "trace_roundtrip", "trace.save -> trace.load gives back every operand and scalar (F32/F16/block K,V; "
    "K through a view into a larger cache buffer)", _s(trace_case()), each_case(_roundtrip_check), batch=1))
_register(Property(
    "trace_robustness", "corrupted trace bytes (truncated, flipped, overwritten, zeroed, inserted) load "
    "or raise TraceError, nothing else", _s(corrupt_case()), each_case(_robust_check), batch=1))
