"""Trace verification: recompute a trace's output, derive its tolerance, give a verdict.

A kernel's output ``out`` [B, n_q, H, Dv] is compared with the float64 golden reference computed on the
trace's own (dequantized) inputs. The budget is derived per trace (docs/tolerance.md):

    error(kernel, golden) <= C * error(model, golden) + floor

where ``model`` is an honest implementation with the kernel's declared precision (``ggml-cpu``: the
bit-faithful emulation ``jaxkv.ggml_cpu``; ``f16``: the generic model ``jaxkv.precision``; ``f32``:
``attention(precision="f32")``; ``f64``: the golden itself) and ``error`` is both the NMSE (with
``C**2``) and the max-abs error. Under ``ggml-cpu`` the kernel must also stay within ``EMU_UNITS``
accumulator rounding units of the emulation itself (the sharp check).

On failure, :mod:`jaxkv.verify.diagnose` tests named bug hypotheses and localizes the error.

Statuses (:data:`STATUSES`) and the exit codes of ``python -m fuzz verify`` (:data:`EXIT_CODES`): ``pass``
0, ``fail`` 1, ``error`` 2 (unreadable input, bad usage), ``undecided`` 3. ``undecided`` is given when
no verdict can be trusted (docs/tolerance.md, "Undecided, NaN inputs and the fallback budget"):

- the reference is undefined: an input the golden reads holds NaN or inf (``scale``, ``softcap``,
  ``max_bias``, a q entry, a K/V entry of a key that is live for some row, a mask entry that is NaN or
  +inf, a NaN or +inf sink) or the golden overflows; the verdict names the input and its first index
  (:func:`undefined_inputs`);
- the budget is not below the signal: the verdict would pass the all-zero output (the golden budget
  allows an error of NMSE 1 and ``max|golden|``, and the sharp check, if any, allows the zero output
  too): it could then not reject a zero or a sign-flipped output either (:func:`below_signal`).

An output that fails a budget above the signal still fails (it is farther from the golden than the
budget allows, however loose). When the declared model does not cover the trace (``ggml-cpu`` raising
``NotImplementedError``, e.g. ``jaxkv.ggml_cpu.Unmodelled`` for ggml's tiled path), the verdict is
judged under the fallback budget of :func:`fallback_model` and says so (``Verdict.fallback``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxkv import ops
from jaxkv.budget import U32, Budget, EmuCheck, Errors, derive_budget, emu_check, errors
from jaxkv.ops.golden import Case
from jaxkv.verify import diagnose as dg
from jaxkv.verify.undecided import below_signal, reference_undefined

__all__ = ["PRECISIONS", "STATUSES", "EXIT_CODES", "Verdict", "resolve_precision", "case_from_trace",
           "golden_output", "golden_for", "model_output", "fallback_model", "dense_model_fn", "trace_acc_unit",
           "verify_case", "verify_trace"]

#: the precision names a verdict may be asked for: ``auto`` (resolved from the trace) and the
#: registered precision models (:data:`jaxkv.ops.PRECISIONS`)
PRECISIONS = ("auto",) + tuple(ops.PRECISIONS)
STATUSES = ("pass", "fail", "error", "undecided")
#: exit status of ``python -m fuzz verify`` per verdict; a run exits with the first of error (2), fail
#: (1), undecided (3) that occurred, else 0
EXIT_CODES = {"pass": 0, "fail": 1, "error": 2, "undecided": 3}


def resolve_precision(trace, precision: str = "auto") -> str:
    """``auto`` -> ``ggml-cpu`` when the metadata carries ggml build facts (``ggml.version`` or
    ``ggml.isa``: ``record`` and ``capture`` write them) or ``trace.producer`` starts with ``ggml``;
    ``float64 reference`` -> ``f64``; anything else -> ``f16``. Other values are returned as given
    (validated)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    md = getattr(trace, "metadata", None) or {}
    if md.get("ggml.version") is not None or md.get("ggml.isa") is not None:
        return "ggml-cpu"
    prod = str(getattr(trace, "producer", "") or "").strip().lower()
    if prod.startswith("ggml"):
        return "ggml-cpu"
    if prod.startswith("float64 reference"):
        return "f64"
    return "f16"


def case_from_trace(trace) -> Case:
    """The trace's exact inputs as a dense float64 :class:`jaxkv.ops.golden.Case` (its op's ``case``:
    quantized K/V dequantized; a mixed cache concatenated in ``kv_order`` and rounded to F16, as the op
    defines, its values before that rounding in ``kv_exact``, for the diagnosis)."""
    return ops.get(trace.op, "trace.op").case(trace)


def golden_output(case: Case) -> np.ndarray:
    """The float64 golden reference of a case: :func:`jaxkv.ops.golden.golden` (numpy; equal to
    ``jaxkv.attention.attention(precision="f64")`` within float64 rounding, tested) — numpy because
    every trace has its own shapes and a compiled function per trace would cost more than the sums."""
    return ops.get(case.op, "case.op").golden(case)


def golden_for(op: str, case: Case, precision: str) -> np.ndarray:
    """The golden a trace of ``op`` is judged against under ``precision``: the op's ``reference``
    (:meth:`jaxkv.ops.Op.judged_golden`; e.g. under ``ggml-cpu`` the unfused op's rows with no live key
    are NaN, as ggml defines them: :func:`jaxkv.ops.family.dead_rows_nan`)."""
    return ops.get(op, "op").judged_golden(case, precision)


def trace_acc_unit(trace) -> float:
    """Unit roundoff of the V accumulator of a trace's op (:func:`jaxkv.ops.family.acc_unit`)."""
    return ops.get(trace.op, "trace.op").acc_unit(trace)


def model_output(trace, case: Case, precision: str, **config) -> np.ndarray:
    """The honest model's output [B, n_q, H, Dv] for a resolved precision (not ``auto``): the trace's
    op's model for it. ``config`` (ggml-cpu only): ``n_threads`` / ``isa`` overriding the trace's (the
    ISA comes from :func:`jaxkv.ops.ggml_build.trace_isa` otherwise)."""
    if precision not in ops.PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS[1:]}, got {precision!r}")
    return ops.get(trace.op, "trace.op").model(precision)(trace, case, **config)


def fallback_model(trace, case: Case) -> tuple[np.ndarray, str]:
    """The fallback when the declared model does not cover a trace (a ggml path ``jaxkv.ggml_cpu``
    does not emulate): the op's ``fallback`` (:func:`jaxkv.ops.family.fallback`: the generic model with
    the trace's roundings) -> (out [B, n_q, H, Dv] float64, model name). It has no sharp check, so it
    cannot see bugs below the golden budget."""
    return ops.get(trace.op, "trace.op").fallback(trace, case)


def dense_model_fn(trace, precision: str):
    """The honest model of a resolved precision as a function of a dense :class:`Case` (used to
    re-derive budgets on a bug's inputs), the op's ``dense_models``: None for ``f64`` (the budget is
    the floor)."""
    return ops.get(trace.op, "trace.op").dense_model(trace, precision)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome for one trace: ``status`` one of :data:`STATUSES`; ``errors`` vs golden; ``budget``
    (``budget.model``: the model it was derived from); ``emu`` (ggml-cpu only); ``diagnosis``: tuple
    of dicts (hypothesis, label, nmse, max_abs); ``localization``: where the error concentrates
    (failures without an explaining hypothesis); ``reason``: why ``undecided``; ``fallback``: why the
    declared model was replaced by :func:`fallback_model` (None when it was not)."""

    trace: str
    status: str
    precision: str | None = None
    errors: Errors | None = None
    budget: Budget | None = None
    emu: EmuCheck | None = None
    diagnosis: tuple = ()
    localization: dict | None = None
    error: str | None = None
    reason: str | None = None
    fallback: str | None = None

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_CODES` of the status."""
        return EXIT_CODES[self.status]

    def to_json(self) -> dict:
        """A JSON-ready dict (non-finite numbers become null)."""
        def num(x):
            return float(x) if x is not None and math.isfinite(x) else None

        d = dict(trace=self.trace, status=self.status, precision=self.precision, nmse=None,
                 max_abs=None, budget=None, worst=None, per_head_max_abs=None, nan_count=None,
                 diagnosis=[dict(x, nmse=num(x["nmse"]), max_abs=num(x["max_abs"]))
                            for x in self.diagnosis], error=self.error, reason=self.reason,
                 model=self.budget.model if self.budget is not None else None,
                 fallback=self.fallback)
        if self.errors is not None:
            e = self.errors
            d.update(nmse=num(e.nmse), max_abs=num(e.max_abs), worst=e.worst,
                     per_head_max_abs=[num(x) for x in e.per_head_max_abs], nan_count=e.nan_count)
        if self.budget is not None:
            b = self.budget
            d["budget"] = dict(nmse=num(b.nmse), max_abs=num(b.max_abs), model=b.model,
                               model_nmse=num(b.model_nmse), model_max_abs=num(b.model_max_abs),
                               factor=b.factor, floor_nmse=b.floor_nmse, floor_abs=b.floor_abs,
                               derivation=b.derivation())
        if self.emu is not None:
            m = self.emu
            d["emulation"] = dict(max_abs=num(m.max_abs), units=num(m.units), unit=m.unit,
                                  budget_units=m.budget_units, n_differ=m.n_differ, ok=m.ok)
        if self.localization is not None:
            d["localization"] = self.localization
        return d

    def line(self) -> str:
        """One human line: status, NMSE, max-abs, budget."""
        if self.status == "error":
            return f"ERROR {self.trace}: {self.error}"
        e, b = self.errors, self.budget
        prec = self.precision if self.fallback is None else f"{self.precision} -> fallback {b.model}"
        s = (f"{self.status.upper():5} {self.trace}  [{prec}]  nmse {e.nmse:.3g} "
             f"(budget {b.nmse:.3g})  max_abs {e.max_abs:.3g} (budget {b.max_abs:.3g})")
        if self.emu is not None:
            s += f"  emu {self.emu.units:.3g} units (budget {self.emu.budget_units:g})"
        if e.nan_count:
            s += f"  NaN {e.nan_count}"
        if self.reason:
            s += f"  -- {self.reason}"
        return s

    def details(self) -> str:
        """The details block of a failure (budget derivation, worst element, per-head, diagnosis)."""
        e, b = self.errors, self.budget
        lines = [f"  budget: {b.derivation()}"]
        if self.fallback:
            lines.append(f"  fallback: {self.fallback}; judged by the {b.model} (no sharp check)")
        if self.status == "undecided":
            lines.append(f"  undecided: {self.reason}")
        if self.emu is not None:
            m = self.emu
            lines.append(f"  vs emulation: max_abs {m.max_abs:.3g}, {m.units:.3g} units of "
                         f"{m.unit:.3g} * max|row| (budget {m.budget_units:g}), {m.n_differ} "
                         f"elements differ")
        w = e.worst
        if w:
            lines.append(f"  worst: batch {w['batch']} query {w['query']} head {w['head']} dim "
                         f"{w['dim']}: got {w['got']:.6g}, expected {w['expected']:.6g}")
        lines.append("  per-head max_abs: " + " ".join(f"{x:.2g}" for x in e.per_head_max_abs))
        lines.append(f"  NaN in output: {e.nan_count}")
        if self.status == "undecided":  # nothing to explain: no verdict
            return "\n".join(lines)
        if self.diagnosis:
            lines.append("  diagnosis (hypotheses that explain the output):")
            lines += [f"    - {x['hypothesis']}: {x['label']} (with it: nmse {x['nmse']:.3g}, max_abs "
                      f"{x['max_abs']:.3g}; judged at the {x.get('level', 'golden')} level)"
                      for x in self.diagnosis]
        else:
            lines.append("  diagnosis: no hypothesis explains the output")
            loc = self.localization or {}
            for key in ("per_query_max_abs", "per_head_max_abs"):
                if key in loc:
                    lines.append(f"    {key}: " + " ".join(f"{x:.2g}" for x in loc[key]))
            for c in loc.get("per_chunk", []):
                lines.append(f"    KV keys {c['keys'][0]}..{c['keys'][1] - 1}: share of error "
                             f"{c['share']:.2f}")
        return "\n".join(lines)


def verify_case(case: Case, got, model, precision: str, *, name: str = "",
                emu=None, emu_unit: float = U32, golden=None, diagnose: bool = True,
                variant_outputs: dict | None = None, model_fn=None, model_name: str | None = None,
                fallback: str | None = None) -> Verdict:
    """Verdict of a kernel output ``got`` [B, n_q, H, Dv] on ``case``, given the honest model's output
    ``model`` for ``precision`` and, under ggml-cpu, the emulation ``emu`` (the same array as model).
    ``variant_outputs``, ``model_fn``: passed to :func:`jaxkv.verify.diagnose.diagnose`. ``model_name``
    overrides the precision's model name (a fallback model), ``fallback`` says why.
    ``undecided`` (module docstring) when the reference is undefined, or when the output passes but
    the verdict would pass the all-zero output too."""

    g = golden_output(case) if golden is None else np.asarray(golden, np.float64)
    if model_name is None:
        model_name = ops.PRECISIONS[precision].model_name
    budget = derive_budget(g, model, model_name)
    e = errors(got, g)
    ok = budget.allows(e)
    ec = emu_check(got, emu, emu_unit) if emu is not None else None
    if ec is not None:
        ok = ok and ec.ok
    why = None
    if not np.all(np.isfinite(g)):  # NaN rows that ggml defines (golden_for) are no reason
        why = reference_undefined(case, g if golden is None else None)
    if why is not None:
        return Verdict(name, "undecided", precision, e, budget, ec, reason=why, fallback=fallback)
    if ok:
        if not below_signal(budget, g, emu, emu_unit):
            gmax = float(np.max(np.abs(g), initial=0.0, where=np.isfinite(g)))
            why = (f"budget not below the signal: the all-zero output would pass (its nmse 1 vs budget "
                   f"{budget.nmse:.3g}, its max_abs {gmax:.3g} vs budget {budget.max_abs:.3g})")
            return Verdict(name, "undecided", precision, e, budget, ec, reason=why, fallback=fallback)
        return Verdict(name, "pass", precision, e, budget, ec, fallback=fallback)
    diag, loc = (), None
    if diagnose:
        diag = tuple(dg.diagnose(case, got, budget, golden=g, emu=emu, emu_check=ec,
                                       outputs=variant_outputs, model_fn=model_fn))
        if not diag:
            loc = dg.localize(case, got, g)
    return Verdict(name, "fail", precision, e, budget, ec, diag, loc, fallback=fallback)


def verify_trace(trace, precision: str = "auto", *, name: str | None = None,
                 diagnose: bool = True) -> Verdict:
    """Verify one loaded trace (``jaxkv.trace.Trace``) -> :class:`Verdict`: its op's (``jaxkv.ops``)
    case, model for the resolved precision (its fallback where that does not cover the trace),
    judged golden and accumulator unit; the emulation is the sharp check of a sharp precision."""
    name = name if name is not None else str(getattr(trace, "path", "") or "trace")
    prec = resolve_precision(trace, precision)
    op = ops.get(trace.op, "trace.op")
    case = op.case(trace)
    got = np.asarray(trace.out, np.float64)
    fallback = model_name = None
    try:
        model = op.model(prec)(trace, case)
    except NotImplementedError as e:  # a path the declared model does not cover (ggml_cpu.Unmodelled)
        model, model_name = op.fallback(trace, case)
        msg = str(e).strip().splitlines()
        fallback = f"the {prec} model does not cover this trace ({msg[0] if msg else type(e).__name__})"
    emu = model if ops.PRECISIONS[prec].sharp and fallback is None else None
    g = op.judged_golden(case, prec)
    v = verify_case(case, got, model, prec, name=name, emu=emu, emu_unit=op.acc_unit(trace), golden=g,
                    diagnose=diagnose, model_fn=op.dense_model(trace, prec), model_name=model_name,
                    fallback=fallback)
    if diagnose and v.status == "fail" and emu is not None and not v.emu.ok:
        extra = tuple(config_findings(op, trace, case, got, v.budget, v.emu.unit, g, prec))
        if extra:
            v = dataclasses.replace(v, diagnosis=v.diagnosis + extra, localization=None)
    return v


def config_findings(op, trace, case, got, budget, unit, g, precision: str = "ggml-cpu") -> list[dict]:
    """The trace's build configured otherwise than it says (``op.config_tries``: for the mixed cache
    its regions in the other order, mask alike; another thread count, i.e. split-KV chunking; another
    SIMD build). Each is the sharp model rerun so configured; it explains the output when both checks
    then pass."""
    if op.config_tries is None or not budget.allows(errors(got, g)):  # the golden check does not depend
        return []                                                     # on the configuration tried
    found = []
    model = op.model(precision)
    for label, t2, cfg in op.config_tries(trace, case):
        try:
            emu2 = model(t2, case, **cfg)
        except (ValueError, NotImplementedError):
            continue
        ec = emu_check(got, emu2, unit)
        if ec.ok:
            found.append(dict(hypothesis="ggml_config", label=label, nmse=errors(got, emu2).nmse,
                              max_abs=ec.max_abs, level="emulation (configuration)"))
    return found
