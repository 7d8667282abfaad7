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

Every target carries ``declared_precision`` (``DECLARED_PRECISION`` = "ggml-cpu"), ``isa`` (the wheel's
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
module-level ``ggml``, ``ggml_unfused``, ``ggml_mixed`` (n_threads 1, made on first use, attributes
included) serve ``--target fuzz.ggml_targets:NAME``, and ``buggy_q_f16`` is a deliberately buggy one.
"""

from __future__ import annotations

import collections
import functools

import numpy as np

from fuzz import cases as C
from fuzz import strategies as S

__all__ = ["DECLARED_PRECISION", "TARGETS", "OPS", "UNSUPPORTED", "SHAPES", "isa", "make_target", "make_model",
           "prepare", "draw_case", "case_strategy", "case_arrays", "coverage_key", "coverage_table", "ggml",
           "ggml_unfused", "ggml_mixed", "buggy_q_f16"]

DECLARED_PRECISION = "ggml-cpu"
#: target name -> trace op
OPS = {"ggml": "flash_attn_ext", "ggml-unfused": "soft_max_attn", "ggml-mixed": "mixed_flash_attn"}
TARGETS = tuple(OPS)
#: target name -> optional operands it cannot take (a fuzz campaign never draws them for it)
UNSUPPORTED = {"ggml": (), "ggml-unfused": ("softcap", "sinks"), "ggml-mixed": ()}
DEFAULT_HOT = 16
DEFAULT_COLD = "Q8_0"
_BLOCK = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")


@functools.lru_cache(maxsize=1)
def isa() -> str:
    """The SIMD build of the loaded ggml ('avx2' for the libggml-python wheel); OracleUnavailable when
    ggml does not load."""
    from jaxkv.oracles import ggml as G

    return G.library_info()["isa"]


def _fmt_name(fmt, field):
    if fmt is None:
        return None
    name = str(getattr(fmt, "name", fmt)).strip().upper()
    if name not in ("F32", "F16", "BF16") + _BLOCK:
        raise ValueError(f"{field}: unsupported format {fmt!r}; supported: F32, F16, BF16, {', '.join(_BLOCK)}")
    return name


def _is_quant(x):
    return hasattr(x, "raw") and hasattr(x, "fmt") and hasattr(x, "n")


def _store(x, fmt, field):
    """One K/V operand -> ggml storage: float32 array (F32), float16 array (F16) or QuantArray."""
    from jaxkv import formats as F
    from jaxkv.oracles import ggml as G

    if _is_quant(x):
        own = F.get_format(x.fmt).name.upper()
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
    """The ggml storage both the target and its model see. ``ggml``/``ggml-unfused``:
    dict(k=, v=); ``ggml-mixed``: dict(k_cold, v_cold (QuantArrays), k_hot, v_hot (float16)) with the last
    ``min(hot, n_kv)`` tokens hot. k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv] (see the module docstring)."""
    if name not in OPS:
        raise ValueError(f"name: unknown ggml target {name!r}; known: {', '.join(TARGETS)}")
    kf, vf = _fmt_name(k_format, "k_format"), _fmt_name(v_format, "v_format")
    if name != "ggml-mixed":
        return dict(k=_store(k, kf, "k"), v=_store(v, vf, "v"))
    from jaxkv import formats as F

    n = int(k.shape[1])
    h = min(int(hot), n)
    out = {}
    for role, x, f in (("k", k, kf), ("v", v, vf)):
        if _is_quant(x):
            full = np.asarray(F.dequantize(np.asarray(x.raw), x.fmt), np.float32)
            cold = F.QuantArray(np.asarray(x.raw)[:, :n - h], x.fmt, int(x.n))
        else:
            full = np.asarray(x, np.float32)
            fmt = f or DEFAULT_COLD
            if fmt not in _BLOCK:
                raise ValueError(f"{role}_format: the mixed cache's cold region needs a block type, got {fmt}")
            cold = _store(full[:, :n - h], fmt, role)
        out[f"{role}_cold"] = cold
        out[f"{role}_hot"] = full[:, n - h:].astype(np.float16)
    return out


def _check_unfused(softcap, sinks, st):
    if softcap:
        raise ValueError(f"softcap: ggml's unfused path (soft_max_ext) has no softcap, got {softcap}")
    if sinks is not None:
        raise ValueError("sinks: ggml's unfused path (soft_max_ext) has no sinks")
    if _is_quant(st["v"]):
        raise ValueError("v_format: ggml's unfused path transposes V: F16 or F32 only")


def _gfmt(x):
    """The oracle's format argument for a stored operand (a QuantArray names its own)."""
    return None if _is_quant(x) else ("F16" if np.asarray(x).dtype == np.float16 else "F32")


def _alibi(max_bias, mask):
    """max_bias as ggml gets it: ALiBi scales the mask, so with no mask it changes nothing and is passed
    as 0 (ggml asserts on max_bias > 0 without a mask)."""
    return float(max_bias) if mask is not None else 0.0


def _f32(x):
    return None if x is None else np.asarray(x, np.float32)


def make_target(name, n_threads=1, *, k_format=None, v_format=None, hot=DEFAULT_HOT):
    """The live-ggml kernel ``name`` ('ggml', 'ggml-unfused', 'ggml-mixed') at ``n_threads`` as a
    canonical fn(q, k, v, *, scale, mask, softcap, max_bias, sinks) -> float32 [B, n_q, H, Dv] (numpy;
    does not trace under JAX). Attributes: declared_precision, isa, n_threads, op, name, model,
    ``unsupported`` (operands it refuses: :data:`UNSUPPORTED`) and ``prepare(k, v)`` (the storage
    :func:`prepare` gives both the kernel and the model). OracleUnavailable when ggml does not load."""
    from jaxkv.oracles import ggml as G

    if name not in OPS:
        raise ValueError(f"name: unknown ggml target {name!r}; known: {', '.join(TARGETS)}")
    n_threads = _threads(n_threads)
    _fmt_name(k_format, "k_format"), _fmt_name(v_format, "v_format")  # bad names fail here, not per call

    info = G.library_info()

    def fn(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=None):
        nt = fn.n_threads if n_threads is None else _threads(n_threads)
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, mask, sinks = np.asarray(q, np.float32), _f32(mask), _f32(sinks)
        kw = dict(scale=float(scale), mask=mask, max_bias=_alibi(max_bias, mask), n_threads=nt)
        fn.coverage[coverage_key(name, q.shape, st, info["isa"], info["version"], nt)] += 1
        if name == "ggml":
            return G.flash_attn_ext(q, st["k"], st["v"], k_format=_gfmt(st["k"]), v_format=_gfmt(st["v"]),
                                    softcap=float(softcap), sinks=sinks, **kw)
        if name == "ggml-unfused":
            _check_unfused(softcap, sinks, st)
            return G.soft_max_attn(q, st["k"], st["v"], k_format=_gfmt(st["k"]), v_format=_gfmt(st["v"]), **kw)
        return G.mixed_flash_attn(q, st["k_cold"], st["v_cold"], st["k_hot"], st["v_hot"],
                                  softcap=float(softcap), sinks=sinks, **kw)

    fn.__name__ = fn.__qualname__ = name.replace("-", "_")
    fn.__doc__ = f"live ggml {OPS[name]} at n_threads={n_threads} (fuzz.ggml_targets.make_target)"
    fn.name, fn.op, fn.n_threads, fn.declared_precision = name, OPS[name], n_threads, DECLARED_PRECISION
    fn.unsupported = UNSUPPORTED[name]
    fn.prepare = functools.partial(prepare, name, k_format=k_format, v_format=v_format, hot=hot)
    fn.isa = isa()
    fn.version = info["version"]
    fn.llamafile = bool(info["features"].get("llamafile", False))
    fn.model = make_model(name, n_threads, isa=fn.isa, k_format=k_format, v_format=v_format, hot=hot,
                          version=fn.version, llamafile=fn.llamafile)
    fn.coverage = collections.Counter()
    fn.coverage_table = functools.partial(coverage_table, fn.coverage)
    fn.case_strategy = functools.partial(case_strategy, name, unsupported=fn.unsupported,
                                         threads=None if n_threads == 1 else n_threads)
    fn.case_arrays = functools.partial(case_arrays, name)
    return fn


def _threads(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 512:
        raise ValueError(f"n_threads: expected an int in [1, 512], got {n!r}")
    return int(n)


def make_model(name, n_threads=1, *, isa="avx2", k_format=None, v_format=None, hot=DEFAULT_HOT, version=None,
               llamafile=False):
    """The jaxkv.ggml_cpu emulation of :func:`make_target`'s kernel (same signature, same storage
    conversion, same n_threads; ``isa`` / ``version`` / ``llamafile`` the build modelled, version None = the
    model's default) -> float32 numpy [B, n_q, H, Dv]. ``n_threads=`` on a call overrides the default."""
    from jaxkv import ggml_cpu as M

    if name not in OPS:
        raise ValueError(f"name: unknown ggml target {name!r}; known: {', '.join(TARGETS)}")

    def model(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=None):
        nt = _threads(n_threads) if n_threads is not None else n_default
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, mask, sinks = np.asarray(q, np.float32), _f32(mask), _f32(sinks)
        kw = dict(scale=float(scale), mask=mask, max_bias=_alibi(max_bias, mask), n_threads=nt, isa=isa)
        if name == "ggml":
            out = M.flash_attn_ext(q, st["k"], st["v"], softcap=float(softcap), sinks=sinks, version=version, **kw)
        elif name == "ggml-unfused":
            _check_unfused(softcap, sinks, st)
            out = M.soft_max_attn(q, st["k"], st["v"], llamafile=llamafile, **kw)
        else:
            out = M.mixed_flash_attn(q, st["k_cold"], st["v_cold"], st["k_hot"], st["v_hot"],
                                     softcap=float(softcap), sinks=sinks, version=version, **kw)
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
FLOATS = ("f16", "f32")
BLOCKS = tuple(b.lower() for b in _BLOCK)
CASE_MASKS = ("none", "causal", "window", "random", "fullrow")
_DISTS = ("normal", "outlier", "uniform", "big")


def _fast_path_shape(shape) -> bool:
    B, n_q, *_, n_kv = SHAPES[shape][0]
    return n_q >= 64 or (B == 1 and n_q == 1 and n_kv >= 512)


def draw_case(name, draw, *, unsupported=(), threads=None) -> dict:
    """One live-ggml fuzz case for target ``name``: ``draw(spec)`` picks from a sequence, ``("int", lo,
    hi)`` an int, ``("float", lo, hi)`` a float, ``("p", x)`` True with probability x (so hypothesis and
    numpy generators share it). Keys: shape and its sizes (heads [H, Hkv], B, n_q, Dk, Dv, n_kv; bucket =
    n_kv), k_fmt / v_fmt (ggml type names, lower case), mask kind and parameter, mask_heads, softcap,
    max_bias, sinks (bool), threads (1..4 unless fixed), scale, dist, seed."""
    shapes = [s for s in SHAPES if name != "ggml-mixed" or all(d % 32 == 0 for d in SHAPES[s][0][4:6])]
    shape = draw(tuple(s for s in shapes for _ in range(SHAPES[s][1])))
    B, n_q, H, Hkv, Dk, Dv, n_kv = SHAPES[shape][0]
    kb, vb = Dk % 32 == 0, Dv % 32 == 0   # block types need whole 32-element blocks
    if name == "ggml-mixed":
        kf, vf = draw(BLOCKS), draw(BLOCKS)
    elif name == "ggml-unfused":
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
        from jaxkv import formats as F

        return F.get_format(x.fmt).name.lower()
    return "f16" if np.asarray(x).dtype == np.float16 else "f32"


def coverage_key(name, q_shape, st, isa_name, version, n_threads) -> tuple:
    """(op, ggml path, K type, V type, n_threads) of one call of target ``name`` on the storage ``st``
    (:func:`prepare`): the path by jaxkv.ggml_cpu.path's rule ("unfused" for ggml-unfused; the mixed
    cache's concatenated F16 K/V decide its path, its types are named "cold+f16")."""
    from jaxkv import ggml_cpu as M

    B, n_q = int(q_shape[0]), int(q_shape[1])
    if name == "ggml-unfused":
        return OPS[name], "unfused", _tname(st["k"]), _tname(st["v"]), n_threads
    if name == "ggml-mixed":
        n_kv = int(st["k_cold"].shape[1]) + int(st["k_hot"].shape[1])
        dv = int(st["v_hot"].shape[-1])
        path = M.path(n_q, B, "f16", "f16", n_kv, dv, isa_name, version)
        return OPS[name], path, _tname(st["k_cold"]) + "+f16", _tname(st["v_cold"]) + "+f16", n_threads
    kt, vt = _tname(st["k"]), _tname(st["v"])
    n_kv, dv = int(st["k"].shape[1]), int(st["v"].shape[-1])
    return OPS[name], M.path(n_q, B, kt, vt, n_kv, dv, isa_name, version), kt, vt, n_threads


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


class _Lazy:
    """``make_target(name, 1)``, made on first use (importing this module does not load ggml); calls and
    attributes (declared_precision, model, ...) go to the made target."""

    def __init__(self, name, doc, wrap=None):
        self._name, self._wrap = name, wrap
        self.__name__ = self.__qualname__ = name.replace("-", "_")
        self.__doc__ = doc

    @functools.cached_property
    def _target(self):
        t = make_target(self._name, 1)
        return self._wrap(t) if self._wrap else t

    def __call__(self, q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=None):
        return self._target(q, k, v, scale=scale, mask=mask, softcap=softcap, max_bias=max_bias, sinks=sinks,
                            n_threads=n_threads)

    def __getattr__(self, attr):
        if attr.startswith("__") or attr == "_target":
            raise AttributeError(attr)
        return getattr(self._target, attr)


def _lazy(name):
    return _Lazy(name, f"``--target fuzz.ggml_targets:{name.replace('-', '_')}``: make_target({name!r}, n_threads=1).")


def _q_f16(t):
    """The live ggml target fed a query rounded to F16, claiming the honest ggml-cpu model. ggml's CPU
    per-row and split-KV paths convert the query to K's dot type themselves (F16 for F16 K, so there the
    rounding changes nothing) but keep it F32 for F32 K, and the tiled path (n_q >= 64) never rounds it:
    there this is a bug the campaign must find."""
    def fn(q, k, v, **kw):
        return t(np.asarray(q, np.float32).astype(np.float16).astype(np.float32), k, v, **kw)

    for a in ("name", "op", "n_threads", "declared_precision", "unsupported", "prepare", "isa", "model", "version",
              "coverage", "coverage_table", "case_strategy", "case_arrays"):
        setattr(fn, a, getattr(t, a))
    return fn


#: MODULE:FUNCTION forms for ``python -m fuzz --target`` (n_threads = 1)
ggml = _lazy("ggml")
ggml_unfused = _lazy("ggml-unfused")
ggml_mixed = _lazy("ggml-mixed")
#: deliberately buggy (``--target fuzz.ggml_targets:buggy_q_f16``): live ggml on an F16-rounded query
buggy_q_f16 = _Lazy("ggml", "BUG: live ggml flash_attn_ext on the query rounded to F16 (wrong for F32 K; "
                    "declares the honest ggml-cpu model).", wrap=_q_f16)
buggy_q_f16.__name__ = buggy_q_f16.__qualname__ = "buggy_q_f16"
