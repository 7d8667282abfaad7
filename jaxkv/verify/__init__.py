"""Trace verification: recompute a trace's output, derive its tolerance, give a verdict; diagnose failures.

The package's modules, one job each:

- :mod:`jaxkv.budget` — errors, the budget ``error(kernel) <= C error(model) + floor`` and the sharp
  check (kept at ``jaxkv.budget``: the fuzz engine and the numerics use it without the verifier);
- :mod:`jaxkv.verify.verdict` — :class:`Verdict`, :func:`verify_case`, :func:`verify_trace`: every
  op-dependent step is a look-up in the op registry (:mod:`jaxkv.ops`);
- :mod:`jaxkv.verify.undecided` — when no verdict can be trusted;
- :mod:`jaxkv.verify.mutations` — named bug hypotheses (variants of the op's golden);
- :mod:`jaxkv.verify.diagnose` and :mod:`jaxkv.verify.chunk_search` — which hypothesis explains a
  failure, or where the error is (they take a budget object, never the verifier);
- :mod:`jaxkv.verify.timings` — where the time goes.

This module re-exports the public names (``from jaxkv import verify as V; V.verify_trace(...)``).
The method: docs/tolerance.md; the statuses and exit codes: :mod:`jaxkv.verify.verdict`.
"""

from __future__ import annotations

from jaxkv.budget import (DENORM32, EMU_UNITS, FACTOR, FLOOR_UNITS, U16, U32, Budget, EmuCheck, Errors,
                          derive_budget, emu_check, errors)
from jaxkv.ops.family import acc_unit
from jaxkv.ops.ggml_build import UnmodelledIsa, mul_mat_facts, trace_contract, trace_isa
from jaxkv.ops.golden import dead_rows
from jaxkv.verify import chunk_search, diagnose, mutations  # noqa: F401
from jaxkv.verify.timings import Timings
from jaxkv.verify.undecided import below_signal, reference_undefined, undefined_inputs
from jaxkv.verify.verdict import (EXIT_CODES, PRECISIONS, STATUSES, Verdict, case_from_trace, config_findings,
                                  dense_model_fn, fallback_model, golden_for, golden_output, model_output,
                                  resolve_precision, trace_acc_unit, verify_case, verify_trace)

__all__ = [
    "PRECISIONS", "STATUSES", "EXIT_CODES", "FACTOR", "FLOOR_UNITS", "EMU_UNITS", "U32", "U16", "DENORM32",
    "Errors", "Budget", "EmuCheck", "Verdict", "Timings", "UnmodelledIsa",
    "resolve_precision", "trace_isa", "trace_contract", "case_from_trace", "errors", "derive_budget", "emu_check",
    "model_output", "fallback_model", "undefined_inputs", "reference_undefined",
    "below_signal", "golden_output", "golden_for", "dead_rows", "acc_unit", "verify_trace", "verify_case",
    "dense_model_fn", "mul_mat_facts", "trace_acc_unit", "config_findings",
]
