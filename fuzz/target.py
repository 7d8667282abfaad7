"""What a fuzz ``--target`` is: a typed :class:`Target` (the kernel and the contract it declares).

A target's kernel has the canonical signature ``fn(q, k, v, *, scale, mask=None, softcap=0.0,
max_bias=0.0, sinks=None) -> out`` with q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv],
mask [B|1, H|1, n_q, n_kv] or None, sinks [H] or None, out [B, n_q, H, Dv].

Live-ggml targets (:mod:`fuzz.ggml_targets`) are built as Targets. A user's ``MODULE:FUNCTION``
function is wrapped at the edge by :func:`as_target`, which reads its declared attributes once
(``declared_precision``, ``model``, ``op``, ``n_threads``, ``isa``, ``unsupported``, ``prepare``,
``case_strategy``, ``case_arrays``, ``coverage``, ``coverage_table``, ``name``): nothing downstream
probes a function with ``getattr``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jaxkv import ops
from jaxkv.ops.golden import Case  # the dense case the ops' goldens take (fuzz's one import of it)
from jaxkv.ops.operands import dense as _dense  # K/V as float64, blocks dequantized (the one helper)

__all__ = ["Target", "as_target", "check_declared", "ATTRIBUTES", "Case", "dense_operands", "dense_case"]

#: the attributes a user's function may declare (read once by :func:`as_target`)
ATTRIBUTES = ("name", "op", "declared_precision", "model", "n_threads", "isa", "version", "llamafile",
              "unsupported", "prepare", "case_strategy", "case_arrays", "coverage", "coverage_table")


@dataclasses.dataclass(frozen=True)
class Target:
    """A kernel under test and its declared contract.

    - ``name``: how the campaign names it (``ggml``, ``fuzz.targets:flash_decode``, ...); ``fn``: the
      kernel; ``op``: the :class:`jaxkv.ops.Op` it implements (None: a plain attention kernel).
    - ``declared_precision``: the precision model it claims (``ggml-cpu``: judged per case against
      ``model``, its emulation with the same signature, by jaxkv.verify's budget and sharp check;
      another, e.g. ``f32``: by jaxkv.verify's judge on its op's golden and model for it,
      :func:`fuzz.properties.declared_verdict`; None: the a-priori f32 bound of :mod:`fuzz.bounds`).
    - ``n_threads``, ``isa``, ``version``, ``llamafile``: the build facts of a live-ggml kernel.
    - ``unsupported``: optional operands it refuses (``softcap``, ``sinks``, ``alibi``): never drawn.
    - ``prepare(k, v) -> dict``: the storage it gives k and v (the golden is over the stored values).
    - ``case_strategy()``: its own hypothesis case strategy, ``case_arrays(case) -> dict``: the
      (unpadded) call of one of its cases; ``coverage``: a Counter of its calls per path, printed by
      ``coverage_table()``.
    - ``resolve(case) -> (Target, case view)``: for case vocabularies whose cases name their own op,
      formats and threads (the ggml menus): the target a case runs on and the case in the target
      vocabulary (keys sinks, B, n_q, Dv, k_fmt, v_fmt).
    """

    name: str
    fn: Callable
    op: ops.Op | None = None
    declared_precision: str | None = None
    model: Callable | None = None
    n_threads: int = 1
    isa: str | None = None
    version: str | None = None
    llamafile: bool = False
    unsupported: tuple = ()
    prepare: Callable | None = None
    case_strategy: Callable | None = None
    case_arrays: Callable | None = None
    coverage: Any = None
    coverage_table: Callable | None = None
    resolve: Callable | None = None
    doc: str = ""

    def __call__(self, q, k, v, **kw):
        return self.fn(q, k, v, **kw)

    def __repr__(self):
        op = self.op.name if self.op is not None else None
        return f"Target({self.name!r}, op={op!r}, precision={self.declared_precision!r}, n_threads={self.n_threads})"

    @property
    def kernel_op(self) -> ops.Op:
        """The op the kernel implements: ``op``, or ``flash_attn_ext`` for a plain attention kernel."""
        return self.op if self.op is not None else ops.get("flash_attn_ext")

    @property
    def sharp(self) -> bool:
        """The target declares the bit-faithful ``ggml-cpu`` model (and has it): judged against it."""
        return self.model is not None and self.declared_precision is not None and \
            ops.PRECISIONS.get(self.declared_precision, ops.PRECISIONS["f64"]).sharp

    def for_case(self, case: dict):
        """(target, case view) a case runs on: ``resolve(case)`` when set, else (self, case)."""
        return self.resolve(case) if self.resolve is not None else (self, case)

    def with_fn(self, fn: Callable, name: str | None = None, doc: str = "") -> "Target":
        """The same contract around another kernel (a wrapper, a deliberately buggy variant)."""
        return dataclasses.replace(self, fn=fn, name=name or self.name, doc=doc or self.doc)


def _op_of(x):
    if x is None or isinstance(x, ops.Op):
        return x
    return ops.get(x, "op")


def as_target(fn, name: str | None = None) -> Target | None:
    """``fn`` as a :class:`Target`: a Target as is; a plain callable with its declared attributes
    (:data:`ATTRIBUTES`, each read here once: ``op`` may be an op name); None stays None."""
    if fn is None or isinstance(fn, Target):
        return fn
    declared = {a: getattr(fn, a) for a in ATTRIBUTES if getattr(fn, a, None) is not None}
    kw = {}
    for a, x in declared.items():
        if a == "op":
            kw["op"] = _op_of(x)
        elif a in ("case_strategy", "case_arrays", "model", "prepare", "coverage_table"):
            if callable(x):
                kw[a] = x
        elif a == "unsupported":
            kw[a] = tuple(x)
        elif a != "name":
            kw[a] = x
    t = Target(name=str(declared.get("name") or name or getattr(fn, "__name__", "target")), fn=fn,
               doc=getattr(fn, "__doc__", None) or "", **kw)
    check_declared(t)
    return t


def check_declared(t: Target) -> None:
    """A target's declared precision must be a registered one its op has a model for (``ggml-cpu``, the
    bit-faithful model: the target's own emulation ``model``); ValueError with one line naming the
    field otherwise (``op 'x' has no 'f16' model``)."""
    if t.declared_precision is None:
        return
    p = ops.precision(t.declared_precision, "declared_precision")
    if p.sharp:
        if t.model is None:
            raise ValueError(f"declared_precision {p.name!r} is bit-faithful: the target must give its "
                             f"emulation as 'model'")
        return
    op = t.kernel_op
    if p.name not in op.models:
        raise ValueError(f"op {op.name!r} has no {p.name!r} model")


def dense_operands(st) -> tuple:
    """(k, v) float64 [B, n_kv, Hkv, D]: the values a kernel attends over for the storage ``st``
    (``Target.prepare``): dequantized blocks, F16/F32 as stored; a mixed cache's cold and hot regions
    (``k_cold``, ``k_hot``, ...) concatenated and rounded to F16 (the op rounds its KV cache so)."""
    if "k_cold" in st:
        return tuple(np.concatenate([_dense(st[f"{r}_cold"]), _dense(st[f"{r}_hot"])], 1)
                     .astype(np.float16).astype(np.float64) for r in ("k", "v"))
    return _dense(st["k"]), _dense(st["v"])


def dense_case(t: Target, q, k, v, kw) -> Case:
    """The dense float64 :class:`Case` of a call of target ``t`` (q [B, n_q, H, Dk], k / v as the target
    receives them, ``kw``: scale, mask, softcap, max_bias, sinks): K/V as the target stores them
    (``t.prepare``), the op of the dense call (an op rounding its KV cache to F16 is flash_attn_ext over
    the rounded concatenation), ``n_threads`` of the target."""
    st = t.prepare(k, v) if t.prepare is not None else dict(k=k, v=v)
    kd, vd = dense_operands(st)
    op = t.kernel_op
    dense_op = ops.get("flash_attn_ext") if op.kv_f16 else op
    return Case(op=dense_op.name, q=np.asarray(q), k=kd, v=vd, mask=kw["mask"], sinks=kw["sinks"],
                scale=float(kw["scale"]), softcap=float(kw["softcap"]), max_bias=float(kw["max_bias"]),
                n_threads=int(t.n_threads))
