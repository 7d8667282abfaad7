"""Live ggml as an oracle: run ggml's own CPU ops on canonical-layout numpy inputs.

Layout (every public function; ``jaxkv`` canonical)::

    q      float32 [B, n_q, H, Dk]
    k      [B, n_kv, Hkv, Dk]    float array (stored by ggml_quantize_chunk in ``k_format``; float16 with no
                                 format means F16), raw ggml blocks uint8 [B, n_kv, Hkv, row_bytes]
                                 (``k_format`` names the type), or a ``formats.QuantArray`` (raw, fmt, n)
    v      [B, n_kv, Hkv, Dv]    as k
    mask   float [B|1, H|1, n_q, n_kv]   additive; -inf masks; handed to ggml as F16
    sinks  float32 [H]
    out    float32 [B, n_q, H, Dv]

Query head ``h`` uses KV head ``h // (H // Hkv)``. Conversions between this layout and ggml's tensors go
through :mod:`jaxkv.layout` (``canonical_to_ggml`` / ``ggml_to_canonical``).

ggml aborts the process on a failed ``GGML_ASSERT`` and reads out of bounds on some inputs it does not
check (a mask with fewer rows than queries, an F16 query, K and V of different lengths). Every input is
therefore checked here first against ggml's rules (``ggml.c``: ``ggml_flash_attn_ext``,
``ggml_soft_max_impl``, ``ggml_mul_mat``, ``ggml_concat``; ``ggml-cpu/ops.cpp``: the CPU kernels) and a
violation raises :class:`OracleInputError` naming the field. Nothing a caller passes reaches ggml unchecked.

Non-finite policy (``nonfinite``): with ``"raise"`` (default) every value ggml stores must be finite: q, sinks,
float K/V (and, for F16 and block formats, ``|x| <= 65504`` so that F16 values and block scales cannot
overflow), the F16/F32 scale fields of raw blocks, and the mask (``-inf`` allowed, ``|x| <= 65504`` otherwise:
larger values would silently become infinities in F16). ``"allow"`` skips these checks and hands NaN/inf to
ggml as they are (memory-safe: only values change). Shapes, dtypes and parameters are always checked.

Mask rows: ggml 0.20.2 has no ``GGML_KQ_MASK_PAD`` (the padding assert of older versions is gone): the CPU
kernels read mask rows ``0 .. n_q-1`` only, so the mask needs ``ne[1] >= n_q`` and no padding. ``mask_pad``
pads rows to a multiple anyway (rows filled with -inf), as llama.cpp builds do.
"""

from __future__ import annotations

import ctypes as C
import math
from typing import Any

import numpy as np

from jaxkv import formats, layout, libm
from jaxkv.ggml_cpu import BUILD_CONTRACT
from jaxkv.oracles import ggml_lib as _gl
from jaxkv.oracles.ggml_lib import OracleUnavailable

__all__ = [
    "OracleUnavailable",
    "OracleInputError",
    "SUPPORTED_FORMATS",
    "available",
    "library_info",
    "quantize_chunk",
    "flash_attn_ext",
    "soft_max_attn",
    "mixed_flash_attn",
    "mul_mat",
    "f16_vector_arith",
]


class OracleInputError(ValueError):
    """An input ggml would abort on or read out of bounds with (or one outside this oracle's contract)."""


#: storage types the attention ops accept for K/V (Q8_1 is a dot-product type only: no vec_dot, no to_float)
SUPPORTED_FORMATS = tuple(_gl.TYPES)
_FLOAT_FORMATS = tuple(formats.ggml_name(n) for n, f in formats.FORMATS.items() if not f.quantized)
F16_MAX = 65504.0
#: byte offsets of the F16 scale fields (d, m) in one block (the block structs of ``jaxkv.formats``)
_SCALE_FIELDS = {formats.ggml_name(n): tuple(fl.offset for fl in formats.FORMATS[n].fields if fl.kind == "f16")
                 for n in formats.BLOCK_KV_TYPES}
_N_OBJECTS = 64  # ggml objects (tensors, views, the graph) one call creates, an upper bound
_SLACK = 1 << 16


def available() -> bool:
    """Whether the ggml libraries load here (see :func:`jaxkv.oracles.ggml_lib.lib`)."""
    return _gl.available()


def library_info() -> dict:
    """Facts about the loaded ggml: ``version``, ``commit``, ``isa`` (widest x86/ARM SIMD the library was
    compiled for: 'avx512fp16', 'avx512', 'avx2', 'avx', 'neon' or 'scalar'), ``features`` {name: bool}
    (ggml_cpu_has_*, compile-time in ggml-cpu), ``f16_arith`` ('f16' where F16 vectors are computed in
    native FP16, :func:`f16_vector_arith`), ``contract`` (the ``ggml.contract.*`` facts of
    ``jaxkv.ggml_cpu.BUILD_CONTRACT`` for this ISA, or {} for an ISA the model lacks), ``wheel``
    (libggml-python version when the libraries loaded are that wheel's, else None) and ``lib_dir``."""
    L = _gl.lib()
    feats = {f: bool(getattr(L, f"ggml_cpu_has_{f}")()) for f in _gl.CPU_FEATURES}
    isa = next((name for name in ("avx512", "avx2", "avx", "neon") if feats[name]), "scalar")
    f16 = f16_vector_arith() if isa == "avx512" else "f32"
    if f16 == "f16":
        isa = "avx512fp16"
    version = L.ggml_version().decode()
    return {
        "version": version,
        "commit": L.ggml_commit().decode(),
        "isa": isa,
        "features": feats,
        "f16_arith": f16,
        "contract": _contract_facts(isa),
        "wheel": _gl.wheel_version(L.directory),
        "lib_dir": str(L.directory),
    }


def _contract_facts(isa: str) -> dict:
    return BUILD_CONTRACT[isa].to_metadata() if isa in BUILD_CONTRACT else {}


_F16_ARITH: dict[str, str] = {}


def f16_vector_arith() -> str:
    """How the loaded ggml-cpu computes on F16 vectors (``ggml_vec_mad_f16``), measured by one
    ``flash_attn_ext`` call (cached per library directory): 'f16' (native FP16 SIMD, ``__AVX512FP16__``:
    the multiplier rounded to F16, one F16 rounding per FMA) or 'f32' (converted to F32, FMA, stored
    as F16). ggml reports no such feature, hence the probe.

    The call: D = 128 (one FP16 SIMD step), q = e0, keys k0 = 0, k1 = -0.5 e0, scale 1, V rows 0 and w:
    the second key adds ``w*vs`` with ``vs = expf(-0.5)`` to a zero accumulator, so the output is
    ``F16(w*vs) / (1 + vs)`` (F32 arithmetic) or ``F16(w*F16(vs)) / (1 + vs)`` (FP16). Raises
    OracleUnavailable if ggml matches neither."""
    L = _gl.lib()
    key = str(L.directory)
    if key not in _F16_ARITH:
        d = 128
        q = np.zeros((1, 1, 1, d), np.float32)
        q[..., 0] = 1
        k = np.zeros((1, 2, 1, d), np.float16)
        k[0, 1, 0, 0] = -0.5
        w = (1 + np.arange(d) / 61.0).astype(np.float16)
        v = np.zeros((1, 2, 1, d), np.float16)
        v[0, 1, 0] = w
        out = flash_attn_ext(q, k, v, scale=1.0)[0, 0, 0]
        vs = _libm_expf(-0.5)
        inv = np.float32(1) / (np.float32(1) + vs)
        w64 = w.astype(np.float64)
        by_f32 = (w64 * np.float64(vs)).astype(np.float32).astype(np.float16).astype(np.float32) * inv
        by_f16 = (w64 * np.float64(np.float16(vs))).astype(np.float16).astype(np.float32) * inv
        if np.array_equal(out, by_f16) and not np.array_equal(out, by_f32):
            _F16_ARITH[key] = "f16"
        elif np.array_equal(out, by_f32):
            _F16_ARITH[key] = "f32"
        else:
            raise OracleUnavailable(f"ggml in {key}: F16 accumulation matches neither F32 nor FP16 arithmetic")
    return _F16_ARITH[key]


def _libm_expf(x: float) -> np.float32:
    """The C library's ``expf`` (the one ggml calls), or numpy's float32 exp where none loads."""
    f = libm.expf()
    return np.exp(np.float32(x)) if f is None else np.float32(f(x))


# --- layout ---------------------------------------------------------------------------------------------


def _to_ggml(role: str, x: np.ndarray) -> np.ndarray:
    """Canonical numpy array -> C-contiguous row-major array of the ggml tensor (shape ne[::-1])."""
    return np.ascontiguousarray(np.asarray(layout.canonical_to_ggml(role, x)))


def _to_canonical(role: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(layout.ggml_to_canonical(role, x))


# --- validation -------------------------------------------------------------------------------------------


def _err(field: str, msg: str) -> OracleInputError:
    return OracleInputError(f"{field}: {msg}")


def _format_name(fmt: Any, field: str) -> str | None:
    if fmt is None:
        return None
    name = getattr(fmt, "name", fmt)
    if isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool):
        name = next((t.name for t in _gl.TYPES.values() if t.type_id == int(fmt)), None)
        if name is None:
            raise _err(field, f"ggml type id {int(fmt)} is not supported; supported: {list(SUPPORTED_FORMATS)}")
    if not isinstance(name, str):
        raise _err(field, f"expected a ggml type name, got {fmt!r}")
    name = name.strip().upper()
    if name not in _gl.TYPES:
        raise _err(field, f"unsupported format {name!r}; supported: {list(SUPPORTED_FORMATS)}")
    return name


def _check_policy(nonfinite: str) -> bool:
    if nonfinite not in ("raise", "allow"):
        raise _err("nonfinite", f"must be 'raise' or 'allow', got {nonfinite!r}")
    return nonfinite == "raise"


def _check_param(name: str, value: Any, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _err(name, f"must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise _err(name, f"must be finite, got {v}")
    if min_value is not None and v < min_value:
        raise _err(name, f"must be >= {min_value}, got {v}")
    if abs(v) > np.finfo(np.float32).max:
        raise _err(name, f"overflows float32: {v}")
    return v


def _check_threads(n_threads: Any) -> int:
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise _err("n_threads", f"must be an int, got {n_threads!r}")
    if not 1 <= int(n_threads) <= _gl.GGML_MAX_N_THREADS:
        raise _err("n_threads", f"must be in [1, {_gl.GGML_MAX_N_THREADS}], got {n_threads}")
    return int(n_threads)


def _as_array(x: Any, field: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot take is a bad input
        raise _err(field, f"cannot be read as an array: {e}") from None
    if a.dtype == object:
        raise _err(field, "cannot be read as a numeric array")
    return a


def _check_dims(field: str, shape: tuple[int, ...], names: str, empty_axis: int | None = None) -> None:
    if len(shape) != 4:
        raise _err(field, f"must be 4-D [{names}], got shape {shape}")
    if any(d < (0 if i == empty_axis else 1) for i, d in enumerate(shape)):
        raise _err(field, f"every dimension must be >= 1, got shape {shape} [{names}]")


def _check_q(q: Any, check: bool) -> np.ndarray:
    a = _as_array(q, "q")
    if a.dtype != np.float32:
        raise _err("q", f"must be float32 (ggml's flash_attn_ext reads q rows as F32; an F16 q is read out of "
                        f"bounds), got {a.dtype}")
    _check_dims("q", a.shape, "B, n_q, H, Dk")
    if check and not np.isfinite(a).all():
        raise _err("q", "contains NaN/inf (nonfinite='raise')")
    return a


class _KV:
    """One K/V operand resolved to ggml storage: ``gtype``, ``data`` (row-major ggml order bytes), ``shape``
    (canonical [B, n, Hkv, D])."""

    def __init__(self, gtype: _gl.GgmlType, data: np.ndarray, shape: tuple[int, int, int, int]):
        self.gtype, self.data, self.shape = gtype, data, shape

    @property
    def ne(self) -> tuple[int, int, int, int]:
        b, n, h, d = self.shape
        return (d, n, h, b)


def _check_raw_scales(raw: np.ndarray, t: _gl.GgmlType, field: str) -> None:
    """nonfinite='raise' for raw storage: F32/F16/BF16 values, or the F16 scale fields of each block."""
    flat = raw.reshape(-1)
    if t.name == "F32":
        vals = flat.view(np.float32)
    elif t.name == "F16":
        vals = flat.view(np.float16)
    elif t.name == "BF16":
        vals = (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = flat.reshape(-1, t.type_size)
        vals = np.concatenate([blocks[:, o : o + 2].copy().view(np.float16).reshape(-1) for o in _SCALE_FIELDS[t.name]])
    if not np.isfinite(vals).all():
        raise _err(field, f"{t.name} storage holds NaN/inf values or scales (nonfinite='raise')")


def _kv_operand(x: Any, fmt: Any, field: str, role: str, check: bool, *, allow_raw: bool = True,
                allow_empty: bool = False) -> _KV:
    """Resolve a K/V input (float array, raw uint8 blocks, or QuantArray-like) to ggml storage bytes."""
    fname = _format_name(fmt, f"{field}_format")
    if formats.is_quant(x):
        own = _format_name(x.fmt, f"{field}.fmt")
        if fname is not None and fname != own:
            raise _err(f"{field}_format", f"{fname} disagrees with the QuantArray's format {own}")
        raw, fname, n = _as_array(x.raw, f"{field}.raw"), own, int(x.n)
        t = _gl.TYPES[fname]
        if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[-1] != t.row_bytes(n) or n % t.block_size:
            raise _err(field, f"QuantArray raw must be uint8 [B, n, Hkv, row_bytes({n})] of {fname}, "
                              f"got {raw.dtype} {raw.shape}")
        return _raw_operand(raw, t, n, field, role, check, allow_raw, allow_empty)
    a = _as_array(x, field)
    if a.dtype == np.uint8:
        if fname is None:
            raise _err(f"{field}_format", "required for raw uint8 blocks")
        t = _gl.TYPES[fname]
        if a.ndim != 4 or a.shape[-1] % t.type_size:
            raise _err(field, f"raw {fname} blocks must be uint8 [B, n, Hkv, k*{t.type_size}], got {a.shape}")
        return _raw_operand(a, t, a.shape[-1] // t.type_size * t.block_size, field, role, check, allow_raw,
                            allow_empty)
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise _err(field, f"must be a float array, raw uint8 blocks or a QuantArray, got dtype {a.dtype}")
    if fname is None:
        if a.dtype != np.float16:
            raise _err(f"{field}_format", f"required for a {a.dtype} array (only float16 implies F16)")
        fname = "F16"
    t = _gl.TYPES[fname]
    _check_dims(field, a.shape, "B, n, Hkv, D", 1 if allow_empty else None)
    if a.shape[-1] % t.block_size:
        raise _err(field, f"head size {a.shape[-1]} must be a multiple of {fname}'s block size {t.block_size}")
    x32 = a.astype(np.float32)
    if check:
        if not np.isfinite(x32).all():
            raise _err(field, "contains NaN/inf (nonfinite='raise')")
        if fname not in ("F32", "BF16") and x32.size and np.abs(x32).max() > F16_MAX:
            raise _err(field, f"|values| exceed {F16_MAX:g}: {fname} values/scales would overflow F16 "
                              f"(nonfinite='raise')")
    g = _to_ggml(role, x32)
    raw = quantize_chunk(g, fname, nonfinite="allow")
    if check and fname == "BF16":
        _check_raw_scales(raw, t, field)  # rounding to BF16 can overflow near float32's maximum
    return _KV(t, raw, tuple(int(s) for s in a.shape))


def _raw_operand(raw: np.ndarray, t: _gl.GgmlType, n: int, field: str, role: str, check: bool,
                 allow_raw: bool, allow_empty: bool) -> _KV:
    if not allow_raw:
        raise _err(field, "raw blocks are not accepted here; pass a float array")
    shape = (int(raw.shape[0]), int(raw.shape[1]), int(raw.shape[2]), int(n))
    _check_dims(field, shape, "B, n, Hkv, D", 1 if allow_empty else None)
    g = _to_ggml(role, raw)
    if check:
        _check_raw_scales(g, t, field)
    return _KV(t, g, shape)


def _check_kv_pair(q: np.ndarray, k: _KV, v: _KV, kname: str = "k", vname: str = "v") -> None:
    B, n_q, H, Dk = q.shape
    kb, kn, kh, kd = k.shape
    vb, vn, vh, _ = v.shape
    if kd != Dk:
        raise _err(kname, f"head size {kd} != q's Dk {Dk}")
    if kb != B or vb != B:
        raise _err(kname if kb != B else vname, f"batch {kb if kb != B else vb} != q's B {B}")
    if vn != kn:
        raise _err(vname, f"n_kv {vn} != {kname}'s n_kv {kn}")
    if vh != kh:
        raise _err(vname, f"Hkv {vh} != {kname}'s Hkv {kh}")
    if H % kh:
        raise _err(kname, f"GQA: H={H} is not a multiple of Hkv={kh}")


def _check_mask(mask: Any, B: int, H: int, n_q: int, n_kv: int, pad: Any, check: bool,
                dtype: type = np.float16) -> np.ndarray:
    """Validate a canonical mask and return ggml's mask array (row-major [mB, mH, n_q_pad, n_kv])."""
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 1:
        raise _err("mask_pad", f"must be an int >= 1, got {pad!r}")
    m = _as_array(mask, "mask")
    if m.dtype not in (np.float16, np.float32, np.float64):
        raise _err("mask", f"must be a float array (additive, -inf masks), got dtype {m.dtype}")
    want = f"[1|{B}, 1|{H}, {n_q}, {n_kv}]"
    if m.ndim != 4:
        raise _err("mask", f"must be 4-D {want}, got shape {m.shape}")
    mb, mh, mq, mk = m.shape
    if mq != n_q or mk != n_kv or mb not in (1, B) or mh not in (1, H):
        raise _err("mask", f"shape {m.shape} does not broadcast as {want}")
    m32 = m.astype(np.float32)
    if check:
        if np.isnan(m32).any() or (m32 == np.inf).any():
            raise _err("mask", "contains NaN or +inf (nonfinite='raise'); only -inf masks")
        fin = np.isfinite(m32)
        if dtype == np.float16 and fin.any() and np.abs(m32[fin]).max() > F16_MAX:
            raise _err("mask", f"finite |values| exceed {F16_MAX:g} and would become inf in F16 "
                               "(nonfinite='raise')")
    rows = -(-n_q // int(pad)) * int(pad)
    g = layout.canonical_to_ggml("mask", m32, pad_to=rows, fill=-np.inf)
    return np.ascontiguousarray(np.asarray(g).astype(dtype))


def _check_sinks(sinks: Any, H: int, check: bool) -> np.ndarray:
    s = _as_array(sinks, "sinks")
    if s.dtype not in (np.float16, np.float32, np.float64):
        raise _err("sinks", f"must be a float array [H], got dtype {s.dtype}")
    if s.shape != (H,):
        raise _err("sinks", f"must have shape ({H},) [H], got {s.shape}")
    s32 = s.astype(np.float32)
    if check and not np.isfinite(s32).all():
        raise _err("sinks", "contains NaN/inf (nonfinite='raise')")
    return _to_ggml("sinks", s32)


# --- ggml context / graph ----------------------------------------------------------------------------------


def _nbytes(t: _gl.GgmlType, ne: tuple[int, ...]) -> int:
    n = t.row_bytes(ne[0])
    for d in ne[1:]:
        n *= d
    return n


class _Graph:
    """One ggml context (memory owned by numpy) holding the inputs, the graph and the result of one call."""

    def __init__(self, data_bytes: int):
        self.L = _gl.lib()
        L = self.L
        mem = data_bytes + _N_OBJECTS * (L.ggml_tensor_overhead() + _gl.GGML_MEM_ALIGN) + L.ggml_graph_overhead()
        mem += _SLACK
        self._owner, addr = _gl.aligned_buffer(mem)
        self.ctx = L.ggml_init(_gl.InitParams(mem_size=mem, mem_buffer=addr, no_alloc=False))
        if not self.ctx:
            raise OracleUnavailable("ggml_init returned NULL")

    def __enter__(self) -> "_Graph":
        return self

    def __exit__(self, *exc) -> None:
        self.L.ggml_free(self.ctx)
        self.ctx = None

    def new(self, tname: str, ne: tuple[int, ...], data: np.ndarray | None = None):
        t = _gl.TYPES[tname]
        ne4 = tuple(int(d) for d in ne) + (1,) * (4 - len(ne))
        tensor = self.L.ggml_new_tensor_4d(self.ctx, t.type_id, *ne4)
        if data is not None:
            data = np.ascontiguousarray(data)
            nb = self.L.ggml_nbytes(tensor)
            if nb != data.nbytes:  # internal consistency: never copy past the tensor
                raise AssertionError(f"ggml tensor {tname} {ne4} holds {nb} bytes, data has {data.nbytes}")
            C.memmove(self.L.ggml_get_data(tensor), data.ctypes.data, nb)
        return tensor

    def compute(self, out, n_threads: int) -> np.ndarray:
        """Build the graph ending in ``out``, run it on ``n_threads`` threads, return out (F32) row-major."""
        L = self.L
        gf = L.ggml_new_graph(self.ctx)
        L.ggml_build_forward_expand(gf, out)
        plan = L.ggml_graph_plan(gf, n_threads, None)
        work = None
        if plan.work_size:
            work, plan.work_data = _gl.aligned_buffer(plan.work_size)
        status = L.ggml_graph_compute(gf, C.byref(plan))
        del work
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        s = out.contents
        if s.type != _gl.TYPES["F32"].type_id or not L.ggml_is_contiguous(out):
            raise AssertionError("ggml result is not a contiguous F32 tensor")
        n = int(np.prod(s.ne))
        buf = (C.c_float * n).from_address(L.ggml_get_data(out))
        return np.ctypeslib.as_array(buf).copy().reshape(tuple(s.ne)[::-1])


# --- public ops --------------------------------------------------------------------------------------------


def quantize_chunk(x: Any, fmt: Any, *, nonfinite: str = "raise") -> np.ndarray:
    """ggml's ``ggml_quantize_chunk`` (the reference quantizers; F16/BF16 conversion; F32 copy).

    x float [..., n] (rows on the last axis, n a multiple of the format's block size) -> uint8
    [..., row_bytes]: ggml's blocks, bit for bit.
    """
    check = _check_policy(nonfinite)
    name = _format_name(fmt, "fmt")
    if name is None:
        raise _err("fmt", "required")
    t = _gl.TYPES[name]
    a = _as_array(x, "x")
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise _err("x", f"must be a float array, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[-1] < 1 or a.shape[-1] % t.block_size:
        raise _err("x", f"last axis must be a positive multiple of {name}'s block size {t.block_size}, "
                        f"got shape {a.shape}")
    x32 = np.ascontiguousarray(a, dtype=np.float32)
    if check and not np.isfinite(x32).all():
        raise _err("x", "contains NaN/inf (nonfinite='raise')")
    n = a.shape[-1]
    rows = x32.size // n
    out = np.empty(a.shape[:-1] + (t.row_bytes(n),), np.uint8)
    if rows:
        L = _gl.lib()
        got = L.ggml_quantize_chunk(t.type_id, x32.ctypes.data, out.ctypes.data, 0, rows, n, None)
        if got != out.nbytes:
            raise AssertionError(f"ggml_quantize_chunk wrote {got} bytes, expected {out.nbytes}")
    return out


def flash_attn_ext(q, k, v, *, k_format=None, v_format=None, scale, mask=None, softcap=0.0, max_bias=0.0,
                   sinks=None, n_threads=1, prec="default", mask_pad=1, nonfinite="raise") -> np.ndarray:
    """ggml's fused ``ggml_flash_attn_ext`` on the CPU backend (with ``add_sinks`` and ``set_prec``).

    q float32 [B, n_q, H, Dk]; k [B, n_kv, Hkv, Dk] and v [B, n_kv, Hkv, Dv] as float arrays (stored in
    ``k_format``/``v_format`` by ``ggml_quantize_chunk``), raw uint8 blocks or QuantArrays; mask float
    [B|1, H|1, n_q, n_kv] (sent as F16, rows padded to a multiple of ``mask_pad``); sinks [H];
    ``prec`` 'default' or 'f32'. Returns float32 [B, n_q, H, Dv].
    """
    check = _check_policy(nonfinite)
    q = _check_q(q, check)
    kk = _kv_operand(k, k_format, "k", "k", check)
    vv = _kv_operand(v, v_format, "v", "v", check)
    _check_kv_pair(q, kk, vv)
    return _run_fa(q, (kk,), (vv,), False, scale=scale, mask=mask, softcap=softcap, max_bias=max_bias,
                   sinks=sinks, n_threads=n_threads, prec=prec, mask_pad=mask_pad, check=check)


def _check_fa_params(scale, softcap, max_bias, mask, n_threads, prec):
    scale = _check_param("scale", scale)
    softcap = _check_param("softcap", softcap, min_value=0.0)
    max_bias = _check_param("max_bias", max_bias, min_value=0.0)
    if max_bias > 0 and mask is None:
        raise _err("max_bias", "ALiBi (max_bias > 0) needs a mask (ggml asserts); pass a zero mask")
    if prec not in _gl.PREC:
        raise _err("prec", f"must be one of {list(_gl.PREC)}, got {prec!r}")
    return scale, softcap, max_bias, _check_threads(n_threads)


def _run_fa(q, ks, vs, mixed, *, scale, mask, softcap, max_bias, sinks, n_threads, prec, mask_pad, check):
    """Build and run flash_attn_ext. ``ks``/``vs``: one operand each, or (``mixed``) the non-empty parts of
    the KV axis in order, each converted to F32, concatenated on the KV axis, converted to F16."""
    scale, softcap, max_bias, n_threads = _check_fa_params(scale, softcap, max_bias, mask, n_threads, prec)
    B, n_q, H, Dk = q.shape
    n_kv = sum(p.shape[1] for p in ks)
    Dv = vs[0].shape[3]
    m = _check_mask(mask, B, H, n_q, n_kv, mask_pad, check) if mask is not None else None
    s = _check_sinks(sinks, H, check) if sinks is not None else None

    F32, F16 = _gl.TYPES["F32"], _gl.TYPES["F16"]
    nbytes = _nbytes(F32, (Dk, n_q, H, B)) + _nbytes(F32, (Dv, H, n_q, B))
    for p in ks + vs:
        nbytes += p.data.nbytes
        if mixed:  # F32 copy + share of the F32 concat + F16 result
            nbytes += 2 * _nbytes(F32, p.ne) + _nbytes(F16, p.ne)
    nbytes += (m.nbytes if m is not None else 0) + (s.nbytes if s is not None else 0)
    nbytes += _N_OBJECTS * _gl.GGML_MEM_ALIGN

    with _Graph(nbytes) as g:
        L = g.L
        qt = g.new("F32", (Dk, n_q, H, B), _to_ggml("q", q))

        def operand(parts):
            ts = [g.new(p.gtype.name, p.ne, p.data) for p in parts]
            if not mixed:
                return ts[0]
            f32 = [L.ggml_cpy(g.ctx, t, g.new("F32", p.ne)) for t, p in zip(ts, parts)]
            cat = f32[0] if len(f32) == 1 else L.ggml_concat(g.ctx, f32[0], f32[1], 1)
            ne = tuple(cat.contents.ne)
            return L.ggml_cpy(g.ctx, cat, g.new("F16", ne))

        kt, vt = operand(ks), operand(vs)
        mt = g.new("F16", m.shape[::-1], m) if m is not None else None
        out = L.ggml_flash_attn_ext(g.ctx, qt, kt, vt, mt, scale, max_bias, softcap)
        L.ggml_flash_attn_ext_set_prec(out, _gl.PREC[prec])
        if s is not None:
            L.ggml_flash_attn_ext_add_sinks(out, g.new("F32", (H,), s))
        res = g.compute(out, n_threads)
    return _to_canonical("out", res)


def mul_mat(a, b, *, n_threads=1) -> np.ndarray:
    """ggml's ``ggml_mul_mat(a, b)`` of two float32 matrices: a [M, K], b [N, K] -> float32 [N, M], entry
    ``[n, m]`` = ``vec_dot_f32(K, a[m], b[n])`` (for F32 x F32 ggml's vec-dot type is F32: no conversion).

    On a build with llamafile (``library_info()['features']['llamafile']``) ggml hands F32 products whose K
    is a multiple of the SIMD width to tinyBLAS ``llamafile_sgemm`` instead of ``ggml_vec_dot_f32``."""
    A = _as_array(a, "a")
    Bm = _as_array(b, "b")
    for field, x in (("a", A), ("b", Bm)):
        if x.dtype != np.float32 or x.ndim != 2 or min(x.shape) < 1:
            raise _err(field, f"must be a non-empty 2-D float32 matrix, got {x.dtype} {x.shape}")
    if A.shape[1] != Bm.shape[1]:
        raise _err("b", f"row length {Bm.shape[1]} differs from a's {A.shape[1]}")
    n_threads = _check_threads(n_threads)
    F32 = _gl.TYPES["F32"]
    (M, K), N = A.shape, Bm.shape[0]
    nbytes = _nbytes(F32, (K, M)) + _nbytes(F32, (K, N)) + _nbytes(F32, (M, N)) + _N_OBJECTS * _gl.GGML_MEM_ALIGN
    with _Graph(nbytes) as g:
        at = g.new("F32", (K, M), A)
        bt = g.new("F32", (K, N), Bm)
        return g.compute(g.L.ggml_mul_mat(g.ctx, at, bt), n_threads).reshape(N, M)


def soft_max_attn(q, k, v, *, k_format=None, v_format=None, scale, mask=None, max_bias=0.0, n_threads=1,
                  mask_type="f16", mask_pad=1, nonfinite="raise") -> np.ndarray:
    """ggml's unfused attention: ``kq = mul_mat(k, q)``, ``soft_max_ext(kq, mask, scale, max_bias)``,
    ``kqv = mul_mat(cont(transpose(v)), kq)``, ``cont(permute(kqv, 0, 2, 1, 3))``.

    q float32 [B, n_q, H, Dk]; k [B, n_kv, Hkv, Dk] (float, raw blocks or QuantArray, any supported
    format); v float [B, n_kv, Hkv, Dv] in F32/F16/BF16 (ggml transposes V, which block formats cannot
    be); mask float [B|1, H|1, n_q, n_kv] sent as ``mask_type`` ('f16' or 'f32'). No softcap, no sinks.
    Returns float32 [B, n_q, H, Dv].
    """
    check = _check_policy(nonfinite)
    q = _check_q(q, check)
    kk = _kv_operand(k, k_format, "k", "k", check)
    vv = _kv_operand(v, v_format, "v", "v", check, allow_raw=False)
    if vv.gtype.name not in _FLOAT_FORMATS:
        raise _err("v_format", f"soft_max_attn needs V in {list(_FLOAT_FORMATS)} (ggml transposes V, which a "
                               f"block format cannot be), got {vv.gtype.name}")
    _check_kv_pair(q, kk, vv)
    scale = _check_param("scale", scale)
    max_bias = _check_param("max_bias", max_bias, min_value=0.0)
    if max_bias > 0 and mask is None:
        raise _err("max_bias", "ALiBi (max_bias > 0) needs a mask (ggml asserts); pass a zero mask")
    if mask_type not in ("f16", "f32"):
        raise _err("mask_type", f"must be 'f16' or 'f32', got {mask_type!r}")
    n_threads = _check_threads(n_threads)
    B, n_q, H, Dk = q.shape
    n_kv, Dv = kk.shape[1], vv.shape[3]
    mdt = np.float16 if mask_type == "f16" else np.float32
    m = _check_mask(mask, B, H, n_q, n_kv, mask_pad, check, mdt) if mask is not None else None

    F32 = _gl.TYPES["F32"]
    nbytes = kk.data.nbytes + 2 * vv.data.nbytes + (m.nbytes if m is not None else 0)
    nbytes += _nbytes(F32, (Dk, n_q, H, B)) + 2 * _nbytes(F32, (n_kv, n_q, H, B)) + 2 * _nbytes(F32, (Dv, n_q, H, B))
    nbytes += _N_OBJECTS * _gl.GGML_MEM_ALIGN
    with _Graph(nbytes) as g:
        L = g.L
        qt = g.new("F32", (Dk, n_q, H, B), _to_ggml("q", q))
        kt = g.new(kk.gtype.name, kk.ne, kk.data)
        vt = g.new(vv.gtype.name, vv.ne, vv.data)
        mt = g.new(mask_type.upper(), m.shape[::-1], m) if m is not None else None
        kq = L.ggml_mul_mat(g.ctx, kt, qt)
        kq = L.ggml_soft_max_ext(g.ctx, kq, mt, scale, max_bias)
        v_t = L.ggml_cont(g.ctx, L.ggml_transpose(g.ctx, vt))
        kqv = L.ggml_mul_mat(g.ctx, v_t, kq)
        out = L.ggml_cont(g.ctx, L.ggml_permute(g.ctx, kqv, 0, 2, 1, 3))
        res = g.compute(out, n_threads)
    return _to_canonical("out", res)


def mixed_flash_attn(q, k_cold, v_cold, k_hot, v_hot, *, cold_format=None, kv_order="cold,hot", scale,
                     mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=1, prec="default",
                     mask_pad=1, nonfinite="raise") -> np.ndarray:
    """flash_attn_ext over a mixed KV cache, as trace op ``mixed_flash_attn``: the cold K/V (block format)
    are dequantized to F32 (``ggml_cpy``), the hot K/V (F16) converted to F32, both concatenated on the KV
    axis in ``kv_order`` ('cold,hot' or 'hot,cold'), converted to F16, then ``ggml_flash_attn_ext``.

    q float32 [B, n_q, H, Dk]; k_cold [B, n_cold, Hkv, Dk], v_cold [B, n_cold, Hkv, Dv] (float arrays stored
    in ``cold_format`` -- one name, or a (k_format, v_format) pair -- raw blocks or QuantArrays);
    k_hot [B, n_hot, Hkv, Dk], v_hot [B, n_hot, Hkv, Dv] float (stored as F16); mask float
    [B|1, H|1, n_q, n_cold + n_hot] in ``kv_order``. Returns float32 [B, n_q, H, Dv].
    """
    check = _check_policy(nonfinite)
    q = _check_q(q, check)
    if isinstance(cold_format, (tuple, list)):
        if len(cold_format) != 2:
            raise _err("cold_format", f"must be a format or a (k_format, v_format) pair, got {cold_format!r}")
        kf, vf = cold_format
    else:
        kf = vf = cold_format
    kc = _kv_operand(k_cold, kf, "k_cold", "k_cold", check, allow_empty=True)
    vc = _kv_operand(v_cold, vf, "v_cold", "v_cold", check, allow_empty=True)
    kh = _kv_operand(k_hot, "F16", "k_hot", "k_hot", check, allow_empty=True)
    vh = _kv_operand(v_hot, "F16", "v_hot", "v_hot", check, allow_empty=True)
    _check_kv_pair(q, kc, vc, "k_cold", "v_cold")
    _check_kv_pair(q, kh, vh, "k_hot", "v_hot")
    if vh.shape[3] != vc.shape[3]:
        raise _err("v_hot", f"Dv {vh.shape[3]} != v_cold's Dv {vc.shape[3]}")
    if kh.shape[2] != kc.shape[2]:
        raise _err("k_hot", f"Hkv {kh.shape[2]} != k_cold's Hkv {kc.shape[2]}")
    if kv_order not in ("cold,hot", "hot,cold"):
        raise _err("kv_order", f"must be 'cold,hot' or 'hot,cold', got {kv_order!r}")
    if kc.shape[1] + kh.shape[1] < 1:
        raise _err("k_cold", "n_cold + n_hot must be >= 1")
    pairs = [(kc, vc), (kh, vh)] if kv_order == "cold,hot" else [(kh, vh), (kc, vc)]
    pairs = [p for p in pairs if p[0].shape[1] > 0]
    ks, vs = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return _run_fa(q, ks, vs, True, scale=scale, mask=mask, softcap=softcap, max_bias=max_bias,
                   sinks=sinks, n_threads=n_threads, prec=prec, mask_pad=mask_pad, check=check)
