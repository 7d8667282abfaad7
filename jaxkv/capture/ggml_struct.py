"""ggml's ``struct ggml_tensor`` read through ctypes, and the facts of a graph node.

The struct layout is ggml's (``ggml.h``: type, buffer, ne[4], nb[4], op, op_params[16], flags,
src[10], view_src, view_offs, data, name[64], extra, padding[8]; the ctypes struct is
``jaxkv.oracles.ggml_lib.Tensor``, the live oracle's); :class:`GgmlLib` checks it at run time against
the loaded ``libggml-base`` (``ggml_get_name``, ``ggml_op_name``, ``ggml_type_name``) before anything is
read, so a mismatched build fails with one clear error instead of reading garbage.

:class:`Node` is a frozen snapshot of one tensor's descriptor (no data): ``ne`` / ``nb`` fastest first,
``view_src`` the root tensor's address (ggml collapses view chains, so a view's ``view_src`` is never a
view) and ``view_offs`` the byte offset into it.
"""

from __future__ import annotations

import ctypes
import dataclasses

from jaxkv import formats as F
from jaxkv.oracles.ggml_lib import GGML_MAX_SRC as MAX_SRC
from jaxkv.oracles.ggml_lib import Tensor as GgmlTensor  # the same ABI as the live oracle's

__all__ = ["GgmlTensor", "Node", "GgmlLib", "LayoutError", "MAX_SRC"]

# ggml.h (0.2x) enum ggml_op ids of the ops a capture reads; confirmed against ggml_op_name at load
OP_IDS = {"MUL_MAT": 29, "SOFT_MAX": 46, "FLASH_ATTN_EXT": 74}
# enum ggml_type ids of the types a trace v1 file can hold (jaxkv.formats' K/V types); other types read
# as "type<N>"
TYPE_IDS = {n: F.FORMATS[n].type_id for n in F.KV_TYPES}


class LayoutError(RuntimeError):
    """The loaded ggml does not match the ``ggml_tensor`` layout this module reads."""


OP_OFFSET = GgmlTensor.op.offset
_SRC_OFFSET = GgmlTensor.src.offset
_VIEW_SRC_OFFSET = GgmlTensor.view_src.offset
_NAME_OFFSET = GgmlTensor.name.offset
_NE_OFFSET = GgmlTensor.ne.offset


@dataclasses.dataclass(frozen=True)
class Node:
    """Descriptor of one ggml tensor at ``addr``: ``type`` (ggml type name), ``op`` (ggml op name),
    ``name``, ``ne`` / ``nb`` (4 each, fastest first), ``op_params`` (16 raw int32), ``src`` (10
    addresses, 0 = none), ``view_src`` (root address or 0), ``view_offs`` (bytes), ``data`` (address)."""

    addr: int
    type: str
    op: str
    name: str
    ne: tuple
    nb: tuple
    op_params: tuple
    src: tuple
    view_src: int
    view_offs: int
    data: int

    @property
    def root(self) -> int:
        """Address of the tensor that owns the bytes (itself unless a view)."""
        return self.view_src or self.addr

    def op_param_f32(self, i: int) -> float:
        """op_params[i] reinterpreted as float32 (ggml stores float params bitwise)."""
        return ctypes.c_float.from_buffer_copy(ctypes.c_int32(self.op_params[i])).value


class GgmlLib:
    """Names and sizes from a loaded ``libggml-base`` (a ``ctypes.CDLL``); reads :class:`Node`s."""

    def __init__(self, base: ctypes.CDLL):
        self.lib = base
        for fn, res, args in (("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
                              ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
                              ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
                              ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
                              ("ggml_version", ctypes.c_char_p, []),
                              ("ggml_commit", ctypes.c_char_p, [])):
            f = getattr(base, fn)
            f.restype, f.argtypes = res, args
        # ggml_op_name has no bounds check: only ids from ggml.h are read, and confirmed by name
        self.op_id = dict(OP_IDS)
        for name, i in OP_IDS.items():
            got = (base.ggml_op_name(i) or b"").decode(errors="replace")
            if got != name:
                raise LayoutError(f"libggml-base {self.version()}: op id {i} is {got!r}, expected {name!r} "
                                  f"(ggml.h enum ggml_op of another version)")
        self.ops = {i: n for n, i in OP_IDS.items()}
        self.types = {}
        for name, i in TYPE_IDS.items():  # ggml_type_name has no bounds check either
            got = (base.ggml_type_name(i) or b"").decode(errors="replace").lower()
            if got != name:
                raise LayoutError(f"libggml-base {self.version()}: type id {i} is {got!r}, expected {name!r}")
            self.types[i] = name
        self.checked = False

    def version(self) -> str:
        return self.lib.ggml_version().decode()

    def commit(self) -> str:
        return self.lib.ggml_commit().decode()

    def op_of(self, addr: int) -> int:
        """The op enum of the tensor at ``addr`` (one int read; the callback's fast path)."""
        return ctypes.c_int.from_address(addr + OP_OFFSET).value

    def src(self, addr: int, i: int) -> int:
        """Address of src[i] of the tensor at ``addr`` (0 = none): one pointer read."""
        return ctypes.c_void_p.from_address(addr + _SRC_OFFSET + i * ctypes.sizeof(ctypes.c_void_p)).value or 0

    def name(self, addr: int) -> str:
        """The tensor's own name (NUL-terminated within GGML_MAX_NAME)."""
        return ctypes.string_at(addr + _NAME_OFFSET).decode(errors="replace")

    def root_name(self, addr: int) -> str:
        """Name of the tensor that owns the bytes (view_src, or the tensor itself)."""
        vs = ctypes.c_void_p.from_address(addr + _VIEW_SRC_OFFSET).value
        return self.name(vs or addr)

    def ne0(self, addr: int) -> int:
        return ctypes.c_int64.from_address(addr + _NE_OFFSET).value

    def node(self, addr: int) -> Node:
        """Read the descriptor at ``addr``; the first call checks the struct layout against libggml."""
        t = GgmlTensor.from_address(addr)
        n = Node(addr=addr, type=self.types.get(t.type, f"type{t.type}"), op=self.ops.get(t.op, f"op{t.op}"),
                 name=t.name.decode(errors="replace"), ne=tuple(t.ne), nb=tuple(t.nb),
                 op_params=tuple(t.op_params), src=tuple(s or 0 for s in t.src), view_src=t.view_src or 0,
                 view_offs=int(t.view_offs), data=t.data or 0)
        if not self.checked:
            self._check(n)
        return n

    def nbytes(self, addr: int) -> int:
        """ggml_nbytes of the tensor at ``addr``."""
        return int(self.lib.ggml_nbytes(addr))

    def _check(self, n: Node):
        got = (self.lib.ggml_get_name(n.addr) or b"").decode(errors="replace")
        if got != n.name:
            raise LayoutError(f"ggml_tensor layout: name read {n.name!r}, ggml_get_name says {got!r}")
        if any(a < 0 or a > 1 << 40 for a in n.ne):
            raise LayoutError(f"ggml_tensor layout: ne {list(n.ne)} of {n.name!r} is implausible")
        self.checked = True
