"""Attention traces: read / write trace v1 (GGUF), foreign dumps, `TraceError`.

A trace is one GGUF file with the inputs and the output of one attention call (docs/trace-format.md).
`load` returns a `Trace` holding the operands in jaxkv's canonical layout::

    q    float32 [B, n_q, H, Dk]
    k, v float32 | float16 | formats.QuantArray   [B, n_kv, Hkv, D]     (op flash_attn_ext, soft_max_attn)
    k_cold, v_cold QuantArray, k_hot, v_hot float16  [B, n, Hkv, D]     (op mixed_flash_attn)
    mask float32 [1|B, 1|H, n_q, n_kv] or None (padding rows dropped; F16 converted exactly)
    sinks float32 [H] or None,  out float32 [B, n_q, H, Dv]

Stored tensors are memory-mapped: the canonical arrays are read-only numpy views of the file (a
transposition is a view too) and nothing is copied until used, except the (small) mask.

Every problem with a file -- truncation, corruption, a missing tensor, inconsistent shapes, a bad
metadata type or value -- raises `TraceError` (a ValueError) naming the file, the tensor or key, what
was expected and what was found. The GGUF structure is checked with bounded reads before the ``gguf``
package parses it, so no corrupted count or length can make the reader loop or allocate without bound.

Resource bounds (docs/trace-format.md, Errors and bounds): only regular files are opened (a FIFO or a
device is refused before any read); every stored tensor lies inside the file; a view has no more elements
than the stored tensor it reads (no zero counts, so a broadcast through ``nb = 0`` cannot multiply the
file's content); and the attention call -- the operands and the logits ``B*H*n_q*n_kv`` -- has at most
``max_elements`` elements (default `MAX_ELEMENTS`). Text taken from a file is escaped in messages.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import math
import os
import pathlib
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import gguf
import numpy as np

from jaxkv import formats as F
from jaxkv import layout as L
from jaxkv import ops as _ops
from jaxkv.attention import attention
from jaxkv.budget import nmse
from jaxkv.textsafe import escape

__all__ = ["TraceError", "Trace", "OPS", "load", "load_steps", "save", "ALIASES", "MAX_ELEMENTS", "check_file"]

KV_ORDERS = ("cold,hot", "hot,cold")
QUANT_TYPES = F.BLOCK_KV_TYPES
_TENSOR_ROLES = ("q", "k", "v", "k_cold", "v_cold", "k_hot", "v_hot", "mask", "sinks", "out")


def __getattr__(name):
    if name == "OPS":  # the registered op names (jaxkv.ops.OPS), read when asked: a test may register one
        return tuple(_ops.OPS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _op(name: str) -> "_ops.Op":
    return _ops.OPS[name]


class TraceError(ValueError):
    """A trace file that cannot be read as a valid trace (message names file, tensor/key, expected, found)."""


# ----------------------------------------------------------------------------------------------------
# the Trace


@dataclass(frozen=True, eq=False)
class Trace:
    """One attention call in canonical layout (module docstring). ``types`` maps each present tensor role
    to its ggml type name; ``views`` the roles read through a view (`layout.View` over the stored bytes);
    ``metadata`` every GGUF key of the file (python values) plus, for foreign dumps, what the loader
    inferred (``jaxkv.*`` keys)."""

    path: str | None
    op: str
    producer: str
    scale: float
    max_bias: float
    softcap: float
    n_threads: int
    kv_order: str | None
    metadata: dict
    q: Any
    out: Any
    k: Any = None
    v: Any = None
    k_cold: Any = None
    v_cold: Any = None
    k_hot: Any = None
    v_hot: Any = None
    mask: Any = None
    sinks: Any = None
    types: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    v_transposed: bool = False

    # shapes -------------------------------------------------------------------------------------------
    @property
    def B(self) -> int:
        """batch"""
        return self.q.shape[0]

    @property
    def n_q(self) -> int:
        """query rows"""
        return self.q.shape[1]

    @property
    def n_head(self) -> int:
        """query heads H"""
        return self.q.shape[2]

    @property
    def Dk(self) -> int:
        """q/k head size"""
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        """v/out head size"""
        return self.out.shape[3]

    @property
    def n_head_kv(self) -> int:
        """KV heads Hkv"""
        return (self.k if self.k is not None else self.k_cold).shape[2]

    @property
    def n_kv(self) -> int:
        """KV tokens (mixed: cold + hot)"""
        if self.k is None:
            return self.k_cold.shape[1] + self.k_hot.shape[1]
        return self.k.shape[1]

    def dense_kv(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) as dense ``dtype`` arrays in canonical order [B, n_kv, Hkv, D]; quantized ones are
        dequantized (formats.dequantize, float32, exact), mixed caches concatenated in ``kv_order``
        (the operands as stored: the F16 rounding of the concatenation is the op's rule, not applied here)."""
        def dense(x):
            if F.is_quant(x):
                return np.asarray(x.dequantize(), dtype=np.float32).astype(dtype)
            return np.asarray(x).astype(dtype)
        if self.k is not None:
            return dense(self.k), dense(self.v)
        parts = {"cold": (self.k_cold, self.v_cold), "hot": (self.k_hot, self.v_hot)}
        order = (self.kv_order or "cold,hot").split(",")
        k = np.concatenate([dense(parts[o][0]) for o in order], axis=1)
        v = np.concatenate([dense(parts[o][1]) for o in order], axis=1)
        return k, v

    def with_kv_order(self, kv_order: str) -> "Trace":
        """A mixed trace with its mask columns reordered for ``kv_order`` ('cold,hot' or 'hot,cold')."""
        if kv_order not in KV_ORDERS:
            raise ValueError(f"kv_order: expected one of {KV_ORDERS}, got {kv_order!r}")
        if self.kv_order is None or kv_order == self.kv_order:
            return self
        mask = self.mask
        if mask is not None:
            n_first = (self.k_cold if self.kv_order == "cold,hot" else self.k_hot).shape[1]
            mask = np.concatenate([mask[..., n_first:], mask[..., :n_first]], axis=-1)
        return dataclasses.replace(self, kv_order=kv_order, mask=mask)

    def operands(self) -> dict:
        """The present tensor roles -> canonical arrays."""
        return {r: getattr(self, r) for r in _TENSOR_ROLES if getattr(self, r) is not None}


# ----------------------------------------------------------------------------------------------------
# bounded GGUF structure scan

_GGUF_MAGIC = b"GGUF"
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_T_STRING, _T_ARRAY = 8, 9
_MAX_STR = 1 << 16          # key names, tensor names, string values
_MAX_ARRAY = 1 << 16        # metadata array elements (traces hold ne/nb arrays of 4)
_MAX_DIMS = 4               # GGML_MAX_DIMS
_MAX_ELEMS = 1 << 40
#: default bound on the attention call a trace describes: elements of each operand and of the logits
#: B*H*n_q*n_kv (4x the largest shared/ggml trace; 2^25 float64 logits are 256 MiB)
MAX_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ne: tuple[int, int, int, int]
    type: str
    start: int      # absolute byte offset in the file
    nbytes: int


class _Scanner:
    def __init__(self, buf: np.ndarray, path: str):
        self.b = buf
        self.n = int(buf.size)
        self.path = path
        self.pos = 0

    def fail(self, what: str, expected: str, found: str):
        raise TraceError(f"{self.path}: {what}: expected {expected}, found {found}")

    def need(self, k: int, what: str):
        if k < 0 or self.pos + k > self.n:
            self.fail(what, f"{k} more bytes at offset {self.pos}", f"end of file at {self.n} (truncated)")

    def uint(self, size: int, what: str) -> int:
        self.need(size, what)
        v = int.from_bytes(bytes(self.b[self.pos:self.pos + size]), "little")
        self.pos += size
        return v

    def string(self, what: str) -> str:
        ln = self.uint(8, f"{what} length")
        if ln > _MAX_STR:
            self.fail(f"{what} length", f"<= {_MAX_STR}", str(ln))
        self.need(ln, what)
        raw = bytes(self.b[self.pos:self.pos + ln])
        self.pos += ln
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(what, "UTF-8 text", repr(raw[:40]))

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALAR_SIZE:
            return self.uint(_SCALAR_SIZE[vtype], f"key {key!r} value")
        if vtype == _T_STRING:
            return self.string(f"key {key!r} string")
        if vtype == _T_ARRAY:
            if depth:
                self.fail(f"key {key!r}", "no nested arrays", "an array of arrays")
            sub = self.uint(4, f"key {key!r} array type")
            count = self.uint(8, f"key {key!r} array length")
            if sub not in _SCALAR_SIZE and sub != _T_STRING:
                self.fail(f"key {key!r} array type", "a GGUF scalar or string type", str(sub))
            if count > _MAX_ARRAY:
                self.fail(f"key {key!r} array length", f"<= {_MAX_ARRAY}", str(count))
            if sub in _SCALAR_SIZE:
                self.need(count * _SCALAR_SIZE[sub], f"key {key!r} array data")
                self.pos += count * _SCALAR_SIZE[sub]
            else:
                self.need(count * 8, f"key {key!r} array data")
                for _ in range(count):
                    self.string(f"key {key!r} array string")
            return None
        self.fail(f"key {key!r} type", "a GGUF value type (0..12)", str(vtype))


def _scan(buf: np.ndarray, path: str) -> tuple[list[_TensorInfo], int]:
    """Walk the GGUF header with bounds checks; returns the tensor infos and the data start."""
    s = _Scanner(buf, path)
    s.need(4, "GGUF magic")
    magic = bytes(buf[:4])
    if magic != _GGUF_MAGIC:
        s.fail("GGUF magic", repr(_GGUF_MAGIC), repr(magic))
    s.pos = 4
    version = s.uint(4, "GGUF version")
    if version not in (2, 3):
        s.fail("GGUF version", "2 or 3 (little-endian)", str(version))
    n_tensors = s.uint(8, "tensor count")
    n_kv = s.uint(8, "metadata key count")
    # every key needs >= 13 bytes (length, >=1 char, type, 1-byte value); every tensor info >= 29
    if n_kv * 13 > s.n - s.pos:
        s.fail("metadata key count", f"<= {(s.n - s.pos) // 13} for a file of {s.n} bytes", str(n_kv))
    if n_tensors * 29 > s.n - s.pos:
        s.fail("tensor count", f"<= {(s.n - s.pos) // 29} for a file of {s.n} bytes", str(n_tensors))
    alignment = 32
    seen: set[str] = set()
    for _ in range(n_kv):
        key = s.string("metadata key")
        if key in seen:
            s.fail(f"key {key!r}", "unique keys", "a duplicate")
        seen.add(key)
        vtype = s.uint(4, f"key {key!r} type")
        v = s.value(vtype, key)
        if key == "general.alignment":
            if vtype != 4 or v == 0 or v & (v - 1):
                s.fail("key 'general.alignment'", "a u32 power of two", f"type {vtype} value {v}")
            alignment = v
    infos = []
    for _ in range(n_tensors):
        name = s.string("tensor name")
        n_dims = s.uint(4, f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= _MAX_DIMS:
            s.fail(f"tensor {name!r} n_dims", f"1..{_MAX_DIMS}", str(n_dims))
        ne = [s.uint(8, f"tensor {name!r} ne[{i}]") for i in range(n_dims)] + [1] * (4 - n_dims)
        tid = s.uint(4, f"tensor {name!r} type")
        off = s.uint(8, f"tensor {name!r} offset")
        try:
            fmt = F.get_format(tid)
        except ValueError:
            s.fail(f"tensor {name!r} type", "a supported ggml type (f32, f16, q4_0, q4_1, q5_0, q5_1, "
                   "q8_0, iq4_nl, bf16)", f"type id {tid}")
        if any(a < 1 for a in ne) or math.prod(ne) > _MAX_ELEMS:
            s.fail(f"tensor {name!r} ne", f"positive counts with at most 2^40 elements", str(ne))
        if ne[0] % fmt.block_size:
            s.fail(f"tensor {name!r} ne[0]", f"a multiple of the {fmt.name} block size {fmt.block_size}",
                   str(ne[0]))
        if any(name == i[0] for i in infos):
            s.fail(f"tensor {name!r}", "unique tensor names", "a duplicate")
        infos.append((name, tuple(ne), fmt, off))
    data_start = -(-s.pos // alignment) * alignment
    out = []
    for name, ne, fmt, off in infos:
        nbytes = math.prod(ne) // fmt.block_size * fmt.block_bytes
        if off % alignment:
            s.fail(f"tensor {name!r} offset", f"a multiple of the alignment {alignment}", str(off))
        if data_start + off + nbytes > s.n:
            s.fail(f"tensor {name!r} data", f"{nbytes} bytes at {data_start + off}",
                   f"a file of {s.n} bytes (truncated or bad offset/ne)")
        out.append(_TensorInfo(name, ne, fmt.name, data_start + off, nbytes))
    return out, data_start


def _regular(p: str) -> None:
    """Raise TraceError unless ``p`` is a regular file (no FIFO, device, directory; never opened here)."""
    try:
        st = os.stat(p)
    except OSError as e:
        why = {errno.ENOENT: "none", errno.ELOOP: "a symbolic link loop", errno.ENAMETOOLONG: "a name too long "
               "for the file system", errno.EACCES: "no permission", errno.ENOTDIR: "a path through a non-directory"
               }.get(e.errno, e.strerror or type(e).__name__)
        raise TraceError(f"{escape(p)}: file: expected an existing trace file, found {why}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
        raise TraceError(f"{escape(p)}: file: expected a regular trace file, found {kind}")


def check_file(path) -> None:
    """Check ``path``'s GGUF structure with bounded reads (regular file, magic, version, counts, lengths,
    types, alignment, tensors inside the file) without interpreting it as a trace; raises TraceError.
    Readers that parse GGUF themselves (jaxkv.oracles.ggml_replay) call this first."""
    _open(path)


def _open(path) -> tuple[str, np.ndarray, list[_TensorInfo], dict]:
    """Memory-map, scan and parse the metadata through gguf.GGUFReader; returns (path, bytes, infos,
    fields) where fields maps key -> (value, [GGUFValueType names])."""
    p = str(path)
    _regular(p)
    if os.path.getsize(p) == 0:
        raise TraceError(f"{p}: file: expected a GGUF file, found an empty file")
    try:
        mm = np.memmap(p, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise TraceError(f"{p}: file: expected a readable file, found {e}") from None
    infos, _ = _scan(mm, p)
    try:
        r = gguf.GGUFReader(p)
        fields = {}
        for k, f in r.fields.items():
            if k.startswith("GGUF."):
                continue
            fields[k] = (f.contents(), [t.name for t in f.types])
        names = [t.name for t in r.tensors]
    except TraceError:
        raise
    except Exception as e:  # gguf's own errors, on a file the scan accepted
        raise TraceError(f"{p}: GGUF: expected a file gguf can parse, found {type(e).__name__}: {e}") from None
    if names != [i.name for i in infos]:
        raise TraceError(f"{p}: tensors: expected {[i.name for i in infos]} (scan), found {names} (gguf)")
    return p, mm, infos, fields


# ----------------------------------------------------------------------------------------------------
# names

#: normalised foreign name -> role (normalisation: drop "_step_N", "(view)"-style annotations, case and
#: a layer suffix such as "-0", "_l0", ".0")
ALIASES: dict[str, str] = {}
for _role, _names in {
    "out": ("out", "kqv_out", "kqv", "attn_out", "attn_output", "fattn_out", "result", "o"),
    "q": ("q", "qcur", "query", "queries"),
    "k": ("k", "kcur", "cache_k", "key", "keys"),
    "v": ("v", "vcur", "cache_v", "value", "values"),
    "mask": ("mask", "kq_mask", "attn_mask", "kq_mask_swa"),
    "sinks": ("sinks", "sink", "attn_sinks"),
    "k_hot": ("k_hot", "khot", "cache_k_hot"),
    "v_hot": ("v_hot", "vhot", "cache_v_hot"),
    "k_cold": ("k_cold", "kcold", "k_quant", "kquant", "cache_k_quant", "cache_k_cold"),
    "v_cold": ("v_cold", "vcold", "v_quant", "vquant", "cache_v_quant", "cache_v_cold"),
}.items():
    for _n in _names:
        ALIASES[_n] = _role


def _normalise(name: str) -> str:
    n = re.sub(r"_step_\d+$", "", name)
    n = re.sub(r"\s*\([^)]*\)", "", n).strip().lower()
    return re.sub(r"(?:[-_.]l?|(?<=[a-z])l)\d+$", "", n) if not n.isdigit() else n


def _assign(path: str, tensor_names: Sequence[str], names: Mapping[str, str] | None) -> dict[str, str]:
    """role -> file tensor name: explicit ``names`` (either direction), exact role names, then aliases."""
    present = set(tensor_names)
    roles: dict[str, str] = {}
    for a, b in (names or {}).items():
        if a in present and b in _TENSOR_ROLES:
            role, tname = b, a
        elif b in present and a in _TENSOR_ROLES:
            role, tname = a, b
        else:
            raise TraceError(f"{path}: names: expected pairs of a tensor in the file and a role "
                             f"{_TENSOR_ROLES}, found {a!r}: {b!r} (tensors: {sorted(present)})")
        roles[role] = tname
    taken = set(roles.values())
    for t in tensor_names:
        if t in _TENSOR_ROLES and t not in taken and t not in roles:
            roles[t] = t
            taken.add(t)
    for t in tensor_names:
        if t in taken:
            continue
        role = ALIASES.get(_normalise(t))
        if role is None:
            continue
        if role in roles:
            raise TraceError(f"{path}: tensor {t!r}: expected one tensor for role {role!r}, found it and "
                             f"{roles[role]!r} (pass names=... to choose)")
        roles[role] = t
        taken.add(t)
    # a cache with a quantized (cold) part calls its F16 part plain k/v
    for kind in ("k", "v"):
        if f"{kind}_cold" in roles and kind in roles and f"{kind}_hot" not in roles:
            roles[f"{kind}_hot"] = roles.pop(kind)
    return roles


# ----------------------------------------------------------------------------------------------------
# metadata


_GT = {"u32": ["UINT32"], "f32": ["FLOAT32"], "str": ["STRING"], "bool": ["BOOL"], "u64": ["UINT64"],
       "i64[]": ["ARRAY", "INT64"]}


def _meta(path, fields, key, kind, required=True, default=None):
    if key not in fields:
        if required:
            raise TraceError(f"{path}: key {key!r}: expected a {kind} value, found no such key")
        return default
    val, types = fields[key]
    if types != _GT[kind] and not (kind == "i64[]" and types == ["ARRAY"]):
        raise TraceError(f"{path}: key {key!r}: expected type {kind}, found {'/'.join(types)}")
    return val


def _finite(path, key, v, lo=None):
    if not isinstance(v, (int, float)) or not math.isfinite(v) or (lo is not None and v < lo):
        rng = "finite" if lo is None else f"finite and >= {lo}"
        raise TraceError(f"{path}: key {key!r}: expected a {rng} number, found {v!r}")
    return float(v)


def _views_from_meta(path, fields, infos_by_role: dict[str, _TensorInfo]) -> dict[str, L.View]:
    views = {}
    pat = re.compile(r"^trace\.view\.(.+)\.(ne|nb|offset)$")
    found: dict[str, dict] = {}
    for key in fields:
        m = pat.match(key)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = key
    for role, keys in found.items():
        if role not in infos_by_role:
            raise TraceError(f"{path}: key 'trace.view.{role}.*': expected a view of a tensor in the file, "
                             f"found no tensor {role!r}")
        info = infos_by_role[role]
        for part in ("ne", "nb"):
            if part not in keys:
                raise TraceError(f"{path}: key 'trace.view.{role}.{part}': expected an i64[4] array with the "
                                 f"view's other keys, found no such key")
        ne = _meta(path, fields, keys["ne"], "i64[]")
        nb = _meta(path, fields, keys["nb"], "i64[]")
        off = _meta(path, fields, keys["offset"], "u64") if "offset" in keys else 0
        for k, arr in ((keys["ne"], ne), (keys["nb"], nb)):
            if not isinstance(arr, list) or len(arr) != 4 or not all(isinstance(a, int) for a in arr):
                raise TraceError(f"{path}: key {k!r}: expected 4 int64, found {arr!r}")
        if any(a < 1 for a in ne):
            raise TraceError(f"{path}: key {keys['ne']!r}: expected positive counts (an operand has no empty "
                             f"axis), found {ne}")
        stored = math.prod(info.ne)
        if math.prod(ne) > stored:  # a view cannot hold more elements than the bytes it reads (broadcasts)
            raise TraceError(f"{path}: key {keys['ne']!r}: expected at most the {stored} elements of the stored "
                             f"tensor {info.name!r} (a view never repeats stored bytes), found {ne} = "
                             f"{math.prod(ne)} elements")
        try:
            v = L.View(info.type, tuple(ne), tuple(nb), int(off))
            L.validate(v, info.nbytes, f"trace.view.{role}")
        except ValueError as e:
            raise TraceError(f"{path}: view of tensor {info.name!r}: {e}") from None
        views[role] = v
    return views


# ----------------------------------------------------------------------------------------------------
# operands


def _operand(path: str, mm: np.ndarray, info: _TensorInfo, view: L.View, role: str):
    """ggml bytes through ``view`` -> (ggml-order array: float, or uint8 raw rows for block types)."""
    buf = mm[info.start:info.start + info.nbytes]
    try:
        return L.resolve_raw(buf, view, f"tensor {info.name!r}")
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None


def _canon(role: str, arr, type_: str, n: int):
    """ggml-order array of a role -> canonical (QuantArray for block types)."""
    if type_ in QUANT_TYPES:
        return F.QuantArray(raw=L.ggml_to_canonical(role, arr), fmt=type_, n=n)
    return L.ggml_to_canonical(role, arr)


def _build(path: str, mm, infos: dict[str, _TensorInfo], views: dict[str, L.View], *, op: str,
           producer: str, scale: float | None, max_bias: float, softcap: float, n_threads: int,
           kv_order: str | None, v_transposed: bool, metadata: dict, out_view: L.View | None = None,
           file_tensors: Sequence[str] = (), max_elements: int = MAX_ELEMENTS) -> Trace:
    """Validate the operand shapes (ggml ne of each view) and build the canonical Trace."""
    def fail(what, expected, found):
        raise TraceError(f"{path}: {what}: expected {expected}, found {found}")

    spec = _op(op)
    mixed = bool(spec.kv_regions)
    for r in spec.required:
        if r not in infos:
            fail(f"tensor {r!r}", f"present for op {op!r} (other names: load(..., names={{file name: role}}))",
                 f"file tensors {list(file_tensors) or sorted(i.name for i in infos.values())}")
    extra = [r for r in _TENSOR_ROLES if r in infos and r not in spec.roles]
    if extra:
        why = spec.absent_why.get(extra[0])
        fail(f"tensor {extra[0]!r}", f"absent for op {op!r}" + (f" ({why})" if why else ""), "it present")
    for r, info in infos.items():
        if info.type not in spec.roles[r]:  # the op's entry: the ggml types each of its roles may hold
            fail(f"tensor {info.name!r} type", " or ".join(spec.roles[r]), info.type)
    if v_transposed and (mixed or infos["v"].type in QUANT_TYPES):
        fail("key 'trace.v_transposed'", "F32/F16 v of a non-mixed op", f"v of type "
             f"{infos['v'].type if not mixed else 'mixed'}")
    ne = {r: (views[r].ne if r in views else infos[r].ne) for r in infos}
    if out_view is not None:
        ne["out"] = out_view.ne
    Dk, n_q, H, B = ne["q"]

    def check(r, want):
        for i, (w, got) in enumerate(zip(want, ne[r])):
            if w is not None and w != got:
                fail(f"tensor {infos[r].name!r} ne[{i}]", f"{w} (from {want}, ne order)", f"{got} (ne {list(ne[r])})")

    if mixed:  # the regions' K/V: one head count and head sizes, each its own token count
        first = spec.kv_regions[0]
        Hkv = ne[f"k_{first}"][2]
        Dv = ne[f"v_{first}"][0]
        check(f"k_{first}", (Dk, None, None, B))
        n_kv = 0
        for region in spec.kv_regions:
            n = ne[f"k_{region}"][1]
            if region != first:
                check(f"k_{region}", (Dk, n, Hkv, B))
            check(f"v_{region}", (Dv, n, Hkv, B))
            n_kv += n
    else:
        Hkv = ne["k"][2]
        n_kv = ne["k"][1]
        check("k", (Dk, None, None, B))
        if v_transposed:
            Dv = ne["v"][1]
            check("v", (n_kv, None, Hkv, B))
        else:
            Dv = ne["v"][0]
            check("v", (None, n_kv, Hkv, B))
    if H % Hkv:
        fail(f"tensor {infos['q'].name!r} ne[2] (n_head)", f"a multiple of n_head_kv = {Hkv}", str(H))
    check("out", (Dv, H, n_q, B))
    if "sinks" in infos:
        check("sinks", (H, 1, 1, 1))
    if "mask" in infos:
        m = ne["mask"]
        check("mask", (n_kv, None, None, None))
        if m[1] < n_q:
            fail(f"tensor {infos['mask'].name!r} ne[1]", f">= n_q = {n_q} (rows past n_q are padding)", str(m[1]))
        if m[2] not in (1, H):
            fail(f"tensor {infos['mask'].name!r} ne[2]", f"1 or n_head = {H}", str(m[2]))
        if m[3] not in (1, B):
            fail(f"tensor {infos['mask'].name!r} ne[3]", f"1 or B = {B}", str(m[3]))
    for r in infos:
        if math.prod(ne[r]) > max_elements:
            fail(f"tensor {infos[r].name!r} ne", f"at most max_elements = {max_elements} elements",
                 f"{list(ne[r])} = {math.prod(ne[r])}")
    if B * H * n_q * n_kv > max_elements:
        fail(f"tensor {infos['q'].name!r} ne (the call)", f"logits B*H*n_q*n_kv of at most max_elements = "
             f"{max_elements}", f"{B}*{H}*{n_q}*{n_kv} = {B * H * n_q * n_kv}")
    if scale is None:  # ggml kernels hard-code 1.0f/sqrtf(Dk): float32 arithmetic
        scale = float(np.float32(1.0) / np.sqrt(np.float32(Dk)))

    arrays = {}
    for r, info in infos.items():
        v = views.get(r) or (out_view if r == "out" and out_view is not None else None)
        v = v or L.View.contiguous(info.type, info.ne)
        raw = _operand(path, mm, info, v, r)
        role = "v_t" if (r == "v" and v_transposed) else r
        if r == "mask":
            arrays[r] = np.asarray(L.ggml_to_canonical("mask", raw, n_q=n_q), dtype=np.float32)
        elif r == "sinks":
            arrays[r] = raw.reshape(-1)
        else:
            arrays[r] = _canon(role, raw, info.type, v.ne[0])
    return Trace(path=path, op=op, producer=producer, scale=float(scale), max_bias=max_bias, softcap=softcap,
                 n_threads=n_threads, kv_order=kv_order if mixed else None, metadata=metadata,
                 types={r: i.type for r, i in infos.items()}, views=dict(views), v_transposed=v_transposed,
                 **arrays)


# ----------------------------------------------------------------------------------------------------
# load


def load(path, names: Mapping[str, str] | None = None, *, step: int | None = None,
         layout: str = "names", max_elements: int = MAX_ELEMENTS) -> Trace:
    """Read a trace file -> `Trace` (canonical operands, memory-mapped).

    Reads trace v1 (docs/trace-format.md, views included), "KQV trace monitor" dumps (``step`` picks
    one step of a multi-step file; see `load_steps`, which also explains ``layout``) and other dumps
    whose tensor names are common aliases (`ALIASES`) or mapped by ``names`` ({file name: role} or
    {role: file name}). Anything invalid raises `TraceError`, as does a call of more than
    ``max_elements`` elements (module docstring).
    """
    p, mm, infos, fields = _open(path)
    if any(k.startswith("kqv_trace.") for k in fields):
        steps = _monitor_steps(p, mm, infos, fields, names, layout, max_elements)
        if step is None:
            if len(steps) != 1:
                raise TraceError(f"{p}: step: expected step=N (1..{len(steps)}) for a multi-step monitor dump "
                                 f"(or load_steps), found none")
            step = 1
        if not 1 <= step <= len(steps):
            raise TraceError(f"{p}: step: expected 1..{len(steps)}, found {step}")
        return steps[step - 1]
    if step not in (None, 1):
        raise TraceError(f"{p}: step: expected none for a single-call trace, found {step}")
    if layout != "names":
        raise TraceError(f"{p}: layout: expected 'names' for a trace v1 file (it states its layout), "
                         f"found {layout!r}")
    return _load_v1(p, mm, infos, fields, names, max_elements)


def _load_v1(p, mm, infos, fields, names, max_elements=MAX_ELEMENTS) -> Trace:
    roles = _assign(p, [i.name for i in infos], names)
    by_name = {i.name: i for i in infos}
    by_role = {r: by_name[t] for r, t in roles.items()}
    metadata = {k: v for k, (v, _) in fields.items()}
    if any(k.startswith("trace.") for k in fields):
        version = _meta(p, fields, "trace.version", "u32")
        if version != 1:
            raise TraceError(f"{p}: key 'trace.version': expected 1, found {version}")
        op = _meta(p, fields, "trace.op", "str")
        if op not in _ops.OPS:
            raise TraceError(f"{p}: key 'trace.op': expected one of {tuple(_ops.OPS)}, found {op!r}")
        producer = _meta(p, fields, "trace.producer", "str")
        scale = _finite(p, "trace.scale", _meta(p, fields, "trace.scale", "f32"))
        max_bias = _finite(p, "trace.max_bias", _meta(p, fields, "trace.max_bias", "f32", False, 0.0), 0.0)
        softcap = _finite(p, "trace.logit_softcap", _meta(p, fields, "trace.logit_softcap", "f32", False, 0.0), 0.0)
        n_threads = _meta(p, fields, "trace.n_threads", "u32", False, 1)
        if not 1 <= n_threads <= 65536:
            raise TraceError(f"{p}: key 'trace.n_threads': expected 1..65536, found {n_threads}")
        v_t = _meta(p, fields, "trace.v_transposed", "bool", False, False)
        kv_order = None
        if _op(op).kv_regions:
            kv_order = _meta(p, fields, "trace.kv_order", "str")
            if kv_order not in KV_ORDERS:
                raise TraceError(f"{p}: key 'trace.kv_order': expected one of {KV_ORDERS}, found {kv_order!r}")
        elif "trace.kv_order" in fields:
            ordered = " or ".join(repr(n) for n, o in _ops.OPS.items() if o.kv_regions)
            raise TraceError(f"{p}: key 'trace.kv_order': expected only for op {ordered}, found it "
                             f"with op {op!r}")
    else:  # a foreign dump with recognisable names and no trace metadata: ggml's defaults
        op = _ops.infer(by_role).name
        producer = str(metadata.get("general.name", "unknown (foreign dump)"))
        scale, max_bias, softcap, n_threads, v_t = None, 0.0, 0.0, 1, False
        kv_order = "cold,hot" if _op(op).kv_regions else None
        metadata["jaxkv.defaults"] = "no trace.* keys: scale 1/sqrt(Dk), no softcap/ALiBi, kv_order cold,hot"
    views = _views_from_meta(p, fields, {r: by_role[r] for r in by_role}) if any(
        k.startswith("trace.view.") for k in fields) else {}
    if roles and set(roles) != set(roles.values()):
        metadata["jaxkv.names"] = {r: t for r, t in roles.items() if r != t}
    return _build(p, mm, by_role, views, op=op, producer=producer, scale=scale, max_bias=max_bias,
                  softcap=softcap, n_threads=int(n_threads), kv_order=kv_order, v_transposed=bool(v_t),
                  metadata=metadata, file_tensors=[i.name for i in infos], max_elements=max_elements)


# ----------------------------------------------------------------------------------------------------
# "KQV trace monitor" dumps

_STANDARD_POS = ("out", "q", "k", "v", "mask")
_MIXED_POS = ("out", "q", "k_hot", "v_hot", "mask", "k_cold", "v_cold")
_MEM_ORDERS = ("ne", "permuted")  # candidate memory orders of an input: as ne says, or axes 1 and 2 swapped


def _mem_view(info: _TensorInfo, ne: tuple, order: str) -> L.View:
    """The logical view ``ne`` of bytes laid out in memory ``order`` ('permuted': ne[1], ne[2] swapped)."""
    if order == "ne":
        return L.View.contiguous(info.type, ne)
    mem = L.View.contiguous(info.type, (ne[0], ne[2], ne[1], ne[3]))
    return L.permute(mem, 0, 2, 1, 3)


def _name_order(name: str) -> str:
    """Memory order said by a ggml name: '(permuted)' and not '(copy)' -> bytes in the viewed order."""
    ann = re.findall(r"\(([^)]*)\)", name)
    if "permuted" in ann and "copy" not in ann[ann.index("permuted"):]:
        return "permuted"
    return "ne"


def load_steps(path, names: Mapping[str, str] | None = None, *, layout: str = "names",
               max_elements: int = MAX_ELEMENTS) -> list[Trace]:
    """Read a "KQV trace monitor" dump (docs/trace-format.md, Foreign dumps) -> one `Trace` per step.

    ``layout="names"`` derives each input's memory order from its ggml name ('(permuted)' without
    '(copy)': bytes in the viewed tensor's order). ``layout="infer"`` ignores the names: it tries the
    memory orders a ggml graph can produce for each input (as ``ne`` says, or axes 1 and 2 swapped), keeps
    the combination under which `jaxkv.attention.attention` (precision f64) reproduces the recorded output
    best and reports it in ``metadata["jaxkv.layout"]``: the chosen orders, their NMSE, the runner-up's
    orders and NMSE, the number of distinct candidates, and the inputs whose orders read identical bytes
    (``indistinguishable``: an axis of size 1, either order is right). The scale is 1/sqrt(Dk) (the dialect records none).
    Files in trace v1 form give a one-element list.
    """
    p, mm, infos, fields = _open(path)
    if not any(k.startswith("kqv_trace.") for k in fields):
        if layout != "names":
            raise TraceError(f"{p}: layout: expected 'names' for a trace v1 file, found {layout!r}")
        return [_load_v1(p, mm, infos, fields, names, max_elements)]
    return _monitor_steps(p, mm, infos, fields, names, layout, max_elements)


def _monitor_steps(p, mm, infos, fields, names, layout, max_elements=MAX_ELEMENTS) -> list[Trace]:
    if layout not in ("names", "infer"):
        raise TraceError(f"{p}: layout: expected 'names' or 'infer', found {layout!r}")
    steps: dict[int, list[_TensorInfo]] = {}
    for i in infos:
        m = re.search(r"_step_(\d+)$", i.name)
        if not m:
            raise TraceError(f"{p}: tensor {i.name!r}: expected a name ending in _step_N, found none")
        steps.setdefault(int(m.group(1)), []).append(i)
    if sorted(steps) != list(range(1, len(steps) + 1)):
        raise TraceError(f"{p}: steps: expected 1..{len(steps)}, found {sorted(steps)}")
    total = fields.get("kqv_trace.total_steps", (None,))[0]
    metadata = {k: v for k, (v, _) in fields.items()}
    out = []
    for n in sorted(steps):
        tensors = steps[n]
        pos = _MIXED_POS if len(tensors) == 7 else _STANDARD_POS if len(tensors) == 5 else None
        if pos is None:
            raise TraceError(f"{p}: step {n}: expected 5 (standard) or 7 (mixed cache) tensors, found "
                             f"{len(tensors)}")
        step_names = None if names is None else {**names}
        roles = _assign(p, [t.name for t in tensors], step_names)
        # positional sources fill what the names did not say
        named = set(roles.values())
        for r, t in zip(pos, tensors):
            if r not in roles and t.name not in named:
                roles[r] = t.name
        if set(roles) != set(pos):
            raise TraceError(f"{p}: step {n}: expected tensors for {sorted(pos)}, found roles {sorted(roles)}")
        by_name = {t.name: t for t in tensors}
        by_role = {r: by_name[t] for r, t in roles.items()}
        out.append(_monitor_step(p, mm, by_role, n, layout, dict(metadata, **{"jaxkv.step": n}), max_elements))
    if total is not None and total != len(out):
        raise TraceError(f"{p}: key 'kqv_trace.total_steps': expected {len(out)} (steps found), found {total}")
    return out


def _monitor_step(p, mm, by_role, n, layout, metadata, max_elements=MAX_ELEMENTS) -> Trace:
    spec = _ops.infer(by_role)
    mixed = bool(spec.kv_regions)
    q = by_role["q"]
    Dk, n_q, H = q.ne[0], q.ne[1], q.ne[2]
    o = by_role["out"]
    if o.ne[0] % max(H, 1) or o.ne[1] != n_q or o.ne[2:] != (1, 1):
        raise TraceError(f"{p}: tensor {o.name!r} ne: expected [Dv*n_head, n_q] with n_head = {H}, n_q = {n_q}, "
                         f"found {list(o.ne)}")
    out_view = L.View.contiguous(o.type, (o.ne[0] // H, H, n_q, 1))
    inputs = [r for r in by_role if r not in ("out", "mask")]
    base = dict(op=spec.name, producer=str(metadata.get(
        "kqv_trace.description", "KQV trace monitor")), scale=None, max_bias=0.0, softcap=0.0, n_threads=1,
        kv_order="hot,cold" if mixed else None, v_transposed=False, out_view=out_view, max_elements=max_elements)

    def build(orders, meta):
        views = {r: _mem_view(by_role[r], by_role[r].ne, orders[r]) for r in inputs}
        return _build(p, mm, by_role, views, metadata=meta, **base)

    if layout == "names":
        orders = {r: _name_order(by_role[r].name) for r in inputs}
        return build(orders, dict(metadata, **{"jaxkv.layout": {"mode": "names", "orders": orders}}))
    return _infer(p, by_role, inputs, build, metadata)


def _infer(p, by_role, inputs, build, metadata) -> Trace:
    results = []
    seen = []
    for combo in itertools.product(_MEM_ORDERS, repeat=len(inputs)):
        orders = dict(zip(inputs, combo))
        t = build(orders, metadata)
        k, v = t.dense_kv(np.float64)
        q = np.asarray(t.q, np.float64)
        key = (q.tobytes(), k.tobytes(), v.tobytes())
        if key in seen:  # same bytes under another name (an axis of size 1): not a distinct candidate
            continue
        seen.append(key)
        ref = attention(q, k, v, scale=t.scale, mask=t.mask, precision="f64")
        err = nmse(np.asarray(ref), t.out)
        if not math.isfinite(err):
            err = math.inf
        results.append((err, orders, t))
    results.sort(key=lambda r: r[0])
    err, orders, best = results[0]
    # inputs whose candidate orders read the same bytes (an axis of size 1): the choice is immaterial
    same = []
    for r in inputs:
        alt = dict(orders, **{r: "ne" if orders[r] == "permuted" else "permuted"})
        a, b = getattr(best, r), getattr(build(alt, metadata), r)
        a, b = (a.raw, b.raw) if F.is_quant(a) else (a, b)
        if np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)):
            same.append(r)
    report = {"mode": "infer", "orders": orders, "nmse": err, "candidates": len(results),
              "indistinguishable": same,
              "runner_up": results[1][1] if len(results) > 1 else None,
              "runner_up_nmse": results[1][0] if len(results) > 1 else None}
    return dataclasses.replace(best, metadata=dict(metadata, **{"jaxkv.layout": report}))


# ----------------------------------------------------------------------------------------------------
# save


def _ggml_type(role: str, x, fmt) -> str:
    if fmt is not None:
        return F.get_format(fmt).name
    if F.is_quant(x):
        return x.fmt.name
    if role in ("k_hot", "v_hot", "mask"):
        return "f16"
    return "f16" if np.asarray(x).dtype == np.float16 else "f32"


def _trim_ne(ne) -> tuple:
    ne = list(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


_FILL_SEED = 0x7A11


def save(path, trace: Trace | None = None, *, formats: Mapping[str, Any] | None = None,
         views: Mapping[str, Any] | None = None, mask_pad: int | None = None, **fields) -> pathlib.Path:
    """Write a trace v1 file from canonical operands; returns the path.

    ``trace`` (optional) supplies every field; keyword ``fields`` (op, producer, scale, max_bias, softcap,
    n_threads, kv_order, v_transposed, metadata, q, k, v, k_cold, v_cold, k_hot, v_hot, mask, sinks, out)
    override it. Arrays are canonical (module docstring). ``formats`` maps a role to its ggml type
    (float arrays are quantized through `formats.quantize`, or rounded to F16); by default a QuantArray
    keeps its format, float16 -> F16, other floats -> F32 (k_hot, v_hot, mask: F16). ``mask_pad`` pads
    the mask's rows (ggml's ``n_q_pad``) with -inf. ``views`` maps a role to a `layout.View` of its
    ggml operand (``ne`` must equal the operand's ggml ne), or to ``(View, stored_ne)``: the tensor is
    then stored as a buffer (``stored_ne``, default a 1-D buffer just large enough) whose bytes outside
    the view are NaN (F32/F16) or seeded random bytes (block types), plus the ``trace.view.*`` keys.
    The file is readable by gguf.GGUFReader and by ggml's C gguf reader (alignment 32, ne order).
    """
    vals = {} if trace is None else {f.name: getattr(trace, f.name) for f in dataclasses.fields(Trace)}
    vals.update(fields)
    unknown = set(fields) - {f.name for f in dataclasses.fields(Trace)}
    if unknown:
        raise ValueError(f"fields: unknown {sorted(unknown)}")
    formats = dict(formats or {})
    views = dict(views or {})
    op = vals.get("op") or _ops.infer(r for r in _TENSOR_ROLES if vals.get(r) is not None).name
    if op not in _ops.OPS:
        raise ValueError(f"op: expected one of {tuple(_ops.OPS)}, got {op!r}")
    mixed = bool(_op(op).kv_regions)
    q = vals.get("q")
    if q is None or vals.get("out") is None:
        raise ValueError("q, out: both are required")
    n_q, Dk = np.shape(q)[1], np.shape(q)[3]
    v_t = bool(vals.get("v_transposed", False))
    scale = vals.get("scale")
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    kv_order = vals.get("kv_order") or ("cold,hot" if mixed else None)

    tensors = []  # (name, type, ne, bytes)
    view_keys = {}
    rng = np.random.default_rng(_FILL_SEED)
    for role in _TENSOR_ROLES:
        x = vals.get(role)
        if x is None:
            continue
        t = _ggml_type(role, x, formats.get(role))
        f = F.get_format(t)
        grole = "v_t" if (role == "v" and v_t) else role
        if role == "sinks":
            g = np.asarray(x, np.float32).reshape(1, 1, 1, -1)
        elif role == "mask":
            g = np.asarray(L.canonical_to_ggml("mask", np.asarray(x, np.float32), pad_to=mask_pad))
        elif F.is_quant(x):
            if x.fmt.name != t:
                raise ValueError(f"formats[{role!r}]: the array is {x.fmt.name} blocks, got format {t}")
            g = np.asarray(L.canonical_to_ggml(grole, F.QuantArray(np.asarray(x.raw), x.fmt, x.n)).raw)
        else:
            g = np.asarray(L.canonical_to_ggml(grole, np.asarray(x)))
        if f.quantized:
            raw = g if g.dtype == np.uint8 else np.asarray(F.quantize(np.asarray(g, np.float32), t), np.uint8)
            n0 = raw.shape[-1] // f.block_bytes * f.block_size
            ne = (n0,) + tuple(raw.shape[:-1][::-1])
            data = raw
        else:
            dt = np.float16 if t == "f16" else np.float32
            if t not in ("f16", "f32"):
                raise ValueError(f"formats[{role!r}]: expected f32, f16 or a block type, got {t}")
            data = np.asarray(g).astype(dt)
            ne = tuple(data.shape[::-1])
        ne = tuple(ne) + (1,) * (4 - len(ne))
        if role in views:
            spec = views[role]
            view, stored_ne = (spec, None) if isinstance(spec, L.View) else (spec[0], spec[1])
            if view.type != t:
                raise ValueError(f"views[{role!r}]: view type {view.type} != tensor type {t}")
            if view.ne != ne:
                raise ValueError(f"views[{role!r}]: view ne {list(view.ne)} != the operand's ggml ne {list(ne)}")
            need = view.offset + L.nbytes(view)
            if stored_ne is None:
                n_el = -(-need // f.block_bytes) * f.block_size
                stored_ne = (n_el,)
            stored_ne = tuple(int(a) for a in stored_ne) + (1,) * (4 - len(stored_ne))
            size = math.prod(stored_ne) // f.block_size * f.block_bytes
            if need > size:
                raise ValueError(f"views[{role!r}]: the view reads {need} bytes, the stored ne {list(stored_ne)} "
                                 f"holds {size}")
            if f.quantized:
                fill = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            else:
                fill = np.full(size // f.block_bytes, np.nan, np.float16 if t == "f16" else np.float32).tobytes()
            buf = L.store(data, t, view.ne, view.nb, view.offset, buffer=fill)
            tensors.append((role, t, stored_ne, buf))
            view_keys[role] = view
        else:
            tensors.append((role, t, ne, np.ascontiguousarray(data).tobytes()))

    w = gguf.GGUFWriter(str(path), arch="trace")
    w.add_uint32("trace.version", 1)
    w.add_string("trace.op", op)
    w.add_string("trace.producer", str(vals.get("producer") or "jaxkv"))
    w.add_float32("trace.scale", scale)
    w.add_float32("trace.max_bias", float(vals.get("max_bias") or 0.0))
    w.add_float32("trace.logit_softcap", float(vals.get("softcap") or 0.0))
    w.add_uint32("trace.n_threads", int(vals.get("n_threads") or 1))
    if v_t:
        w.add_bool("trace.v_transposed", True)
    if mixed:
        w.add_string("trace.kv_order", kv_order)
    for role, view in view_keys.items():
        w.add_key_value(f"trace.view.{role}.ne", list(view.ne), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64)
        w.add_key_value(f"trace.view.{role}.nb", list(view.nb), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64)
        w.add_uint64(f"trace.view.{role}.offset", int(view.offset))
    for k, v in (vals.get("metadata") or {}).items():
        if k.startswith("trace.") or k.startswith("GGUF.") or k == "general.architecture":
            continue
        _add_meta(w, k, v)
    for role, t, ne, buf in tensors:
        f = F.get_format(t)
        tne = _trim_ne(ne)
        arr = np.frombuffer(buf, np.uint8)
        if f.quantized:
            shape = tuple(tne[::-1][:-1]) + (tne[0] // f.block_size * f.block_bytes,)
            w.add_tensor(role, arr.reshape(shape), raw_dtype=gguf.GGMLQuantizationType(f.type_id))
        else:
            w.add_tensor(role, arr.view(np.float16 if t == "f16" else np.float32).reshape(tne[::-1]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def _add_meta(w, key: str, v):
    T = gguf.GGUFValueType
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, (int, np.integer)):
        w.add_key_value(key, int(v), T.INT64 if int(v) < 2**63 else T.UINT64)
    elif isinstance(v, (float, np.floating)):
        w.add_key_value(key, float(v), T.FLOAT64)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, (list, tuple)) and v and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                                                     for a in v):
        w.add_key_value(key, [int(a) for a in v], T.ARRAY, T.INT64)
    elif isinstance(v, (list, tuple)) and v and all(isinstance(a, (float, np.floating)) for a in v):
        w.add_key_value(key, [float(a) for a in v], T.ARRAY, T.FLOAT64)
    elif isinstance(v, (list, tuple)) and v and all(isinstance(a, str) for a in v):
        w.add_key_value(key, list(v), T.ARRAY, T.STRING)
    else:
        w.add_string(key, json.dumps(v, default=str))
