"""What an op and a precision model are (:class:`Op`, :class:`Precision`), and the two registries.

Layout as everywhere (``jaxkv.attention``): q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv],
mask [B|1, H|1, n_q, n_kv], sinks [H], out [B, n_q, H, Dv].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Precision", "PRECISIONS", "precision", "Op", "OPS", "register", "unregister", "get", "by_target", "infer"]


@dataclasses.dataclass(frozen=True)
class Precision:
    """A precision model: how a kernel declares it rounds. ``model_name``: how verdicts name the model
    a budget is derived from; ``sharp``: the model is bit-faithful, so a kernel must also match it
    within ``jaxkv.budget.EMU_UNITS`` accumulator roundings (the sharp check)."""

    name: str
    model_name: str
    sharp: bool = False
    doc: str = ""


#: precision name -> :class:`Precision` (``auto`` is resolved from a trace, never registered)
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("ggml-cpu", "ggml-cpu emulation", True, "bit-faithful emulation of ggml's CPU backend "
              "(jaxkv.ggml_cpu), parameterised by the trace's build facts"),
    Precision("f16", "f16 model", False, "the generic F16 model (jaxkv.precision)"),
    Precision("f32", "f32 reference", False, "float32 attention (jaxkv.attention, precision='f32')"),
    Precision("f64", "f64 golden", False, "the float64 golden itself (the budget is the floor)"),
)}


def precision(name: str, field: str = "precision") -> Precision:
    """The registered :class:`Precision` ``name``; ValueError naming ``field`` otherwise."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{field}: expected one of {tuple(PRECISIONS)}, found {name!r}") from None


#: (trace, case, **config) -> the model's output [B, n_q, H, Dv] float64
ModelFn = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: everything the verifier, the fuzzer, replay, record and capture look up about it.

    - ``roles``: every tensor role a trace of the op may hold -> the ggml type names (lower case) it
      may be stored in; ``required``: the roles a trace must hold; ``kv_roles``: the roles holding
      the KV cache; ``params``: the scalar parameters it reads besides ``scale`` (``softcap``,
      ``max_bias``).
    - ``case(trace)``: the trace's exact inputs as a dense float64 ``Case``; ``golden(case)``: the
      float64 golden (one independent implementation, with the bug hooks the diagnosis uses);
      ``reference(case, precision)``: the golden a kernel is judged against under ``precision``
      (default: ``golden``; ggml defines some rows as NaN).
    - ``models``: precision name -> honest model ``(trace, case, **config) -> out``;
      ``dense_models``: precision name -> ``trace -> (case -> out)``, the model on a dense ``Case``
      (budgets re-derived on a bug's inputs), absent where the budget is the floor; ``fallback(trace,
      case) -> (out, name)``: the model used when the declared one raises NotImplementedError;
      ``acc_unit(trace)``: unit roundoff of the V accumulator (the sharp check's unit);
      ``config_tries(trace, case)``: ``[(label, trace', config)]`` alternative build configurations
      the diagnosis reruns the ``ggml-cpu`` model with.
    - ``live(tensors, params) -> out``: the op run in live ggml (``jaxkv.oracles.ggml``) on a trace's
      stored tensors ``{role: (ggml type name, canonical array or raw blocks)}`` with ``params``
      (``scale``, ``max_bias``, ``softcap``, ``n_threads``, ``kv_order``, ``mask``), or None;
      ``target``: the name of its live-ggml fuzz target; ``file_tag``: short name for file names.
    - ``kv_f16``: the op rounds its whole KV cache to F16 (the mixed cache); ``kv_regions``: the
      named regions its KV cache is split in (roles ``k_<region>``/``v_<region>``, concatenated in
      ``kv_order``), empty for a single ``k``/``v``; ``kv_split(trace, n_threads)``: ggml's split-KV
      chunk count of the op's path, None when it does not split the softmax over KV;
      ``absent_why``: role -> why the op has no such role (for error messages); ``ggml_path``: the
      ggml path name of an op that always runs one path of its own (e.g. ``"unfused"``), None when
      ``jaxkv.ggml_cpu.path``'s rule chooses it (the fuzz campaign's path-coverage table).
    """

    name: str
    doc: str
    roles: Mapping[str, tuple[str, ...]]
    required: tuple[str, ...]
    kv_roles: tuple[str, ...]
    params: tuple[str, ...]
    case: Callable[[Any], Any]
    golden: Callable[[Any], np.ndarray]
    models: Mapping[str, ModelFn]
    acc_unit: Callable[[Any], float]
    dense_models: Mapping[str, Callable[[Any], Callable[[Any], np.ndarray]]] = dataclasses.field(default_factory=dict)
    reference: Callable[[Any, str], np.ndarray] | None = None
    fallback: Callable[[Any, Any], tuple] | None = None
    config_tries: Callable[[Any, Any], list] | None = None
    live: Callable[..., np.ndarray] | None = None
    target: str | None = None
    file_tag: str = ""
    kv_f16: bool = False
    kv_regions: tuple[str, ...] = ()
    kv_split: Callable[[Any, int], int] | None = None
    absent_why: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ggml_path: str | None = None

    def model(self, precision_name: str) -> ModelFn:
        """The op's model for ``precision_name``; ValueError naming what this op has otherwise."""
        precision(precision_name)
        try:
            return self.models[precision_name]
        except KeyError:
            raise ValueError(f"precision: op {self.name!r} has no {precision_name!r} model (it has "
                             f"{', '.join(self.models)})") from None

    def judged_golden(self, case, precision_name: str) -> np.ndarray:
        """The golden a kernel of this op is judged against under ``precision_name``."""
        if self.reference is not None:
            return self.reference(case, precision_name)
        return self.golden(case)

    def dense_model(self, trace, precision_name: str):
        """The honest model of ``precision_name`` as a function of a dense ``Case`` (None when the
        budget is the floor: no dense model)."""
        make = self.dense_models.get(precision_name)
        return None if make is None else make(trace)

    def takes(self, what: str) -> bool:
        """Whether the op reads ``what``: a tensor role (``mask``, ``sinks``, ...) or a parameter."""
        return what in self.roles or what in self.params


#: op name -> :class:`Op`, in registration order
OPS: dict[str, Op] = {}


def register(op: Op, *, replace: bool = False) -> Op:
    """Add ``op`` to :data:`OPS` (ValueError if the name is taken, unless ``replace``); returns it."""
    if op.name in OPS and not replace:
        raise ValueError(f"op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def unregister(name: str) -> None:
    """Remove op ``name`` from :data:`OPS` (tests that register a toy op)."""
    OPS.pop(name, None)


def get(name: str, field: str = "op") -> Op:
    """The registered op ``name``; ValueError ``"<field>: expected one of (...), found 'x'"`` otherwise."""
    try:
        return OPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{field}: expected one of {tuple(OPS)}, found {name!r}") from None


def infer(present) -> Op:
    """The op a file without an op name holds, from the tensor roles ``present``: the first registered
    op that has every one of its required roles there, else the one with the fewest present roles it
    does not have (a file that is no op's then fails that op's role checks, naming the role)."""
    present = set(present)
    best = max(OPS.values(), key=lambda op: (set(op.required) <= present and present <= set(op.roles),
                                             -len(present - set(op.roles))))
    return best


def by_target(target: str, field: str = "--target") -> Op:
    """The op whose live-ggml fuzz target is named ``target``."""
    for op in OPS.values():
        if op.target == target:
            return op
    raise ValueError(f"{field}: expected one of {tuple(o.target for o in OPS.values() if o.target)}, "
                     f"found {target!r}")
