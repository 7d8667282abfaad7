"""Thin ctypes bindings to the ggml C libraries of the ``libggml-python`` wheel (the live-ggml oracle's ABI).

Only what :mod:`jaxkv.oracles.ggml` needs is bound. The ABI is the one of the headers shipped in the wheel
(``site-packages/libggml/include/ggml.h``, ``ggml-cpu.h``): ``struct ggml_init_params``, the
``struct ggml_tensor`` layout, the ``ggml_type`` / ``ggml_prec`` enum values and the function signatures
below. The libraries are loaded lazily, on the first call of :func:`lib`; a missing wheel or a library whose
layout does not match this module raises :class:`OracleUnavailable` (never an import error).

``JAXKV_GGML_LIB_DIR`` may name another directory holding ``libggml-base.so`` and ``libggml-cpu.so`` of the
same ABI (for instance a native AVX-512 build); by default the wheel's ``libggml/lib64`` is used.

Nothing here validates op inputs: ggml aborts the process on a failed ``GGML_ASSERT``. Callers go through
:mod:`jaxkv.oracles.ggml`, which checks every input first.
"""

from __future__ import annotations

import ctypes as C
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import threading

import numpy as np

from jaxkv import formats


class OracleUnavailable(RuntimeError):
    """The ggml libraries cannot be used here (wheel absent, library missing, ABI mismatch)."""


# --- data tables --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GgmlType:
    """One ggml storage type: enum value, elements per block, bytes per block."""

    name: str
    type_id: int
    block_size: int
    type_size: int

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of ``n`` elements (``n`` a multiple of ``block_size``)."""
        return (n // self.block_size) * self.type_size


#: the oracle's storage types: the K/V types (``jaxkv.formats.KV_TYPES``) and BF16, named in ggml's spelling;
#: enum values and block sizes from the one type table (``jaxkv.formats``: ggml.h / ggml-common.h facts),
#: checked against the loaded library (``_check_abi``).
TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (GgmlType(formats.ggml_name(f), f.type_id, f.block_size, f.block_bytes)
              for f in (formats.FORMATS[n] for n in formats.KV_TYPES + ("bf16",)))
}

# enum ggml_prec
PREC = {"default": 0, "f32": 10}

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_MAX_N_THREADS = 512
GGML_MEM_ALIGN = 16
BUFFER_ALIGN = 64  # alignment of the buffers this module hands to ggml (>= GGML_MEM_ALIGN, one cache line)

# x86 / ARM feature queries of ggml-cpu.h. In ggml-cpu they report how the library was compiled
# (``#if defined(__AVX2__)`` ...), not what the host CPU supports.
CPU_FEATURES = (
    "sse3", "ssse3", "avx", "avx_vnni", "avx2", "bmi2", "f16c", "fma", "avx512", "avx512_vbmi",
    "avx512_vnni", "avx512_bf16", "amx_int8", "neon", "arm_fma", "fp16_va", "dotprod", "matmul_int8",
    "sve", "sme", "riscv_v", "vsx", "wasm_simd", "llamafile",
)  # fmt: skip


# --- ABI structs --------------------------------------------------------------------------------------


class InitParams(C.Structure):
    """``struct ggml_init_params``."""

    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class Tensor(C.Structure):
    """``struct ggml_tensor`` (ggml.h of the wheel); read-only use: ``ne``, ``nb``, ``type``, ``data``."""

    _fields_ = [
        ("type", C.c_int),
        ("buffer", C.c_void_p),
        ("ne", C.c_int64 * GGML_MAX_DIMS),
        ("nb", C.c_size_t * GGML_MAX_DIMS),
        ("op", C.c_int),
        ("op_params", C.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", C.c_int32),
        ("src", C.c_void_p * GGML_MAX_SRC),
        ("view_src", C.c_void_p),
        ("view_offs", C.c_size_t),
        ("data", C.c_void_p),
        ("name", C.c_char * GGML_MAX_NAME),
        ("extra", C.c_void_p),
        ("padding", C.c_char * 8),
    ]


class CPlan(C.Structure):
    """``struct ggml_cplan`` (ggml-cpu.h of the wheel)."""

    _fields_ = [
        ("work_size", C.c_size_t),
        ("work_data", C.c_void_p),
        ("n_threads", C.c_int),
        ("threadpool", C.c_void_p),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("use_ref", C.c_bool),
    ]


TensorP = C.POINTER(Tensor)
_ctx, _graph, _vp, _f, _i, _i64, _sz = C.c_void_p, C.c_void_p, C.c_void_p, C.c_float, C.c_int, C.c_int64, C.c_size_t

# name -> (library, restype, argtypes)
_SIGNATURES = {
    "ggml_version": ("base", C.c_char_p, []),
    "ggml_commit": ("base", C.c_char_p, []),
    "ggml_tensor_overhead": ("base", _sz, []),
    "ggml_graph_overhead": ("base", _sz, []),
    "ggml_blck_size": ("base", _i64, [_i]),
    "ggml_type_size": ("base", _sz, [_i]),
    "ggml_row_size": ("base", _sz, [_i, _i64]),
    "ggml_nbytes": ("base", _sz, [TensorP]),
    "ggml_is_contiguous": ("base", C.c_bool, [TensorP]),
    "ggml_get_data": ("base", _vp, [TensorP]),
    "ggml_init": ("base", _ctx, [InitParams]),
    "ggml_free": ("base", None, [_ctx]),
    "ggml_used_mem": ("base", _sz, [_ctx]),
    "ggml_new_tensor_1d": ("base", TensorP, [_ctx, _i, _i64]),
    "ggml_new_tensor_2d": ("base", TensorP, [_ctx, _i, _i64, _i64]),
    "ggml_new_tensor_3d": ("base", TensorP, [_ctx, _i, _i64, _i64, _i64]),
    "ggml_new_tensor_4d": ("base", TensorP, [_ctx, _i, _i64, _i64, _i64, _i64]),
    "ggml_quantize_chunk": ("base", _sz, [_i, _vp, _vp, _i64, _i64, _i64, _vp]),
    "ggml_quantize_requires_imatrix": ("base", C.c_bool, [_i]),
    "ggml_flash_attn_ext": ("base", TensorP, [_ctx, TensorP, TensorP, TensorP, TensorP, _f, _f, _f]),
    "ggml_flash_attn_ext_set_prec": ("base", None, [TensorP, _i]),
    "ggml_flash_attn_ext_add_sinks": ("base", None, [TensorP, TensorP]),
    "ggml_soft_max_ext": ("base", TensorP, [_ctx, TensorP, TensorP, _f, _f]),
    "ggml_mul_mat": ("base", TensorP, [_ctx, TensorP, TensorP]),
    "ggml_permute": ("base", TensorP, [_ctx, TensorP, _i, _i, _i, _i]),
    "ggml_transpose": ("base", TensorP, [_ctx, TensorP]),
    "ggml_cont": ("base", TensorP, [_ctx, TensorP]),
    "ggml_cpy": ("base", TensorP, [_ctx, TensorP, TensorP]),
    "ggml_concat": ("base", TensorP, [_ctx, TensorP, TensorP, _i]),
    "ggml_new_graph": ("base", _graph, [_ctx]),
    "ggml_build_forward_expand": ("base", None, [_graph, TensorP]),
    "ggml_cpu_init": ("cpu", None, []),
    "ggml_graph_plan": ("cpu", CPlan, [_graph, _i, _vp]),
    "ggml_graph_compute": ("cpu", _i, [_graph, C.POINTER(CPlan)]),
    "ggml_graph_compute_with_ctx": ("cpu", _i, [_ctx, _graph, _i]),
}
for _feat in CPU_FEATURES:
    _SIGNATURES[f"ggml_cpu_has_{_feat}"] = ("cpu", _i, [])


# --- loading ------------------------------------------------------------------------------------------


def lib_dir() -> pathlib.Path:
    """Directory the ggml libraries are loaded from (``JAXKV_GGML_LIB_DIR`` or the wheel's ``lib64``)."""
    env = os.environ.get("JAXKV_GGML_LIB_DIR")
    if env:
        return pathlib.Path(env)
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        raise OracleUnavailable(
            "ggml oracle unavailable: the 'libggml-python' wheel is not installed "
            "(pip install 'libggml-python>=0.20.2', or set JAXKV_GGML_LIB_DIR)"
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    for sub in ("lib64", "lib"):
        if (root / sub / "libggml-base.so").exists():
            return root / sub
    raise OracleUnavailable(f"ggml oracle unavailable: no libggml-base.so under {root}")


def wheel_version(directory) -> str | None:
    """The ``libggml-python`` wheel version when ``directory`` is that wheel's library directory, else None
    (another build loaded through ``JAXKV_GGML_LIB_DIR`` is not the wheel, whatever is installed)."""
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = pathlib.Path(next(iter(spec.submodule_search_locations))).resolve()
    d = pathlib.Path(directory).resolve()
    if d != root and root not in d.parents:
        return None
    try:
        return importlib.metadata.version("libggml-python")
    except importlib.metadata.PackageNotFoundError:
        return None


class _Lib:
    """The loaded libraries with typed functions as attributes (``lib().ggml_init(...)``)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        handles = {}
        for key, name in (("base", "libggml-base.so"), ("cpu", "libggml-cpu.so")):
            path = directory / name
            try:
                handles[key] = C.CDLL(str(path), mode=C.RTLD_GLOBAL)
            except OSError as e:
                raise OracleUnavailable(f"ggml oracle unavailable: cannot load {path}: {e}") from None
        for fname, (key, restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(handles[key], fname)
            except AttributeError:
                raise OracleUnavailable(f"ggml oracle unavailable: {fname} not exported by {key} library") from None
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, fname, fn)
        self.ggml_cpu_init()
        self._check_abi()

    def _check_abi(self) -> None:
        """Fail early (OracleUnavailable) if the type table or the tensor struct layout disagree with ggml."""
        for t in TYPES.values():
            got = (int(self.ggml_blck_size(t.type_id)), int(self.ggml_type_size(t.type_id)))
            if got != (t.block_size, t.type_size):
                raise OracleUnavailable(f"ggml ABI mismatch: type {t.name} has (block, bytes) {got}")
        params = InitParams(mem_size=1 << 16, mem_buffer=None, no_alloc=False)
        ctx = self.ggml_init(params)
        if not ctx:
            raise OracleUnavailable("ggml_init failed")
        try:
            t = self.ggml_new_tensor_4d(ctx, TYPES["F32"].type_id, 2, 3, 4, 5)
            s = t.contents
            ok = (
                s.type == 0
                and tuple(s.ne) == (2, 3, 4, 5)
                and tuple(s.nb) == (4, 8, 24, 96)
                and s.data == self.ggml_get_data(t)
                and self.ggml_nbytes(t) == 480
            )
        finally:
            self.ggml_free(ctx)
        if not ok:
            raise OracleUnavailable("ggml ABI mismatch: struct ggml_tensor layout differs from ggml.h of 0.20.2")


_LOCK = threading.Lock()


@functools.cache
def _load(directory: str) -> _Lib:
    return _Lib(pathlib.Path(directory))


def lib() -> _Lib:
    """The loaded ggml libraries (loaded on first use; raises OracleUnavailable when they cannot be)."""
    with _LOCK:
        return _load(str(lib_dir()))


def available() -> bool:
    """Whether the ggml libraries load here."""
    try:
        lib()
    except OracleUnavailable:
        return False
    return True


def aligned_buffer(nbytes: int) -> tuple[np.ndarray, int]:
    """A numpy byte buffer holding at least ``nbytes`` bytes at a ``BUFFER_ALIGN``-aligned address.

    Returns ``(owner, address)``; keep ``owner`` alive while ggml uses the address. Raises MemoryError
    (catchable) rather than letting ggml's own allocation fail with an abort.
    """
    owner = np.empty(int(nbytes) + BUFFER_ALIGN, dtype=np.uint8)
    base = owner.ctypes.data
    return owner, base + (-base) % BUFFER_ALIGN
