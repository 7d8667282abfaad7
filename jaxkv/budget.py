"""Error metrics and budgets: how far an output is from a reference, and how far it may be.

``errors(got, ref)`` measures; ``derive_budget(golden, model)`` is the budget of a trace (docs/tolerance.md):

    error(kernel, golden) <= FACTOR * error(model, golden) + floor

in NMSE (with ``FACTOR**2``) and max-abs; ``emu_check(got, emu, unit)`` is the sharp check against a
bit-faithful emulation in accumulator rounding units. Arrays are outputs ``[B, n_q, H, Dv]``.
:mod:`jaxkv.verify` (verdicts) and :mod:`jaxkv.verify.diagnose` (which hypothesis explains a failure) both
judge with these; neither imports the other for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["nmse", "nmse_from_sums", "FACTOR", "FLOOR_UNITS", "EMU_UNITS", "U32", "U16", "DENORM32", "Errors", "errors", "Budget",
           "derive_budget", "budget_of", "EmuCheck", "emu_check"]

#: C: the kernel may be this many times less accurate than the honest model (RMS and max-abs);
#: PyTorch's SDPA tests use a fudge factor of 3 on the output (FlashAttention's use 2).
FACTOR = 3.0
#: floor, in float32 unit roundoffs of max|golden|: storing out in F32 (1) + the final normalization
#: in F32 (reciprocal and multiply, 2) + 1 spare.
FLOOR_UNITS = 4.0
#: sharp check under ggml-cpu: kernel vs emulation, in rounding units of the V accumulator at the
#: row's scale (a libm expf differing by one ulp flips at most a few accumulator roundings).
EMU_UNITS = 4.0
U32 = 2.0 ** -24
U16 = 2.0 ** -11
#: spacing of float32 subnormals: the resolution of a float32 output near zero
DENORM32 = 2.0 ** -149
_TINY = 2.0 ** -126


@dataclasses.dataclass(frozen=True)
class Errors:
    """Distance of ``got`` from ``ref`` (both [B, n_q, H, Dv]): ``nmse`` = sum (got-ref)^2 / sum ref^2,
    ``max_abs``, ``worst`` (batch, query, head, dim, got, expected) of the max-abs element,
    ``per_head_max_abs`` [H], ``nan_count`` (NaN in got where ref is not NaN). Non-finite
    differences make nmse and max_abs infinite."""

    nmse: float
    max_abs: float
    worst: dict
    per_head_max_abs: tuple
    nan_count: int


def nmse(got, ref) -> float:
    """The one NMSE: ``sum (got - ref)^2 / sum ref^2`` over the elements (float64); 0 when they are
    equal, inf when they differ and ``ref`` is all zero. Elements NaN in both count as equal, a NaN in
    one only makes it inf (the ``nmse`` of :func:`errors`)."""
    return errors(np.reshape(got, (1, 1, 1, -1)), np.reshape(ref, (1, 1, 1, -1))).nmse


def nmse_from_sums(err2, power):
    """The NMSE formula on its sums: ``err2 / power`` with ``err2`` = sum (got - ref)^2 and ``power`` =
    sum ref^2 (float64), 0 where ``err2`` is 0 (also 0/0), inf where ``power`` is 0 or ``err2`` is not
    finite. Elementwise on arrays of any (broadcastable) shapes, returning an array; a Python float for
    scalars. Host-side numpy: an in-program reduction (``fuzz.engine.stats``) passes its sums here."""
    e2 = np.asarray(err2, np.float64)
    p = np.asarray(power, np.float64)
    with np.errstate(all="ignore"):
        r = np.where(e2 == 0, 0.0, np.where((p == 0) | ~np.isfinite(e2), np.inf, e2 / p))
    return float(r) if r.ndim == 0 else r


def errors(got, ref) -> Errors:
    """:class:`Errors` of got vs ref, [B, n_q, H, Dv] each."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"out: shape {list(got.shape)} does not match the reference {list(ref.shape)}")
    both_nan = np.isnan(got) & np.isnan(ref)
    with np.errstate(all="ignore"):
        d = np.where(both_nan, 0.0, np.abs(got - ref))
    d = np.where(np.isnan(d), np.inf, d)
    nan_count = int(np.count_nonzero(np.isnan(got) & ~np.isnan(ref)))
    power = float(np.sum(np.where(np.isfinite(ref), ref, 0.0) ** 2))
    with np.errstate(all="ignore"):
        e2 = float(np.sum(d ** 2))
    nmse = nmse_from_sums(e2, power)
    if d.size:
        w = np.unravel_index(int(np.argmax(d)), d.shape)
        worst = dict(batch=int(w[0]), query=int(w[1]), head=int(w[2]), dim=int(w[3]),
                     got=float(got[w]), expected=float(ref[w]))
        per_head = tuple(float(x) for x in d.max(axis=(0, 1, 3)))
        mx = float(d.max())
    else:
        worst, per_head, mx = {}, (), 0.0
    return Errors(nmse=nmse, max_abs=mx, worst=worst, per_head_max_abs=per_head, nan_count=nan_count)


@dataclasses.dataclass(frozen=True)
class Budget:
    """``nmse`` and ``max_abs`` limits for the kernel's error against the golden reference, and how they
    were derived: ``FACTOR`` times the honest model's error (``model_nmse``, ``model_max_abs``) plus a
    floor of ``FLOOR_UNITS`` float32 unit roundoffs of ``max|golden|`` (``floor_abs``)."""

    nmse: float
    max_abs: float
    model: str
    model_nmse: float
    model_max_abs: float
    floor_nmse: float
    floor_abs: float
    factor: float = FACTOR

    def for_reference(self, ref) -> "Budget":
        """The same budget with its floor taken from another reference output ``ref`` (a buggy
        reference can be larger than the golden, e.g. a sharper softmax)."""
        ref = np.asarray(ref, np.float64)
        gmax = float(np.max(np.abs(ref), initial=0.0, where=np.isfinite(ref)))
        floor_abs = max(self.floor_abs, FLOOR_UNITS * U32 * max(gmax, _TINY))
        return dataclasses.replace(self, max_abs=self.max_abs - self.floor_abs + floor_abs,
                                   floor_abs=floor_abs)

    def allows(self, e: Errors) -> bool:
        return e.nan_count == 0 and e.nmse <= self.nmse and e.max_abs <= self.max_abs

    def derivation(self) -> str:
        c = self.factor
        return (f"nmse <= {c:g}^2 * {self.model_nmse:.3g} ({self.model} vs f64) + {self.floor_nmse:.3g}"
                f" = {self.nmse:.3g}; max_abs <= {c:g} * {self.model_max_abs:.3g} + "
                f"{self.floor_abs:.3g} (floor: {FLOOR_UNITS:g} f32 units * max|golden|) = "
                f"{self.max_abs:.3g}")


def derive_budget(golden, model, model_name: str, factor: float = FACTOR) -> Budget:
    """The budget of a trace from its golden output and the honest model's output (both
    [B, n_q, H, Dv]). A model that is not finite where the golden is (it should never be) gives an
    infinite budget, which ``verify`` reports as undecided (not below the signal), never a pass."""
    golden = np.asarray(golden, np.float64)
    me = errors(model, golden)
    gmax = float(np.max(np.abs(golden), initial=0.0, where=np.isfinite(golden)))
    return budget_of(me.nmse, me.max_abs, gmax, model_name, factor)


def budget_of(model_nmse: float, model_max_abs: float, golden_max: float, model_name: str,
              factor: float = FACTOR) -> Budget:
    """The budget formula itself, from the honest model's error against the golden (``model_nmse``,
    ``model_max_abs``) and ``golden_max`` = max|golden| over its finite elements: ``factor^2 model_nmse
    + (FLOOR_UNITS U32)^2`` and ``factor model_max_abs + FLOOR_UNITS U32 max(golden_max, 2^-126)``
    (:func:`derive_budget` on arrays; the fuzz engine on in-program sums)."""
    floor_abs = FLOOR_UNITS * U32 * max(golden_max, _TINY)
    floor_nmse = (FLOOR_UNITS * U32) ** 2
    return Budget(nmse=factor ** 2 * model_nmse + floor_nmse, max_abs=factor * model_max_abs + floor_abs,
                  model=model_name, model_nmse=model_nmse, model_max_abs=model_max_abs,
                  floor_nmse=floor_nmse, floor_abs=floor_abs, factor=factor)


@dataclasses.dataclass(frozen=True)
class EmuCheck:
    """The sharp ``ggml-cpu`` check: kernel vs emulation. ``unit``: the V accumulator's unit roundoff
    (``U16`` for an F16 accumulator or F16 probabilities, ``U32`` otherwise); ``units`` = max over output
    rows of max|got - emu| / max(unit * max|emu row|, ``DENORM32``); passes when ``units <= budget_units``.
    The floor ``DENORM32`` (2^-149, the spacing of float32 subnormals) is the output's own resolution:
    in a row of zeros or float32 subnormals (a sink-dominated softmax) one output rounding moves a value
    by one such spacing, which is one unit, and the row scale is never zero."""

    max_abs: float
    units: float
    unit: float
    budget_units: float
    n_differ: int

    @property
    def ok(self) -> bool:
        return self.units <= self.budget_units


def emu_check(got, emu, unit: float, budget_units: float = EMU_UNITS) -> EmuCheck:
    """Compare got with the emulation's output emu (both [B, n_q, H, Dv]); :class:`EmuCheck` defines
    the units. ``unit`` > 0."""
    if not (isinstance(unit, (int, float, np.floating)) and 0 < unit < 1):
        raise ValueError(f"unit: expected a unit roundoff in (0, 1), got {unit!r}")
    got = np.asarray(got, np.float64)
    emu = np.asarray(emu, np.float64)
    with np.errstate(all="ignore"):
        d = np.abs(got - emu)
    # NaN where the emulation has NaN, and the same infinity as the emulation (an F16 accumulator that
    # overflows in the kernel and in the model alike) are no difference; any other non-finite is infinite
    d = np.where((np.isnan(got) & np.isnan(emu)) | (np.isinf(emu) & (got == emu)), 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)
    finite = np.where(np.isfinite(emu), np.abs(emu), 0.0)  # row scale from the finite outputs
    scale = np.maximum(unit * np.max(finite, axis=-1, initial=0.0), DENORM32)
    units = float(np.max(d.max(axis=-1, initial=0.0) / scale, initial=0.0))
    return EmuCheck(max_abs=float(d.max(initial=0.0)), units=units, unit=unit,
                    budget_units=budget_units, n_differ=int(np.count_nonzero(d)))
