"""ggml tensor layouts: view descriptors, ggml's view algebra, `resolve` / `store`, and the named
remappings between ggml order and jaxkv's canonical layout.

ggml describes a tensor by a type, ``ne[4]`` (element counts, fastest-varying first) and ``nb[4]`` (byte
strides; for block formats ``nb[0]`` is the block's byte size and ``ne[0]`` counts elements). A numpy
array *in ggml order* is the row-major array of shape ``ne[::-1]`` (``[ne3, ne2, ne1, ne0]``).

Canonical layout (jaxkv's public API)::

    q    [B, n_q, H, Dk]        k [B, n_kv, Hkv, Dk]      v [B, n_kv, Hkv, Dv]
    mask [B|1, H|1, n_q, n_kv]  sinks [H]                 out [B, n_q, H, Dv]

Role <-> ggml tensor (``ne``, fastest first) handled by `canonical_to_ggml` / `ggml_to_canonical`:

    q, k, v, k_cold, v_cold, k_hot, v_hot   ne [D, n, heads, B]    numpy [B, heads, n, D]
    v_t   (V transposed, soft_max path)     ne [n_kv, Dv, Hkv, B]  numpy [B, Hkv, Dv, n_kv]
    mask                                    ne [n_kv, n_q_pad, H|1, B|1]   (rows past n_q are padding)
    out   (flash_attn_ext result)           ne [Dv, H, n_q, B]     numpy [B, n_q, H, Dv]
    sinks                                   ne [H]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxkv import formats

__all__ = [
    "ROLES", "canonical_to_ggml", "ggml_to_canonical",
    "View", "contiguous_strides", "nbytes", "validate", "permute", "transpose",
    "view_1d", "view_2d", "view_3d", "view_4d", "reshape", "cont", "is_contiguous", "can_repeat",
    "repeat", "gqa_expand", "resolve", "resolve_raw", "store",
]

# ----------------------------------------------------------------------------------------------------
# named remappings: canonical <-> ggml (numpy arrays of shape ne[::-1])

ROLES = ("q", "k", "v", "v_t", "mask", "sinks", "out", "k_cold", "v_cold", "k_hot", "v_hot")

# numpy axes permutation taking the canonical array to the ggml array (ggml = canonical.transpose(P))
_TO_GGML: dict[str, tuple[int, ...]] = {
    "q": (0, 2, 1, 3),       # [B,n_q,H,Dk]   -> [B,H,n_q,Dk]
    "k": (0, 2, 1, 3),       # [B,n_kv,Hkv,D] -> [B,Hkv,n_kv,D]
    "v": (0, 2, 1, 3),
    "k_cold": (0, 2, 1, 3),
    "v_cold": (0, 2, 1, 3),
    "k_hot": (0, 2, 1, 3),
    "v_hot": (0, 2, 1, 3),
    "v_t": (0, 2, 3, 1),     # [B,n_kv,Hkv,Dv] -> [B,Hkv,Dv,n_kv]
    "mask": (0, 1, 2, 3),    # [B,H,n_q,n_kv] -> [B,H,n_q_pad,n_kv]  (plus padding rows)
    "out": (0, 1, 2, 3),     # [B,n_q,H,Dv]   -> [B,n_q,H,Dv]        (ne [Dv,H,n_q,B])
    "sinks": (0,),
}


def _inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def _role(role: str) -> tuple[int, ...]:
    if role not in _TO_GGML:
        raise ValueError(f"role: unknown role {role!r}; known: {ROLES}")
    return _TO_GGML[role]


_is_quant = formats.is_quant


def _xp(x):
    """numpy for numpy arrays, jax.numpy for jax arrays."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    return jnp


def _move(role: str, x, perm: tuple[int, ...], what: str):
    if _is_quant(x):
        if role == "v_t":
            raise ValueError("role: v_t moves the element axis and cannot hold a quantized (block) tensor")
        if x.raw.ndim != len(perm):
            raise ValueError(f"{what}: {role} needs {len(perm)} axes, got quantized shape {x.shape}")
        return dataclasses.replace(x, raw=x.raw.transpose(perm))
    if np.ndim(x) != len(perm):
        raise ValueError(f"{what}: {role} needs {len(perm)} axes, got shape {np.shape(x)}")
    return x.transpose(perm)


def canonical_to_ggml(role: str, x, pad_to: int | None = None, fill: float = -math.inf):
    """Canonical array -> the row-major array of the ggml tensor for ``role`` (shape ``ne[::-1]``).

    Works on numpy and jax arrays and on `formats.QuantArray` (only leading axes move; the block row stays
    last). For ``mask``, ``pad_to`` pads the ``n_q`` axis to that many rows with ``fill`` (ggml pads the
    mask's ``ne[1]``); other roles reject ``pad_to``.
    """
    perm = _role(role)
    y = _move(role, x, perm, "canonical_to_ggml")
    if pad_to is not None:
        if role != "mask":
            raise ValueError(f"pad_to: only the mask has padding rows, got role {role!r}")
        n_q = y.shape[2]
        if pad_to < n_q:
            raise ValueError(f"pad_to: must be >= n_q = {n_q}, got {pad_to}")
        if pad_to > n_q:
            xp = _xp(y)
            y = xp.pad(y, ((0, 0), (0, 0), (0, pad_to - n_q), (0, 0)), constant_values=fill)
    return y


def ggml_to_canonical(role: str, x, n_q: int | None = None):
    """Row-major array of the ggml tensor for ``role`` (shape ``ne[::-1]``) -> canonical array.

    Inverse of `canonical_to_ggml`. Arrays with fewer axes than the role's 4 are taken as having dropped
    trailing ggml dimensions of size 1 (leading numpy axes) and are expanded. For ``mask``, ``n_q`` drops
    the padding rows past ``n_q``.
    """
    perm = _role(role)
    if _is_quant(x):
        nd = x.raw.ndim
        if nd < len(perm):
            x = dataclasses.replace(x, raw=x.raw.reshape((1,) * (len(perm) - nd) + tuple(x.raw.shape)))
    else:
        nd = np.ndim(x)
        if 0 < nd < len(perm):
            x = x.reshape((1,) * (len(perm) - nd) + tuple(x.shape))
    y = _move(role, x, _inverse(perm), "ggml_to_canonical")
    if n_q is not None:
        if role != "mask":
            raise ValueError(f"n_q: only the mask has padding rows, got role {role!r}")
        if not 0 <= n_q <= y.shape[2]:
            raise ValueError(f"n_q: must be in [0, {y.shape[2]}] (the mask's rows), got {n_q}")
        y = y[:, :, :n_q, :]
    return y


# ----------------------------------------------------------------------------------------------------
# view descriptors


def _type_facts(type_: Any) -> tuple[str, int, int]:
    """(name, block_size, block_bytes) of a ggml type (name, id, GGMLQuantizationType or Format)."""
    f = formats.get_format(type_)
    return f.name, f.block_size, f.block_bytes


@dataclass(frozen=True)
class View:
    """A ggml tensor view: ``type`` (ggml type name), ``ne`` / ``nb`` (4 ints each, fastest first) and a
    byte ``offset`` into a buffer. Construction normalises the type name and checks signs and block
    alignment (`validate` additionally checks the bounds against a buffer size). For block formats axis 0
    is the block row; `permute` may move it (ggml allows the descriptor), but only views whose axis 0 is
    the row (``nb[0]`` = block bytes) resolve."""

    type: str
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    offset: int = 0

    def __post_init__(self):
        name, bs, bb = _type_facts(self.type)
        object.__setattr__(self, "type", name)
        for field in ("ne", "nb"):
            v = tuple(int(a) for a in getattr(self, field))
            if len(v) > 4 or len(v) == 0:
                raise ValueError(f"{field}: expected 1 to 4 entries, got {len(v)}")
            if field == "ne":
                v = v + (1,) * (4 - len(v))
            else:  # missing strides continue contiguously from the last one (as ggml_view_2d/3d do)
                while len(v) < 4:
                    v = v + (v[-1] * (self.ne[len(v) - 1] // (bs if len(v) == 1 else 1)),)
            for i, a in enumerate(v):
                if a < 0:
                    raise ValueError(f"{field}[{i}]: must be >= 0, got {a}")
            object.__setattr__(self, field, v)
        off = int(self.offset)
        if off < 0:
            raise ValueError(f"offset: must be >= 0, got {off}")
        object.__setattr__(self, "offset", off)
        if bs > 1:
            if self.ne[0] % bs:
                raise ValueError(f"ne[0]: {name} rows must be a multiple of the block size {bs}, got {self.ne[0]}")
            if off % bb:
                raise ValueError(f"offset: {name} rows must start on a block ({bb} bytes), got {off}")
            for i in range(1, 4):
                if self.ne[i] > 1 and self.nb[i] % bb:
                    raise ValueError(f"nb[{i}]: {name} rows must start on a block ({bb} bytes), got {self.nb[i]}")

    @classmethod
    def contiguous(cls, type_: Any, ne: Sequence[int], offset: int = 0) -> "View":
        """The contiguous view of ``ne`` (ggml's default strides)."""
        return cls(type_, tuple(ne), contiguous_strides(type_, ne), offset)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """numpy shape of the resolved array: ``ne[::-1]``."""
        return self.ne[::-1]

    @property
    def nelements(self) -> int:
        return math.prod(self.ne)


def contiguous_strides(type_: Any, ne: Sequence[int]) -> tuple[int, int, int, int]:
    """ggml's strides for a contiguous tensor of ``ne``: nb0 = type size, nb1 = row bytes, ..."""
    _, bs, bb = _type_facts(type_)
    ne = tuple(int(a) for a in ne) + (1,) * (4 - len(ne))
    if ne[0] % bs:
        raise ValueError(f"ne[0]: must be a multiple of the block size {bs}, got {ne[0]}")
    nb = [bb, bb * (ne[0] // bs)]
    nb.append(nb[1] * ne[1])
    nb.append(nb[2] * ne[2])
    return tuple(nb)


def nbytes(view: View) -> int:
    """Bytes spanned by the view from its offset (ggml_nbytes): 0 if any ne is 0."""
    _, bs, bb = _type_facts(view.type)
    if any(a == 0 for a in view.ne):
        return 0
    n = (view.ne[0] // bs - 1) * view.nb[0] + bb
    for i in range(1, 4):
        n += (view.ne[i] - 1) * view.nb[i]
    return n


def validate(view: View, buffer_size: int | None = None, name: str = "view") -> View:
    """Check ``view`` against a buffer of ``buffer_size`` bytes; raises ValueError naming the field."""
    _, bs, bb = _type_facts(view.type)
    if bs > 1 and view.ne[0] > bs and view.nb[0] != bb:
        raise ValueError(f"{name}.nb[0]: a {view.type} row is blocks back to back, nb[0] must be {bb}, "
                         f"got {view.nb[0]}")
    if buffer_size is not None:
        end = view.offset + nbytes(view)
        if end > buffer_size:
            raise ValueError(f"{name}: view (ne={list(view.ne)}, nb={list(view.nb)}, offset={view.offset}) "
                             f"reads up to byte {end}, past the buffer's {buffer_size} bytes")
    return view


# ----------------------------------------------------------------------------------------------------
# ggml's view algebra (on descriptors)


def permute(view: View, axis0: int, axis1: int, axis2: int, axis3: int) -> View:
    """ggml_permute: source axis i goes to position axis_i."""
    axes = (axis0, axis1, axis2, axis3)
    if sorted(axes) != [0, 1, 2, 3]:
        raise ValueError(f"axes: must be a permutation of 0..3, got {axes}")
    ne, nb = [0] * 4, [0] * 4
    for i, a in enumerate(axes):
        ne[a] = view.ne[i]
        nb[a] = view.nb[i]
    return _raw_view(view.type, ne, nb, view.offset)


def _raw_view(type_, ne, nb, offset) -> View:
    """A View without block-alignment checks on moved axes (ggml allows permuted block tensors)."""
    v = object.__new__(View)
    object.__setattr__(v, "type", _type_facts(type_)[0])
    object.__setattr__(v, "ne", tuple(int(a) for a in ne))
    object.__setattr__(v, "nb", tuple(int(a) for a in nb))
    object.__setattr__(v, "offset", int(offset))
    return v


def transpose(view: View) -> View:
    """ggml_transpose: swap axes 0 and 1."""
    return permute(view, 1, 0, 2, 3)


def _sub_view(view: View, ne, nb_rest, offset) -> View:
    """ggml_view_impl: a new view of ``view``'s bytes at ``offset`` bytes from its start; the strides not
    given are the contiguous ones continued from the last given stride (as ggml_view_1d..3d set them)."""
    ne = tuple(int(a) for a in ne) + (1,) * (4 - len(ne))
    nb = [_type_facts(view.type)[2]] + [int(x) for x in nb_rest]
    if len(nb) == 1:
        nb = list(contiguous_strides(view.type, ne))
    while len(nb) < 4:
        nb.append(nb[-1] * ne[len(nb) - 1])
    return View(view.type, ne, tuple(nb), view.offset + int(offset))


def view_1d(view: View, ne0: int, offset: int) -> View:
    """ggml_view_1d: ``ne0`` contiguous elements at ``offset`` bytes from the view's start."""
    return _sub_view(view, (ne0,), (), offset)


def view_2d(view: View, ne0: int, ne1: int, nb1: int, offset: int) -> View:
    """ggml_view_2d (nb2 = nb3 = nb1 * ne1)."""
    v = _sub_view(view, (ne0, ne1), (nb1,), offset)
    return View(v.type, v.ne, (v.nb[0], nb1, nb1 * ne1, nb1 * ne1), v.offset)  # ggml: nb3 = nb2


def view_3d(view: View, ne0: int, ne1: int, ne2: int, nb1: int, nb2: int, offset: int) -> View:
    """ggml_view_3d (nb3 = nb2 * ne2)."""
    return _sub_view(view, (ne0, ne1, ne2), (nb1, nb2), offset)


def view_4d(view: View, ne0: int, ne1: int, ne2: int, ne3: int, nb1: int, nb2: int, nb3: int,
            offset: int) -> View:
    """ggml_view_4d."""
    return _sub_view(view, (ne0, ne1, ne2, ne3), (nb1, nb2, nb3), offset)


def is_contiguous(view: View) -> bool:
    """ggml_is_contiguous: the strides are the default ones (size-1 axes' strides do not matter)."""
    _, bs, bb = _type_facts(view.type)
    if view.ne[0] != bs and view.nb[0] != bb:
        return False
    nxt = bb * (view.ne[0] // bs)
    for i in range(1, 4):
        if view.ne[i] != 1 and view.nb[i] != nxt:
            return False
        nxt *= view.ne[i]
    return True


def reshape(view: View, *ne: int) -> View:
    """ggml_reshape_Nd: same bytes, new ``ne``; the view must be contiguous and keep the element count."""
    if not is_contiguous(view):
        raise ValueError("view: reshape needs a contiguous view (ggml_cont it first)")
    if math.prod(ne) != view.nelements:
        raise ValueError(f"ne: reshape must keep {view.nelements} elements, got {list(ne)}")
    return View.contiguous(view.type, ne, view.offset)


def cont(view: View) -> View:
    """ggml_cont: the descriptor of the contiguous copy (same type and ne, default strides, offset 0).
    Produce its bytes with ``store(resolve_raw(buf, view), ...)`` or `resolve_raw(...).tobytes()`."""
    return View.contiguous(view.type, view.ne, 0)


def can_repeat(small: Sequence[int], big: Sequence[int]) -> bool:
    """ggml_can_repeat: tensor ``big`` (ne) is a tiling of ``small`` (ne) along every axis."""
    small = tuple(small) + (1,) * (4 - len(small))
    big = tuple(big) + (1,) * (4 - len(big))
    if any(a == 0 for a in small):
        return any(b == 0 for b in big)
    return all(b % a == 0 for a, b in zip(small, big))


def repeat(x: np.ndarray, ne: Sequence[int]) -> np.ndarray:
    """ggml_repeat (tiling, index i % small): ggml-order array [ne3', ..] tiled to ``ne``[::-1].

    This is how ggml broadcasts a mask over heads (``ne[2]`` of 1 or H) and batches."""
    ne = tuple(ne) + (1,) * (4 - len(ne))
    shape = ne[::-1]
    x = np.asarray(x).reshape((1,) * (4 - np.ndim(x)) + np.shape(x))
    small = x.shape[::-1]
    if not can_repeat(small, ne):
        raise ValueError(f"ne: {list(ne)} is not a repetition of {list(small)}")
    return np.tile(x, tuple(b // a for a, b in zip(x.shape, shape)))


def gqa_expand(kv, n_head: int, axis: int = 2):
    """Grouped-query broadcast (ggml's flash_attn_ext: kv head = h // (n_head // n_head_kv)).

    ``kv`` canonical [B, n_kv, Hkv, D] (head ``axis`` = 2) -> [B, n_kv, n_head, D]."""
    hkv = kv.shape[axis]
    if hkv == 0 or n_head % hkv:
        raise ValueError(f"n_head: must be a multiple of the KV heads {hkv}, got {n_head}")
    return _xp(kv).repeat(kv, n_head // hkv, axis=axis)


# ----------------------------------------------------------------------------------------------------
# resolve / store


def _as_u8(buffer) -> np.ndarray:
    if isinstance(buffer, np.ndarray):
        return buffer.reshape(-1).view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)


_FLOAT_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


def resolve_raw(buffer, view: View, name: str = "view") -> np.ndarray:
    """The view's elements without decoding: numpy of shape ``ne[::-1]`` for f32/f16 (their dtypes),
    uint8 ``[ne3, ne2, ne1, row_bytes(ne0)]`` for block formats (and bf16). A view into the buffer's
    memory (no copy) where numpy allows; read-only."""
    buf = _as_u8(buffer)
    validate(view, buf.size, name)
    tname, bs, bb = _type_facts(view.type)
    if any(a == 0 for a in view.ne):
        shape = view.shape if tname in _FLOAT_DTYPES else view.shape[:3] + (view.ne[0] // bs * bb,)
        return np.zeros(shape, _FLOAT_DTYPES.get(tname, np.uint8))
    if tname in _FLOAT_DTYPES:
        return np.ndarray(view.shape, dtype=_FLOAT_DTYPES[tname], buffer=buf, offset=view.offset,
                          strides=view.nb[::-1])
    if view.ne[0] // bs > 1 and view.nb[0] != bb:
        raise ValueError(f"{name}.nb[0]: a {tname} row must be blocks back to back ({bb} bytes)")
    nblk = view.ne[0] // bs
    u = np.ndarray(view.shape[:3] + (nblk, bb), dtype=np.uint8, buffer=buf, offset=view.offset,
                   strides=view.nb[::-1][:3] + (bb, 1))
    return u.reshape(view.shape[:3] + (nblk * bb,))


def resolve(buffer, view: View, name: str = "view", max_elements: int | None = None) -> np.ndarray:
    """Bytes + view -> numpy float array of shape ``ne[::-1]`` (ggml order reversed).

    f32 -> float32, f16 -> float16 (exact), block formats and bf16 -> float32 dequantized row by row
    through `jaxkv.formats.dequantize`. Raises ValueError (naming ``name``) if the view leaves the buffer.
    f32/f16 results are views of the buffer (no allocation); a dequantized result is allocated, so its
    elements are bounded: at most ``max_elements``, by default 2 per buffer byte (a block format packs at
    most 32 elements in 18 bytes), which only a view repeating bytes (a stride of 0) can exceed.
    """
    r = resolve_raw(buffer, view, name)
    if view.type in _FLOAT_DTYPES:
        return r
    limit = 2 * _as_u8(buffer).size if max_elements is None else int(max_elements)
    if view.nelements > limit:
        raise ValueError(f"{name}: view (ne={list(view.ne)}, nb={list(view.nb)}) has {view.nelements} elements, "
                         f"more than the bound {limit} (2 per buffer byte, or max_elements)")
    if r.size == 0:
        return np.zeros(view.shape, np.float32)
    return np.asarray(formats.dequantize(np.ascontiguousarray(r), view.type), dtype=np.float32)


def _non_overlapping(ne, nb, item: int) -> bool:
    dims = sorted((s, n) for n, s in zip(ne, nb) if n > 1)
    span = item
    for s, n in dims:
        if s < span:
            return False
        span = s * (n - 1) + span
    return True


def store(array, type_: Any, ne: Sequence[int] | None = None, nb: Sequence[int] | None = None,
          offset: int = 0, buffer=None) -> bytes:
    """Write ``array`` (ggml order, shape ``ne[::-1]``) as ``type_`` through the view (ne, nb, offset).

    ``array`` is float (quantized through `formats.quantize` for block types, rounded to F16 for f16) or,
    for block types, uint8 raw rows ``[ne3, ne2, ne1, row_bytes(ne0)]``. ``ne`` defaults to the array's
    reversed shape, ``nb`` to the contiguous strides. The bytes go into a copy of ``buffer`` (grown to fit;
    bytes not covered by the view are kept, or zero) and are returned. Self-overlapping views are rejected.
    Inverse of `resolve` for f32/f16 and for quantized raw rows.
    """
    tname, bs, bb = _type_facts(type_)
    a = np.asarray(array)
    if ne is None:
        shp = a.shape
        if tname not in _FLOAT_DTYPES and a.dtype == np.uint8:
            shp = shp[:-1] + (shp[-1] // bb * bs,)
        ne = tuple(shp[::-1])
    ne = tuple(int(x) for x in ne) + (1,) * (4 - len(ne))
    if nb is None:
        nb = contiguous_strides(tname, ne)
    view = View(tname, ne, tuple(nb), offset)
    validate(view, None, "store")
    if not _non_overlapping((view.ne[0] // bs,) + view.ne[1:], view.nb, bb):
        raise ValueError(f"nb: the view {list(view.nb)} overlaps itself; store needs distinct elements")
    size = view.offset + nbytes(view)
    out = bytearray(max(size, len(buffer) if buffer is not None else 0))
    if buffer is not None:
        out[:len(buffer)] = bytes(buffer)
    dst = np.frombuffer(out, dtype=np.uint8)
    if view.nelements == 0:
        return bytes(out)
    if tname in _FLOAT_DTYPES:
        dt = _FLOAT_DTYPES[tname]
        if a.shape != view.shape and a.size == view.nelements:
            a = a.reshape(view.shape)
        if a.shape != view.shape:
            raise ValueError(f"array: expected shape {view.shape} (ne reversed), got {a.shape}")
        src = np.ascontiguousarray(a.astype(dt)).view(np.uint8).reshape(view.shape + (dt.itemsize,))
        tgt = np.lib.stride_tricks.as_strided(dst[view.offset:], shape=view.shape + (dt.itemsize,),
                                              strides=view.nb[::-1] + (1,))
        tgt[...] = src
        return bytes(out)
    nblk = view.ne[0] // bs
    rshape = view.shape[:3] + (nblk * bb,)
    if a.dtype == np.uint8:
        raw = a.reshape(rshape) if a.size == math.prod(rshape) else None
        if raw is None:
            raise ValueError(f"array: expected raw {tname} rows of shape {rshape}, got {a.shape}")
    else:
        if a.shape != view.shape:
            raise ValueError(f"array: expected shape {view.shape} (ne reversed), got {a.shape}")
        raw = np.asarray(formats.quantize(a.astype(np.float32), tname), dtype=np.uint8)
    src = raw.reshape(view.shape[:3] + (nblk, bb))
    tgt = np.lib.stride_tricks.as_strided(dst[view.offset:], shape=view.shape[:3] + (nblk, bb),
                                          strides=view.nb[::-1][:3] + (bb, 1))
    tgt[...] = src
    return bytes(out)
