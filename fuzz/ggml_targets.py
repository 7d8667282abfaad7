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

``python -m fuzz --target ggml|ggml-unfused|ggml-mixed --threads N`` calls ``make_target(name, N)``; the
module-level ``ggml``, ``ggml_unfused``, ``ggml_mixed`` (n_threads 1, made on first use, attributes
included) serve ``--target fuzz.ggml_targets:NAME``, and ``buggy_q_f16`` is a deliberately buggy one.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["DECLARED_PRECISION", "TARGETS", "OPS", "UNSUPPORTED", "isa", "make_target", "make_model", "prepare",
           "ggml", "ggml_unfused", "ggml_mixed", "buggy_q_f16"]

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
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or not 1 <= n_threads <= 512:
        raise ValueError(f"n_threads: expected an int in [1, 512], got {n_threads!r}")
    n_threads = int(n_threads)
    _fmt_name(k_format, "k_format"), _fmt_name(v_format, "v_format")  # bad names fail here, not per call

    def fn(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, mask, sinks = np.asarray(q, np.float32), _f32(mask), _f32(sinks)
        kw = dict(scale=float(scale), mask=mask, max_bias=_alibi(max_bias, mask), n_threads=n_threads)
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
    fn.llamafile = bool(G.library_info()["features"].get("llamafile", False))
    fn.model = make_model(name, n_threads, isa=fn.isa, k_format=k_format, v_format=v_format, hot=hot,
                          llamafile=fn.llamafile)
    return fn


def make_model(name, n_threads=1, *, isa="avx2", k_format=None, v_format=None, hot=DEFAULT_HOT, llamafile=False):
    """The jaxkv.ggml_cpu emulation of :func:`make_target`'s kernel (same signature, same storage
    conversion, same n_threads; ``isa`` the build modelled, ``llamafile`` whether it has llamafile's sgemm)
    -> float32 numpy [B, n_q, H, Dv]."""
    from jaxkv import ggml_cpu as M

    if name not in OPS:
        raise ValueError(f"name: unknown ggml target {name!r}; known: {', '.join(TARGETS)}")

    def model(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
        st = prepare(name, k, v, k_format=k_format, v_format=v_format, hot=hot)
        q, mask, sinks = np.asarray(q, np.float32), _f32(mask), _f32(sinks)
        kw = dict(scale=float(scale), mask=mask, max_bias=_alibi(max_bias, mask), n_threads=int(n_threads), isa=isa)
        if name == "ggml":
            out = M.flash_attn_ext(q, st["k"], st["v"], softcap=float(softcap), sinks=sinks, **kw)
        elif name == "ggml-unfused":
            _check_unfused(softcap, sinks, st)
            out = M.soft_max_attn(q, st["k"], st["v"], llamafile=llamafile, **kw)
        else:
            out = M.mixed_flash_attn(q, st["k_cold"], st["v_cold"], st["k_hot"], st["v_hot"],
                                     softcap=float(softcap), sinks=sinks, **kw)
        return np.asarray(out, np.float32)

    model.__name__ = model.__qualname__ = name.replace("-", "_") + "_model"
    return model


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

    def __call__(self, q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
        return self._target(q, k, v, scale=scale, mask=mask, softcap=softcap, max_bias=max_bias, sinks=sinks)

    def __getattr__(self, attr):
        if attr.startswith("__") or attr == "_target":
            raise AttributeError(attr)
        return getattr(self._target, attr)


def _lazy(name):
    return _Lazy(name, f"``--target fuzz.ggml_targets:{name.replace('-', '_')}``: make_target({name!r}, n_threads=1).")


def _q_f16(t):
    """The live ggml target fed a query rounded to F16, claiming the honest ggml-cpu model. ggml's CPU
    path converts the query to K's dot type itself (F16 for F16 K, so there the rounding changes
    nothing) but keeps it F32 for F32 K: with F32 K this is a bug the campaign must find."""
    def fn(q, k, v, **kw):
        return t(np.asarray(q, np.float32).astype(np.float16).astype(np.float32), k, v, **kw)

    for a in ("name", "op", "n_threads", "declared_precision", "unsupported", "prepare", "isa", "model"):
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
