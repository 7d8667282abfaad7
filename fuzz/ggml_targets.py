"""Live ggml (the libggml-python wheel, through :mod:`jaxkv.oracles.ggml`) as fuzz targets.

Targets (``make_target(name, n_threads)``), all with the canonical signature
``fn(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None) -> out``::

    q     float32 [B, n_q, H, Dk]
    k     [B, n_kv, Hkv, Dk]   float32 array (ggml F32), float16 array (F16), formats.QuantArray (its block
                               type) -- or any float array stored in ``k_format`` (BF16 is refused: the
                               ggml-cpu model does not emulate BF16 K/V)
    v     [B, n_kv, Hkv, Dv]   as k (``v_format``)
    mask  [B|1, H|1, n_q, n_kv]   additive, -inf masks (ggml reads it as F16)
    sinks [H] float32,  out float32 [B, n_q, H, Dv]

- ``ggml``: ``ggml_flash_attn_ext`` (per-row loop, or the split-KV path when n_q = B = 1, K and V both
  F16 or both F32 and n_kv >= 512: then ``n_threads`` chunks).
- ``ggml-unfused``: ``mul_mat(k, q)``, ``soft_max_ext(mask, scale, max_bias)``, ``mul_mat(v^T, kq)``.
  No softcap, no sinks (ggml's soft_max_ext has neither: a non-zero softcap or given sinks raise
  ValueError naming the field); V must be F16 or F32.
- ``ggml-mixed``: trace op ``mixed_flash_attn``: the first ``n_kv - hot`` tokens are the cold region
  (stored in the cold block type, dequantized by ggml), the last ``hot`` tokens the F16 hot window;
  concatenated, rounded to F16, ``ggml_flash_attn_ext``.

How a case names the K/V formats: by the operands' types (a QuantArray carries its block type, float16
is F16, float32 is F32), or by ``make_target(..., k_format=, v_format=)`` which stores float operands in
that format with ggml's own ``ggml_quantize_chunk`` (block formats need Dk/Dv multiples of 32). For
``ggml-mixed`` the format names the cold region's type (default Q8_0 for float operands).

Every target is a :class:`fuzz.target.Target` carrying ``declared_precision`` (``DECLARED_PRECISION`` = "ggml-cpu"), ``isa`` (the wheel's
SIMD build, from ``library_info()``), ``n_threads``, ``op`` (the trace op) and ``model``: the
:mod:`jaxkv.ggml_cpu` emulation with the same signature, the same storage conversion and the same
``n_threads``/``isa`` -- the precision model the target's output is judged against; ``unsupported``
(the optional operands it refuses, which ``python -m fuzz --target`` then never draws) and
``prepare(k, v)`` (the storage it gives k and v, for a golden over the stored values). ALiBi scales the
mask, so ``max_bias`` without a mask changes nothing and reaches ggml as 0 (which asserts otherwise).

Fuzz cases: a target carries its own case menu (``case_strategy()``: :func:`draw_case` over
:data:`SHAPES`: block formats, the split-KV path (n_kv >= 512), the tiled path (n_q >= 64), head sizes with
SIMD leftovers, GQA up to 32, sinks / softcap / ALiBi, threads 1-4 unless ``--threads N > 1`` fixes them) and
``case_arrays(case)`` (the unpadded call), which ``python -m fuzz --target`` uses instead of its padded
float programs; ``coverage`` counts its calls per (op, ggml path, K/V types, threads) and
``coverage_table()`` prints them (the campaign does, at the end).

``python -m fuzz --target ggml|ggml-unfused|ggml-mixed --threads N`` calls ``make_target(name, N)``; the
module-level ``ggml``, ``ggml_unfused``, ``ggml_mixed`` (Targets at n_threads 1, made on first use)
serve ``--target fuzz.ggml_targets:NAME``, and ``buggy_q_f16`` is a deliberately buggy one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect

import numpy as np

from fuzz import cases as C
from fuzz import strategies as S
from fuzz.target import Target
from jaxkv import formats as F
from jaxkv import ggml_cpu as M
from jaxkv import ops

__all__ = ["DECLARED_PRECISION", "TARGETS", "OPS", "UNSUPPORTED", "SHAPES", "isa", "make_target", "make_model",
           "prepare", "draw_case", "case_strategy", "case_arrays", "coverage_key", "coverage_table", "menu_target",
           "menu_case_target", "ggml", "ggml_unfused", "ggml_mixed", "buggy_q_f16"]

DECLARED_PRECISION = "ggml-cpu"
#: ggml's name of the storage types (upper case), from jaxkv.formats.KV_TYPES
_BLOCK = tuple(F.ggml_name(t) for t in F.BLOCK_KV_TYPES)
_KV_NAMES = tuple(F.ggml_name(t) for t in F.KV_TYPES)
#: optional operands a target may refuse (an op that does not take one never gets it drawn)
OPTIONAL = ("softcap", "sinks")
#: target name -> trace op (the ops of jaxkv.ops that name a live-ggml target)
OPS = {o.target: o.name for o in ops.OPS.values() if o.target}
TARGETS = tuple(OPS)
#: target name -> optional operands it cannot take (a fuzz campaign never draws them for it)
UNSUPPORTED = {t: tuple(x for x in OPTIONAL if not ops.get(n).takes(x)) for t, n in OPS.items()}
DEFAULT_HOT = 16
DEFAULT_COLD = "Q8_0"


@functools.lru_cache(maxsize=1)
def isa() -> str:
    """The SIMD build of the loaded ggml ('avx2' for the libggml-python wheel); OracleUnavailable when
    ggml does not load."""
    from jaxkv.oracles import ggml as G

    return G.library_info()["isa"]


def _op(name) -> ops.Op:
    if name not in OPS:
        raise ValueError(f"name: unknown ggml target {name!r}; known: {', '.join(TARGETS)}")
    return ops.by_target(name)


def _fmt_name(fmt, field):
    if fmt is None:
        return None
    name = str(getattr(fmt, "name", fmt)).strip().upper()
    if name not in _KV_NAMES + ("BF16",):
        raise ValueError(f"{field}: unsupported format {fmt!r}; supported: F32, F16, BF16, {', '.join(_BLOCK)}")
    return name


_is_quant = F.is_quant


def _store(x, fmt, field):
    """One K/V operand -> ggml storage: float32 array (F32), float16 array (F16) or QuantArray."""
    from jaxkv.oracles import ggml as G

    if _is_quant(x):
        own = F.ggml_name(x.fmt)
        if fmt is not None and fmt != own:
            raise ValueError(f"{field}_format: {fmt} disagrees with the QuantArray's format {own}")
        return F.QuantArray(np.asarray(x.raw), x.fmt, int(x.n))
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{field}: expected a float array or a QuantArray, got dtype {a.dtype}")
    if fmt is None:
        fmt = {"float16": "F16", "bfloat16": "BF16"}.get(a.dtype.name, "F32")
    if fmt == "F32":
        return np.ascontiguousarray(a, np.float32)
    if fmt == "F16":
        return np.ascontiguousarray(a.astype(np.float32).astype(np.float16))
    if fmt == "BF16":
        raise ValueError(f"{field}_format: BF16 K/V are not modelled by jaxkv.ggml_cpu (use F16, F32 or a block type)")
    raw = G.quantize_chunk(np.asarray(a, np.float32), fmt)
    return F.QuantArray(raw, fmt.lower(), a.shape[-1])


def prepare(name, k, v, *, k_format=None, v_format=None, hot=DEFAULT_HOT):
    """The ggml storage both the target and its model see: dict(k=, v=); for an op that rounds its
    KV cache to F16 (``op.kv_f16``, ggml-mixed): dict(k_cold, v_cold (QuantArrays), k_hot, v_hot
    (float16)) with the last ``min(hot, n_kv)`` tokens hot. k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv]
    (see the module docstring)."""
    op = _op(name)
    kf, vf = _fmt_name(k_format, "k_format"), _fmt_name(v_format, "v_format")
    if not op.kv_f16:
        return dict(k=_store(k, kf, "k"), v=_store(v, vf, "v"))
    n = int(k.shape[1])
    h = min(int(hot), n)
    out = {}
    for role, x, f in (("k", k, kf), ("v", v, vf)):
        cold_types = tuple(F.ggml_name(t) for t in op.roles[f"{role}_cold"])
        if _is_quant(x):
            full = np.asarray(F.dequantize(np.asarray(x.raw), x.fmt), np.float32)
            cold = F.QuantArray(np.asarray(x.raw)[:, :n - h], x.fmt, int(x.n))
        else:
            full = np.asarray(x, np.float32)
            fmt = f or DEFAULT_COLD
            if fmt not in cold_types:
                raise ValueError(f"{role}_format: the mixed cache's cold region needs a block type, got {fmt}")
            cold = _store(full[:, :n - h], fmt, role)
        out[f"{role}_cold"] = cold
        out[f"{role}_hot"] = full[:, n - h:].astype(np.float16)
    return out


def _check_operands(op, softcap, sinks, st):
    """What ``op`` refuses: softcap / sinks it does not take, a V storage type it does not read."""
    if softcap and not op.takes("softcap"):
        raise ValueError(f"softcap: {op.name} has no softcap ({op.doc}), got {softcap}")
    if sinks is not None and not op.takes("sinks"):
        raise ValueError(f"sinks: {op.name} has no sinks ({op.doc})")
    if "v" in st and _tname(st["v"]) not in op.roles["v"]:
        raise ValueError(f"v_format: {op.name} takes V as {'/'.join(F.ggml_name(t) for t in op.roles['v'])} "
                         f"only ({op.doc}), got {F.ggml_name(_tname(st['v']))}")


def _gfmt(x):
    """The oracle's format argument for a stored operand (a QuantArray names its own)."""
    return None if _is_quant(x) else ("F16" if np.asarray(x).dtype == np.float16 else "F32")


def _alibi(max_bias, mask):
    """max_bias as ggml gets it: ALiBi scales the mask, so with no mask it changes nothing and is passed
    as 0 (ggml asserts on max_bias > 0 without a mask)."""
    return float(max_bias) if mask is not None else 0.0


def _f32(x):
    return None if x is None else np.asarray(x, np.float32)


@functools.lru_cache(maxsize=None)
def _takes(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _run(module, op, q, st, **kw):
    """``module.<op>`` (jaxkv.oracles.ggml or jaxkv.ggml_cpu: both name a function after each op) on
    the stored KV operands in the op's role order, with the keywords that function takes."""
    fn = getattr(module, op.name)
    if "k" in st:
        kw.update(k_format=_gfmt(st["k"]), v_format=_gfmt(st["v"]))
    takes = _takes(fn)
    return fn(q, *(st[r] for r in op.kv_roles), **{k: x for k, x in kw.items() if k in takes})


def _call_kw(q, mask, sinks, scale, softcap, max_bias, nt):
    q, mask, sinks = np.asarray(q, np.float32), _f32(mask), _f32(sinks)
    return q, dict(scale=float(scale), mask=mask, max_bias=_alibi(max_bias, mask), n_threads=nt,
                   softcap=float(softcap), sinks=sinks)


def make_target(name, n_threads=1, *, k_format=None, v_format=None, hot=DEFAULT_HOT, coverage=None) -> Target:
    """The live-ggml kernel ``name`` ('ggml', 'ggml-unfused', 'ggml-mixed': :data:`TARGETS`) at
    ``n_threads`` as a :class:`fuzz.target.Target` whose ``fn(q, k, v, *, scale, mask, softcap, max_bias,
    sinks) -> float32 [B, n_q, H, Dv]`` (numpy; does not trace under JAX) runs it. The Target carries
    declared_precision, isa, n_threads, op, name, model, ``unsupported`` (operands it refuses:
    :data:`UNSUPPORTED`), ``prepare(k, v)`` (the storage :func:`prepare` gives both the kernel and the
    model), its case menu and ``coverage`` (a Counter, shared when given). OracleUnavailable when ggml
    does not load."""
    from jaxkv.oracles import ggml as G

    op = _op(name)
    n_threads = _threads(n_threads)
    _fmt_name(k_format, "k_format"), _fmt_name(v_format, "v_format")  # bad names fail here, not per call

    info = G.library_info()
    cov = collections.Counter() if coverage is None else coverage

    def fn(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=None):
        nt = n_default if n_threads is None else _threads(n_threads)
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, kw = _call_kw(q, mask, sinks, scale, softcap, max_bias, nt)
        cov[coverage_key(name, q.shape, st, info["isa"], info["version"], nt)] += 1
        _check_operands(op, softcap, kw["sinks"], st)
        return _run(G, op, q, st, **kw)

    n_default = n_threads
    fn.__name__ = fn.__qualname__ = name.replace("-", "_")
    fn.__doc__ = f"live ggml {op.name} at n_threads={n_threads} (fuzz.ggml_targets.make_target)"
    the_isa, version = isa(), info["version"]
    llamafile = bool(info["features"].get("llamafile", False))
    unsupported = UNSUPPORTED[name]
    return Target(
        name=name, fn=fn, op=op, declared_precision=DECLARED_PRECISION, n_threads=n_threads, isa=the_isa,
        version=version, llamafile=llamafile, unsupported=unsupported,
        prepare=functools.partial(prepare, name, k_format=k_format, v_format=v_format, hot=hot),
        model=make_model(name, n_threads, isa=the_isa, k_format=k_format, v_format=v_format, hot=hot,
                         version=version, llamafile=llamafile),
        case_strategy=functools.partial(case_strategy, name, unsupported=unsupported,
                                        threads=None if n_threads == 1 else n_threads),
        case_arrays=functools.partial(case_arrays, name), coverage=cov,
        coverage_table=functools.partial(coverage_table, cov), doc=fn.__doc__)


def _threads(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 512:
        raise ValueError(f"n_threads: expected an int in [1, 512], got {n!r}")
    return int(n)


def make_model(name, n_threads=1, *, isa="avx2", k_format=None, v_format=None, hot=DEFAULT_HOT, version=None,
               llamafile=False):
    """The jaxkv.ggml_cpu emulation of :func:`make_target`'s kernel (same signature, same storage
    conversion, same n_threads; ``isa`` / ``version`` / ``llamafile`` the build modelled, version None = the
    model's default) -> float32 numpy [B, n_q, H, Dv]. ``n_threads=`` on a call overrides the default."""
    op = _op(name)

    def model(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=None):
        nt = _threads(n_threads) if n_threads is not None else n_default
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, kw = _call_kw(q, mask, sinks, scale, softcap, max_bias, nt)
        _check_operands(op, softcap, kw["sinks"], st)
        out = _run(M, op, q, st, isa=isa, version=version, llamafile=llamafile, **kw)
        return np.asarray(out, np.float32)

    n_default = _threads(n_threads)

    model.__name__ = model.__qualname__ = name.replace("-", "_") + "_model"
    return model


# ----------------------------------------------------------------------------------------------------
# the cases of ``python -m fuzz --target ggml|ggml-unfused|ggml-mixed`` and their path coverage

#: shape menu: name -> ((B, n_q, H, Hkv, Dk, Dv, n_kv), weight). Each shape is one compiled model program
#: per (types, flags), so the menu is short; which ggml path a case takes follows from shape and types
#: (per-row loop; split-KV: n_q = B = 1, same-type F16/F32, n_kv >= 512; tiled: n_q >= 64, same-type
#: F16/F32). Head sizes leave SIMD leftovers (40, 60, 80, 96, 112 against 16/32/64-wide steps), GQA up to 32.
SHAPES = {
    "row": ((2, 3, 4, 2, 64, 64, 96), 3),
    "gqa32_decode": ((1, 1, 32, 1, 128, 128, 72), 1),
    "gqa8_d80": ((1, 2, 16, 2, 80, 80, 48), 1),
    "d40": ((2, 2, 4, 4, 40, 40, 40), 1),
    "d60": ((1, 3, 4, 2, 60, 60, 33), 1),
    "d96_112": ((1, 2, 4, 2, 96, 112, 50), 1),
    "d256": ((1, 1, 4, 1, 256, 256, 64), 1),
    "d576_512": ((1, 1, 2, 1, 576, 512, 40), 1),
    "split": ((1, 1, 4, 2, 64, 64, 600), 2),
    "split_d80": ((1, 1, 8, 1, 80, 80, 530), 1),
    "tiled": ((1, 64, 4, 2, 64, 64, 100), 2),
    "tiled_d40_gqa4": ((1, 96, 4, 1, 40, 40, 70), 1),
    "tiled_d112": ((2, 70, 2, 2, 112, 112, 130), 1),
}
#: the float and block K/V types (lower case, jaxkv.formats.KV_TYPES): floats in alphabetical order,
#: blocks in the table's order (the order hypothesis draws them in)
FLOATS = tuple(sorted(set(F.KV_TYPES) - set(F.BLOCK_KV_TYPES)))
BLOCKS = F.BLOCK_KV_TYPES
CASE_MASKS = S.MENU_MASKS
_DISTS = S.MENU_DISTS


def kv_types(op) -> tuple:
    """(K types, V types) the op stores its KV cache in (its first two KV roles: k, v or the mixed
    cache's cold k, v), lower case."""
    return tuple(op.roles[r] for r in op.kv_roles[:2])


def _fast_path_shape(shape) -> bool:
    B, n_q, *_, n_kv = SHAPES[shape][0]
    return n_q >= 64 or (B == 1 and n_q == 1 and n_kv >= 512)


def draw_case(name, draw, *, unsupported=(), threads=None) -> dict:
    """One live-ggml fuzz case for target ``name``: ``draw(spec)`` picks from a sequence, ``("int", lo,
    hi)`` an int, ``("float", lo, hi)`` a float, ``("p", x)`` True with probability x (so hypothesis and
    numpy generators share it). Keys: shape and its sizes (heads [H, Hkv], B, n_q, Dk, Dv, n_kv; bucket =
    n_kv), k_fmt / v_fmt (ggml type names, lower case), mask kind and parameter, mask_heads, softcap,
    max_bias, sinks (bool), threads (1..4 unless fixed), scale, dist, seed."""
    kt, vt = kv_types(_op(name))
    blocks_only = not set(kt) & set(FLOATS)   # a mixed cache's cold region
    shapes = [s for s in SHAPES if not blocks_only or all(d % 32 == 0 for d in SHAPES[s][0][4:6])]
    shape = draw(tuple(s for s in shapes for _ in range(SHAPES[s][1])))
    B, n_q, H, Hkv, Dk, Dv, n_kv = SHAPES[shape][0]
    kb, vb = Dk % 32 == 0, Dv % 32 == 0   # block types need whole 32-element blocks
    if blocks_only:
        kf, vf = draw(BLOCKS), draw(BLOCKS)
    elif set(vt) <= set(FLOATS):          # V read transposed (ggml's unfused path)
        kf = draw(FLOATS + BLOCKS) if kb else draw(FLOATS)
        vf = draw(FLOATS)
    elif _fast_path_shape(shape) and draw(("p", 0.75)):
        kf = vf = draw(FLOATS)            # the split-KV / tiled path's types
    else:
        kf = draw(FLOATS + BLOCKS) if kb else draw(FLOATS)
        vf = kf if (kf in FLOATS or vb) and draw(("p", 0.5)) else (draw(FLOATS + BLOCKS) if vb else draw(FLOATS))
    mask = draw(CASE_MASKS)
    return dict(
        shape=shape, heads=[H, Hkv], B=B, n_q=n_q, Dk=Dk, Dv=Dv, n_kv=n_kv, bucket=n_kv, k_fmt=kf, v_fmt=vf,
        mask=mask, mask_param=draw(("int", 1, 48)), mask_heads=bool(draw(("p", 0.3))),
        softcap=(float(np.float32(draw(("float", 1.0, 50.0))))
                 if "softcap" not in unsupported and draw(("p", 0.25)) else 0.0),
        max_bias=float(np.float32(draw(("float", 0.5, 12.0)))) if mask != "none" and draw(("p", 0.25)) else 0.0,
        sinks="sinks" not in unsupported and bool(draw(("p", 0.3))),
        threads=int(threads) if threads else draw(("int", 1, 4)),
        scale=float(np.float32(draw(("float", 0.02, 0.5)))), dist=draw(_DISTS), seed=draw(("int", 0, 2**31 - 1)),
    )


def case_strategy(name, *, unsupported=(), threads=None):
    """A hypothesis strategy of :func:`draw_case` cases (``threads`` None: drawn in 1..4)."""
    return S.menu_strategy(lambda draw: draw_case(name, draw, unsupported=unsupported, threads=threads))


def case_arrays(name, c) -> dict:
    """The call of case ``c`` (no padding): dict(q float32 [B, n_q, H, Dk], k / v in their storage
    (float16 for f16, float32 for f32, QuantArray for a block type, stored by ggml's quantize_chunk),
    mask [1|B, 1|H, n_q, n_kv] or None, sinks [H] or None, scale, softcap, max_bias, n_threads)."""
    H, Hkv = c["heads"]
    B, n_q, Dk, Dv, n = c["B"], c["n_q"], c["Dk"], c["Dv"], c["n_kv"]
    rng = np.random.default_rng(int(c["seed"]))
    q = C.menu_values(rng, (B, n_q, H, Dk), c["dist"])
    k = C.menu_values(rng, (B, n, Hkv, Dk), c["dist"])
    v = C.menu_values(rng, (B, n, Hkv, Dv), "normal")
    hm = c.get("mask_heads", False)
    mask = C.menu_mask(rng, c["mask"], int(c["mask_param"]), B if hm else 1, H if hm else 1, n_q, n)
    sinks = (rng.standard_normal(H) * 2).astype(np.float32) if c["sinks"] else None
    return dict(q=q, k=_store(k, c["k_fmt"].upper(), "k"), v=_store(v, c["v_fmt"].upper(), "v"), mask=mask,
                sinks=sinks, scale=np.float32(c["scale"]), softcap=np.float32(c["softcap"]),
                max_bias=np.float32(c["max_bias"]), n_threads=int(c["threads"]))


def _tname(x) -> str:
    if _is_quant(x):
        return F.get_format(x.fmt).name.lower()
    return "f16" if np.asarray(x).dtype == np.float16 else "f32"


def coverage_key(name, q_shape, st, isa_name, version, n_threads) -> tuple:
    """(op, ggml path, K type, V type, n_threads) of one call of target ``name`` on the storage ``st``
    (:func:`prepare`): the path by jaxkv.ggml_cpu.path's rule, or the op's own (``Op.ggml_path``:
    "unfused" for ggml-unfused); the F16 KV cache of an ``op.kv_f16`` op (the mixed cache: its
    concatenated F16 K/V decide its path) names its types "cold+f16"."""
    op = _op(name)
    B, n_q = int(q_shape[0]), int(q_shape[1])
    if op.kv_f16:
        n_kv = int(st["k_cold"].shape[1]) + int(st["k_hot"].shape[1])
        dv = int(st["v_hot"].shape[-1])
        path = op.ggml_path or M.path(n_q, B, "f16", "f16", n_kv, dv, isa_name, version)
        return op.name, path, _tname(st["k_cold"]) + "+f16", _tname(st["v_cold"]) + "+f16", n_threads
    kt, vt = _tname(st["k"]), _tname(st["v"])
    n_kv, dv = int(st["k"].shape[1]), int(st["v"].shape[-1])
    path = op.ggml_path or M.path(n_q, B, kt, vt, n_kv, dv, isa_name, version)
    return op.name, path, kt, vt, n_threads


def coverage_table(counter) -> str:
    """The path-coverage table of a campaign: calls per (op, ggml path, K type / V type), with the thread
    counts seen, as text (one row per combination; a header and a total)."""
    rows = collections.defaultdict(lambda: [0, set()])
    for (op, path, kt, vt, nt), n in counter.items():
        r = rows[(op, path, f"{kt}/{vt}")]
        r[0] += n
        r[1].add(nt)
    lines = ["path coverage (live ggml calls):", f"  {'op':18} {'path':9} {'K/V types':22} {'calls':>6}  threads"]
    for (op, path, kv), (n, nts) in sorted(rows.items()):
        lines.append(f"  {op:18} {path:9} {kv:22} {n:6}  {','.join(map(str, sorted(nts)))}")
    paths = collections.Counter()
    for (op, path, *_), n in counter.items():
        paths[path] += n
    lines.append("  total: " + ", ".join(f"{p} {n}" for p, n in sorted(paths.items()))
                 + f" ({sum(paths.values())} calls)")
    return "\n".join(lines)


def _q_f16(t: Target) -> Target:
    """The live ggml target fed a query rounded to F16, claiming the honest ggml-cpu model. ggml's CPU
    per-row and split-KV paths convert the query to K's dot type themselves (F16 for F16 K, so there the
    rounding changes nothing) but keep it F32 for F32 K, and the tiled path (n_q >= 64) never rounds it:
    there this is a bug the campaign must find."""
    def fn(q, k, v, **kw):
        return t(np.asarray(q, np.float32).astype(np.float16).astype(np.float32), k, v, **kw)

    fn.__name__ = fn.__qualname__ = "buggy_q_f16"
    return t.with_fn(fn, doc="BUG: live ggml flash_attn_ext on the query rounded to F16 (wrong for F32 K; "
                             "declares the honest ggml-cpu model).")


#: MODULE:FUNCTION forms for ``python -m fuzz --target`` (n_threads = 1), made on first use (importing
#: this module does not load ggml): ``ggml``, ``ggml_unfused``, ``ggml_mixed`` (one per target) and the
#: deliberately buggy ``buggy_q_f16`` (``--target fuzz.ggml_targets:buggy_q_f16``: live ggml on an
#: F16-rounded query)
_LAZY = {**{t.replace("-", "_"): functools.partial(make_target, t, 1) for t in TARGETS},
         "buggy_q_f16": lambda: _q_f16(make_target(ops.get("flash_attn_ext").target, 1))}


def __getattr__(attr):
    if attr in _LAZY:
        t = globals()[attr] = _LAZY[attr]()
        return t
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# ----------------------------------------------------------------------------------------------------
# the ggml menus (``python -m fuzz --target ggml --menu ci|full|tiled``): cases that name their own op


MENU_HOT = DEFAULT_HOT


def menu_case_target(c, *, coverage=None):
    """(Target, case view) of a menu case ``c`` (fuzz.strategies.draw_menu_case): the live target of
    its op at its threads storing K/V in its formats (the mixed cache's last MENU_HOT tokens hot), whose
    ``case_arrays`` is :func:`fuzz.cases.menu_arrays`; the view holds what the judge reads (sinks, B,
    n_q, Dv, k_fmt, v_fmt lower case)."""
    t = make_target(c["op"], int(c["threads"]), k_format=c["k_fmt"], v_format=c["v_fmt"], hot=MENU_HOT,
                    coverage=coverage)
    B, n_q, H, Hkv, Dk, Dv, n_kv = S.MENU_BUCKETS[c["bucket"]]
    sinks = S.FLAGSETS[c["flags"]][4] and t.op.takes("sinks")
    view = dict(sinks=sinks, B=B, n_q=n_q, Dv=Dv, k_fmt=c["k_fmt"].lower(), v_fmt=c["v_fmt"].lower(),
                heads=[H, Hkv], bucket=n_kv)
    return dataclasses.replace(t, case_arrays=C.menu_arrays), view


def menu_target(menu="full", name=None) -> Target:
    """The live-ggml campaign over a case menu (fuzz.strategies.MENUS: 'ci', 'full', 'tiled'): a
    :class:`Target` whose cases (:func:`fuzz.strategies.menu_case_strategy`) name their own op, bucket,
    formats and threads; each runs on :func:`menu_case_target` (one coverage table for all)."""
    if menu not in S.MENUS:
        raise ValueError(f"--menu: expected one of {', '.join(S.MENUS)}, found {menu!r}")
    cov = collections.Counter()
    base = make_target(ops.get("flash_attn_ext").target, 1, coverage=cov)
    return dataclasses.replace(
        base, name=name or f"{base.name} --menu {menu}", case_strategy=functools.partial(S.menu_case_strategy, menu),
        case_arrays=C.menu_arrays, resolve=functools.partial(menu_case_target, coverage=cov),
        doc=f"live ggml, the {menu!r} case menu (every live op)")
