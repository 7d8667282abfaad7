"""The eval callback: picks the attention nodes of a llama.cpp graph and snapshots their operands.

llama.cpp's scheduler calls ``cb_eval(t, ask=True)`` for each node to ask whether it is wanted and,
for a wanted node, ``cb_eval(t, ask=False)`` once it is computed (``False`` then would abort the graph,
so this callback always answers ``True``). On the CPU backend every ``data`` is host memory.

What is taken, per layer ``il`` (read from the K/V view's source name ``cache_k_l<il>`` /
``cache_v_l<il>``; FA nodes are unnamed, nothing is inferred from node order):

- flash attention on: the ``FLASH_ATTN_EXT`` node: q = src[0], k = src[1], v = src[2], mask = src[3],
  sinks = src[4], op params (scale, max_bias, softcap, precision, n_kv_max) and its output;
- flash attention off: ``kq = MUL_MAT(k, q)`` (k a view of ``cache_k_l<il>``) -> ``SOFT_MAX(kq, mask)``
  -> ``kqv = MUL_MAT(v, kq_soft_max)`` (v a view of ``cache_v_l<il>``), each operand copied when its
  node is computed (the allocator may reuse q's memory later in the graph).

``rotations`` records llama.cpp's Hadamard rotations seen in the graph (``attn_inp_k_rot`` /
``attn_inp_v_rot`` multiplied into q, k / v before a quantized cache, the output rotated back after the
attention): the captured q, K, V and out of such a run are in the rotated basis.

Every operand is copied as the **whole buffer** of its root tensor (``view_src``, or the tensor itself)
plus the view that the kernel read (``ne``, ``nb``, ``view_offs``): :class:`Operand`. No Python
exception ever crosses into C: errors are recorded in ``Collector.errors`` and the graph runs on.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re

from jaxkv import layout as L

__all__ = ["Operand", "Call", "Collector", "cache_layer"]

_CACHE = re.compile(r"^cache_([kv])_l(\d+)$")
# llama.cpp (2026) rotates q and k (and v) by an orthonormal Walsh-Hadamard matrix before a quantized
# cache and the attention output back: mul_mat(attn_inp_k_rot | attn_inp_v_rot, x) nodes
_ROTATIONS = {"attn_inp_k_rot": "k", "attn_inp_v_rot": "v"}


def cache_layer(name: str) -> tuple[str, int] | None:
    """``"cache_k_l12"`` -> ``("k", 12)``; anything else -> None."""
    m = _CACHE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand as the kernel read it: ``view`` (jaxkv.layout.View: type, ne, nb, offset into the
    buffer) over ``buffer`` (the root tensor's bytes), ``buffer_ne`` (the root's ne) and ``source``
    (the root's name)."""

    view: L.View
    buffer: bytes
    buffer_ne: tuple
    source: str


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call: ``op`` ('flash_attn_ext' | 'soft_max_attn'), ``layer``, ``step`` (0 =
    prefill), ``operands`` {role: Operand} (q, k, v, mask, sinks, out; v of soft_max_attn is the
    transposed [n_kv, Dv, Hkv] view: ``v_transposed``), ``params`` {scale, max_bias, softcap, prec,
    n_kv_max} and ``nodes`` {role: ggml node name}."""

    op: str
    layer: int
    step: int
    operands: dict
    params: dict
    nodes: dict
    v_transposed: bool = False


class Collector:
    """Holds the callback state. ``lib``: a :class:`jaxkv.capture.ggml_struct.GgmlLib`; ``layers``: the
    layer indices to keep (None = all). Call :meth:`begin_step` before each ``llama_decode`` and
    :meth:`take` after it; pass :attr:`c_callback` as ``llama_context_params.cb_eval``."""

    def __init__(self, lib, layers=None):
        from llama_cpp import ggml_backend_sched_eval_callback

        self.lib = lib
        self.layers = None if layers is None else frozenset(int(x) for x in layers)
        self.active = False
        self.step = 0
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self._pending: dict[int, dict] = {}
        self.rotations: dict[str, int] = {}  # "k" / "v" -> Hadamard block size seen in the graph
        self._fa = lib.op_id["FLASH_ATTN_EXT"]
        self._mm = lib.op_id["MUL_MAT"]
        self._sm = lib.op_id["SOFT_MAX"]
        self.c_callback = ggml_backend_sched_eval_callback(self._callback)  # keep alive with self

    # -- step bookkeeping --------------------------------------------------------------------------

    def begin_step(self, step: int, active: bool):
        """Start decode step ``step`` (0 = prefill); ``active`` False skips it at the ask stage."""
        self.step, self.active = int(step), bool(active)
        self._pending.clear()

    def take(self) -> tuple[list[Call], list[str]]:
        """The calls and errors collected since the last take (unfinished unfused chains are errors)."""
        calls, errors = self.calls, self.errors
        for il, p in sorted(self._pending.items()):
            errors.append(f"step {self.step} layer {il}: unfused chain kq -> soft_max -> kqv did not complete "
                          f"(reached {p['stage']})")
        self.calls, self.errors = [], []
        self._pending.clear()
        return calls, errors

    # -- the callback --------------------------------------------------------------------------------

    def _callback(self, t, ask, _user_data):
        try:
            if ask:
                return bool(self.active) and self._wanted(int(t))
            self._computed(int(t))
        except Exception as e:  # never into C
            self.errors.append(f"step {self.step}: {type(e).__name__}: {e}")
            return False if ask else True
        return True

    def _layer_of(self, addr: int, kind: str) -> int | None:
        if not addr:
            return None
        n = self.lib.node(addr)
        root = self.lib.node(n.view_src) if n.view_src else n
        kl = cache_layer(root.name)
        if kl is None or kl[0] != kind:
            return None
        return kl[1]

    def _keep(self, il) -> bool:
        return il is not None and (self.layers is None or il in self.layers)

    def _wanted(self, addr: int) -> bool:
        # the ask path runs for every node of the graph: raw pointer and name reads only
        lib = self.lib
        op = lib.op_of(addr)
        if op == self._fa:
            k = lib.src(addr, 1)
            kl = cache_layer(lib.root_name(k)) if k else None
            return kl is not None and kl[0] == "k" and self._keep(kl[1])
        if op == self._mm:
            s0 = lib.src(addr, 0)
            if not s0:
                return False
            own = lib.name(s0)
            if own in _ROTATIONS:  # llama.cpp's Hadamard rotation of q/k or v (quantized caches)
                self.rotations[_ROTATIONS[own]] = int(lib.ne0(s0))
                return False
            kl = cache_layer(lib.root_name(s0))
            return kl is not None and self._keep(kl[1])
        if op == self._sm:
            src0 = lib.src(addr, 0)
            return any(p.get("kq") == src0 for p in self._pending.values())
        return False

    def _computed(self, addr: int):
        n = self.lib.node(addr)
        if n.op == "FLASH_ATTN_EXT":
            il = self._layer_of(n.src[1], "k")
            if il is None:  # e.g. an F32 K cast to F16 inside the graph: not a view of the cache
                raise ValueError(f"flash_attn_ext node {n.name!r}: k is not a view of a cache_k_l<il> buffer")
            ops = {"q": self.operand(n.src[0]), "k": self.operand(n.src[1]), "v": self.operand(n.src[2]),
                   "out": self.operand(addr)}
            if n.src[3]:
                ops["mask"] = self.operand(n.src[3])
            if n.src[4]:
                ops["sinks"] = self.operand(n.src[4])
            params = dict(scale=n.op_param_f32(0), max_bias=n.op_param_f32(1), softcap=n.op_param_f32(2),
                          prec=int(n.op_params[3]), n_kv_max=int(n.op_params[4]))
            nodes = {r: self.lib.node(n.src[i]).name for i, r in enumerate(("q", "k", "v", "mask", "sinks"))
                     if n.src[i]}
            nodes["out"] = n.name
            self.calls.append(Call("flash_attn_ext", il, self.step, ops, params, nodes))
        elif n.op == "MUL_MAT" and self._layer_of(n.src[0], "k") is not None:
            il = self._layer_of(n.src[0], "k")
            self._pending[il] = dict(stage="kq", kq=addr, k=self.operand(n.src[0]), q=self.operand(n.src[1]),
                                     names={"kq": n.name, "k": self.lib.node(n.src[0]).name,
                                            "q": self.lib.node(n.src[1]).name}, kq_prec=int(n.op_params[0]))
        elif n.op == "SOFT_MAX":
            il = next(i for i, p in self._pending.items() if p.get("kq") == n.src[0])
            p = self._pending[il]
            if n.src[2]:
                raise ValueError(f"layer {il}: soft_max with sinks is not a soft_max_attn trace (no sinks)")
            p.update(stage="soft_max", sm=addr, scale=n.op_param_f32(0), max_bias=n.op_param_f32(1))
            p["names"]["soft_max"] = n.name
            if n.src[1]:
                p["mask"] = self.operand(n.src[1])
                p["names"]["mask"] = self.lib.node(n.src[1]).name
        elif n.op == "MUL_MAT" and self._layer_of(n.src[0], "v") is not None:
            il = self._layer_of(n.src[0], "v")
            p = self._pending.pop(il, None)
            if p is None or p.get("sm") != n.src[1]:
                raise ValueError(f"layer {il}: kqv's src[1] is not this layer's soft_max output (the graph "
                                 f"has ops between kq and soft_max or soft_max and kqv: softcap, kq bias)")
            ne, nb = n.ne, n.nb
            out_view = L.View(n.type, (ne[0], ne[2], ne[1], ne[3]), (nb[0], nb[2], nb[1], nb[3]), 0)
            out = self.operand(addr)
            ops = {"q": p["q"], "k": p["k"], "v": self.operand(n.src[0]),
                   "out": dataclasses.replace(out, view=out_view)}
            if "mask" in p:
                ops["mask"] = p["mask"]
            names = dict(p["names"], v=self.lib.node(n.src[0]).name, out=n.name)
            params = dict(scale=p["scale"], max_bias=p["max_bias"], softcap=0.0, prec=p["kq_prec"], n_kv_max=0)
            self.calls.append(Call("soft_max_attn", il, self.step, ops, params, names, v_transposed=True))

    def operand(self, addr: int) -> Operand:
        """Copy the whole root buffer of the tensor at ``addr`` and the view the kernel reads."""
        n = self.lib.node(addr)
        root = self.lib.node(n.view_src) if n.view_src else n
        if root.type != n.type:
            raise ValueError(f"tensor {n.name!r}: view type {n.type} differs from its source {root.type}")
        offset = n.view_offs if n.view_src else 0
        if n.data != root.data + offset:
            raise ValueError(f"tensor {n.name!r}: data is not view_src.data + view_offs (ggml_tensor layout?)")
        want = L.contiguous_strides(root.type, root.ne)
        if tuple(root.nb) != tuple(want):
            raise ValueError(f"tensor {root.name!r}: the root buffer is not contiguous (nb {list(root.nb)})")
        size = self.lib.nbytes(root.addr)
        view = L.validate(L.View(n.type, n.ne, n.nb, offset), size, n.name or "tensor")
        return Operand(view=view, buffer=ctypes.string_at(root.data, size), buffer_ne=tuple(root.ne),
                       source=root.name)
