"""Trace verification: recompute a trace's output, derive its tolerance, give a verdict.

A kernel's output ``out`` [B, n_q, H, Dv] is compared with the float64 golden reference computed on the
trace's own (dequantized) inputs. The budget is derived per trace (docs/tolerance.md):

    error(kernel, golden) <= C * error(model, golden) + floor

where ``model`` is an honest implementation with the kernel's declared precision (``ggml-cpu``: the
bit-faithful emulation ``jaxkv.ggml_cpu``; ``f16``: the generic model ``jaxkv.precision``; ``f32``:
``attention(precision="f32")``; ``f64``: the golden itself) and ``error`` is both the NMSE (with
``C**2``) and the max-abs error. Under ``ggml-cpu`` the kernel must also stay within ``EMU_UNITS``
accumulator rounding units of the emulation itself (the sharp check).

On failure, :mod:`jaxkv.diagnose` tests named bug hypotheses and localizes the error.

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
import re
import time
from contextlib import contextmanager

import numpy as np

from jaxkv import diagnose as dg
from jaxkv import mutations
from jaxkv.budget import (DENORM32, EMU_UNITS, FACTOR, FLOOR_UNITS, U16, U32, Budget, EmuCheck,  # noqa: F401
                          Errors, derive_budget, emu_check, errors)

__all__ = [
    "PRECISIONS", "STATUSES", "EXIT_CODES", "FACTOR", "FLOOR_UNITS", "EMU_UNITS", "U32", "U16", "DENORM32",
    "Errors", "Budget", "EmuCheck", "Verdict", "Timings", "UnmodelledIsa",
    "resolve_precision", "trace_isa", "trace_contract", "case_from_trace", "errors", "derive_budget", "emu_check",
    "model_output", "fallback_model", "undefined_inputs", "reference_undefined",
    "below_signal", "golden_output", "golden_for", "dead_rows", "acc_unit", "verify_trace", "verify_case",
    "dense_model_fn",
]

PRECISIONS = ("auto", "ggml-cpu", "f16", "f32", "f64")
STATUSES = ("pass", "fail", "error", "undecided")
#: exit status of ``python -m fuzz verify`` per verdict; a run exits with the first of error (2), fail
#: (1), undecided (3) that occurred, else 0
EXIT_CODES = {"pass": 0, "fail": 1, "error": 2, "undecided": 3}


class Timings:
    """Seconds spent loading traces, compiling (JAX tracing, lowering and XLA compiles, measured by
    jax.monitoring) and computing (the rest of verification)."""

    def __init__(self):
        self.load = 0.0
        self.compile = 0.0
        self.compute = 0.0

    @contextmanager
    def loading(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.load += time.perf_counter() - t0

    @contextmanager
    def computing(self):
        import jax.monitoring as mon

        events = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
        spent = [0.0]

        def listener(event, duration, **kw):
            if event in events:
                spent[0] += duration

        mon.register_event_duration_secs_listener(listener)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - t0
            try:
                mon.unregister_event_duration_listener(listener)
            except Exception:  # pragma: no cover - older jax
                pass
            c = min(spent[0], total)
            self.compile += c
            self.compute += total - c

    def line(self) -> str:
        tot = self.load + self.compile + self.compute
        return (f"timings: load {self.load:.2f} s, compile {self.compile:.2f} s, compute "
                f"{self.compute:.2f} s, total {tot:.2f} s")


# ----------------------------------------------------------------------------------------------------
# traces -> operands


def _is_quant(x) -> bool:
    return hasattr(x, "raw") and hasattr(x, "fmt")


def _dense(x) -> np.ndarray:
    """A K/V operand (np.float32, np.float16 or QuantArray) as float64."""
    if _is_quant(x):
        return np.asarray(_dequantize_jit()(x.raw, x.fmt), np.float64)
    return np.asarray(x, np.float64)


_DEQ = []


def _dequantize_jit():
    """``formats.dequantize`` compiled once per shape (eager, it dispatches dozens of small ops, each
    compiled for the trace's shape)."""
    if not _DEQ:
        import jax

        from jaxkv import formats

        _DEQ.append(jax.jit(formats.dequantize, static_argnums=1))
    return _DEQ[0]


def _type_name(x) -> str:
    if _is_quant(x):
        f = x.fmt
        return str(getattr(f, "name", f)).lower()
    return {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(np.asarray(x).dtype, "f32")


def _dot_type(x) -> str:
    if not _is_quant(x):
        return _type_name(x)
    from jaxkv import formats

    f = x.fmt if hasattr(x.fmt, "dot_type") else formats.get_format(x.fmt)
    return str(f.dot_type)


def _regions_order(trace) -> list[str]:
    order = [s.strip() for s in str(getattr(trace, "kv_order", "cold,hot") or "cold,hot").split(",")]
    if sorted(order) != ["cold", "hot"]:
        raise ValueError(f"kv_order: expected 'cold,hot' or 'hot,cold', got {trace.kv_order!r}")
    return order


def case_from_trace(trace) -> mutations.Case:
    """The trace's exact inputs as a dense float64 :class:`mutations.Case` (quantized K/V dequantized;
    a mixed cache concatenated in ``kv_order`` and rounded to F16, as the op defines; its values before
    that rounding in ``kv_exact``, for the diagnosis)."""
    op = trace.op
    if op == "mixed_flash_attn":
        ks, vs, regions, pos = [], [], [], 0
        for name in _regions_order(trace):
            kx, vx = _dense(getattr(trace, f"k_{name}")), _dense(getattr(trace, f"v_{name}"))
            ks.append(kx)
            vs.append(vx)
            regions.append((name, pos, pos + kx.shape[1]))
            pos += kx.shape[1]
        exact = (np.concatenate(ks, 1), np.concatenate(vs, 1))
        k = exact[0].astype(np.float16).astype(np.float64)
        v = exact[1].astype(np.float16).astype(np.float64)
        regions = tuple(regions)
    else:
        k, v, regions, exact = _dense(trace.k), _dense(trace.v), (), None
    mask = None if trace.mask is None else np.asarray(trace.mask, np.float64)
    sinks = None if trace.sinks is None else np.asarray(trace.sinks, np.float64)
    return mutations.Case(op=op, q=np.asarray(trace.q, np.float64), k=k, v=v, mask=mask, sinks=sinks,
                          scale=float(trace.scale), softcap=float(trace.softcap or 0.0),
                          max_bias=float(trace.max_bias or 0.0),
                          n_threads=int(getattr(trace, "n_threads", 1) or 1), regions=regions,
                          mask_f16=True, kv_exact=exact)


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


class UnmodelledIsa(ValueError, NotImplementedError):
    """A trace from a ggml-cpu SIMD build the emulation does not model (:func:`trace_isa`)."""


_ISA_WORD = re.compile(r"\b(avx512\w*|avx2|avx|sse\w*|neon|sve\w*|scalar)\b", re.IGNORECASE)


def trace_isa(trace) -> str:
    """The SIMD build of ggml-cpu that wrote a trace, as a :data:`jaxkv.ggml_cpu.ISAS` name: metadata
    ``ggml.isa`` if present (``python -m fuzz record`` writes it), else an ISA word in ``trace.producer``
    (``"ggml 0.20.2 (8c63e70) CPU avx2 n_threads=2"``; ``avx512*`` counts as ``avx512`` unless it is a
    modelled name such as ``avx512fp16``), else
    ``jaxkv.ggml_cpu.DEFAULT_ISA`` (``avx512``: the shared traces say ``ggml cpu (n_threads=N)``, and
    came from an AVX-512 build). An ISA the model does not emulate raises :class:`UnmodelledIsa` (a
    ValueError naming the field; also a NotImplementedError, so ``verify_trace`` falls back)."""
    from jaxkv import ggml_cpu

    md = getattr(trace, "metadata", None) or {}
    if md.get("ggml.isa") is not None:
        field, word = "ggml.isa", str(md["ggml.isa"])
    else:
        m = _ISA_WORD.search(str(getattr(trace, "producer", "") or ""))
        if m is None:
            return ggml_cpu.DEFAULT_ISA
        field, word = "producer", m.group(1)
    isa = word.lower()
    isa = "avx512" if isa.startswith("avx512") and isa not in ggml_cpu.ISAS else isa
    if isa not in ggml_cpu.ISAS:
        raise UnmodelledIsa(f"{field}: ggml-cpu build {word!r} is not modelled (the ggml-cpu model emulates "
                         f"{', '.join(ggml_cpu.ISAS)})")
    return isa


def trace_contract(trace, isa: str):
    """The compiler contractions (``jaxkv.ggml_cpu.Contract``) of the ggml build that wrote a trace, for
    ``isa``: ``ggml_cpu.BUILD_CONTRACT[isa]`` with any ``ggml.contract.<field>`` metadata (``python -m
    fuzz record`` writes them) taking precedence. A bad key or value raises ValueError naming it."""
    from jaxkv.ggml_cpu import BUILD_CONTRACT, Contract

    return Contract.from_metadata(getattr(trace, "metadata", None) or {}, BUILD_CONTRACT[isa])


def golden_output(case: mutations.Case) -> np.ndarray:
    """The float64 golden reference of a case: :func:`jaxkv.mutations.golden` (numpy; equal to
    ``jaxkv.attention.attention(precision="f64")`` within float64 rounding, tested) — numpy because
    every trace has its own shapes and a compiled function per trace would cost more than the sums."""
    return mutations.golden(case)


def dead_rows(q, mask, sinks=None) -> np.ndarray:
    """bool [B, n_q, H]: output rows with no live key (every mask value -inf) and no sink, for q
    [B, n_q, H, Dk], mask [B|1, H|1, n_q, n_kv] or None, sinks [H] or None."""
    B, n_q, H = np.shape(q)[:3]
    if mask is None or sinks is not None:
        return np.zeros((B, n_q, H), bool)
    d = np.all(np.asarray(mask) == -np.inf, axis=-1)  # [B|1, H|1, n_q]
    return np.broadcast_to(np.transpose(d, (0, 2, 1)), (B, n_q, H)).copy()


def golden_for(op: str, case: mutations.Case, precision: str) -> np.ndarray:
    """The golden a trace of ``op`` is judged against: :func:`golden_output`, except that under
    ``ggml-cpu`` the unfused op's rows with no live key are NaN. ggml defines them so: ``soft_max_ext``
    of an all -inf row computes ``exp(-inf - -inf)`` (docs/ggml-findings.md, finding 2), where the fused
    op's ``S == 0`` guard gives 0. NaN in both the golden and the kernel is no error, so a kernel that
    reproduces ggml passes, and the sharp check against the emulation (NaN there too) still requires NaN
    in exactly those rows."""
    g = golden_output(case)
    if precision == "ggml-cpu" and op == "soft_max_attn":
        dead = dead_rows(case.q, case.mask, case.sinks)
        if dead.any():
            g = np.where(dead[..., None], np.nan, g)
    return g


def acc_unit(mixed: bool, v_f16: bool) -> float:
    """Unit roundoff of the quantity ggml accumulates V in: ``U16`` for the mixed cache (``mixed``) or
    F16 V (``v_f16``: F16 accumulator, or F16 probabilities of the unfused path), ``U32`` otherwise."""
    return U16 if mixed or v_f16 else U32


def _acc_unit(trace) -> float:
    """:func:`acc_unit` of a trace."""
    return acc_unit(trace.op == "mixed_flash_attn", _type_name(trace.v) == "f16")


def mul_mat_facts(trace) -> dict:
    """What decides the unfused op's mul_mat paths (:func:`jaxkv.ggml_cpu.soft_max_attn_paths`), from
    the trace: ``llamafile`` = metadata ``ggml.llamafile`` (False when absent: ``record`` with the
    libggml-python 0.20.2 wheel, built without it, and the shared traces); ``q_contiguous`` from the
    q view ``trace.view.q.ne/nb`` (``capture`` writes it; llama.cpp's q is a permuted view), True when
    absent (q stored contiguous, as ``record`` builds it)."""
    from jaxkv.ggml_cpu.sgemm import ggml_contiguous

    md = getattr(trace, "metadata", None) or {}
    ne, nb = md.get("trace.view.q.ne"), md.get("trace.view.q.nb")
    return dict(llamafile=bool(md.get("ggml.llamafile", False)),
                q_contiguous=True if ne is None or nb is None else ggml_contiguous(ne, nb, 4))


def model_output(trace, case: mutations.Case, precision: str, **config) -> np.ndarray:
    """The honest model's output [B, n_q, H, Dv] for a resolved precision (not ``auto``). ``config``
    (ggml-cpu only): ``n_threads`` / ``isa`` overriding the trace's (the ISA comes from
    :func:`trace_isa` otherwise)."""
    if precision == "f64":
        return golden_output(case)
    if precision == "f32":
        return _f32_model(case)
    if precision == "f16":
        from jaxkv.precision import f16_attention

        mixed = trace.op == "mixed_flash_attn"
        dot = "f16" if mixed else _dot_type(trace.k)
        return np.asarray(f16_attention(case.q, case.k, case.v, scale=case.scale, mask=case.mask,
                                        softcap=case.softcap, max_bias=case.max_bias,
                                        sinks=case.sinks, dot_type=dot, kv_f16=mixed), np.float64)
    if precision == "ggml-cpu":
        from jaxkv import ggml_cpu

        isa = config["isa"] if config.get("isa") is not None else trace_isa(trace)
        kw = dict(scale=case.scale, mask=trace.mask, max_bias=case.max_bias, isa=isa,
                  contract=trace_contract(trace, isa))
        if trace.op == "soft_max_attn":
            out = ggml_cpu.soft_max_attn(trace.q, trace.k, trace.v, **kw, **mul_mat_facts(trace))
        else:
            kw.update(softcap=case.softcap, sinks=trace.sinks,
                      n_threads=config.get("n_threads", case.n_threads),
                      version=ggml_cpu.tiled.trace_version(getattr(trace, "metadata", None),
                                                           getattr(trace, "producer", None)))
            if trace.op == "mixed_flash_attn":
                out = ggml_cpu.mixed_flash_attn(trace.q, trace.k_cold, trace.v_cold, trace.k_hot,
                                                trace.v_hot, kv_order=trace.kv_order, **kw)
            else:
                out = ggml_cpu.flash_attn_ext(trace.q, trace.k, trace.v, **kw)
        return np.asarray(out, np.float64)
    raise ValueError(f"precision: expected one of {PRECISIONS[1:]}, got {precision!r}")


def fallback_model(trace, case: mutations.Case) -> tuple[np.ndarray, str]:
    """The fallback when the declared model does not cover a trace (a ggml path ``jaxkv.ggml_cpu``
    does not emulate): the generic model of :mod:`jaxkv.precision` with the trace's roundings — q
    rounded to K's dot type (F16 for the mixed cache), the V accumulator of :func:`acc_unit` (F16 for
    F16 V or the mixed cache, F32 otherwise). -> (out [B, n_q, H, Dv] float64, model name). Its budget
    holds every kernel that rounds no more than that (ggml's tiled path rounds less: q not rounded,
    F32 accumulator); it has no sharp check, so it cannot see bugs below the golden budget."""
    from jaxkv.precision import f16_attention

    mixed = trace.op == "mixed_flash_attn"
    dot = "f16" if mixed else _dot_type(trace.k)
    acc = "f16" if _acc_unit(trace) == U16 else "f32"
    out = f16_attention(case.q, case.k, case.v, scale=case.scale, mask=case.mask, softcap=case.softcap,
                        max_bias=case.max_bias, sinks=case.sinks, dot_type=dot, kv_f16=mixed, acc=acc)
    return np.asarray(out, np.float64), f"generic model (q as {dot}, {acc} accumulator)"


# ----------------------------------------------------------------------------------------------------
# undecided: an undefined reference, a budget above the signal

_LAYOUTS = {"q": "b, query, head, dim", "k": "b, key, kv head, dim", "v": "b, key, kv head, dim",
            "mask": "b, head, query, key", "sinks": "head"}


def _live_keys(case: mutations.Case) -> np.ndarray:
    """bool [B, n_kv, Hkv]: keys that some query row of their batch row and KV head group reads (the
    mask is not -inf for it in every row); all True without a mask."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    if case.mask is None:
        return np.ones((B, n_kv, Hkv), bool)
    m = np.asarray(case.mask)
    read = np.any(m != -np.inf, axis=2)  # [Bm, Hm, n_kv]
    if read.shape[1] == 1:
        read = np.broadcast_to(read, (read.shape[0], Hkv, n_kv))
    else:
        read = np.any(read.reshape(read.shape[0], Hkv, H // Hkv, n_kv), axis=2)
    return np.broadcast_to(np.transpose(read, (0, 2, 1)), (B, n_kv, Hkv))


def _first_bad(name: str, x: np.ndarray, bad: np.ndarray) -> str | None:
    n = int(np.count_nonzero(bad))
    if not n:
        return None
    i = tuple(int(a) for a in np.argwhere(bad)[0])
    return (f"{name}[{', '.join(map(str, i))}] ({_LAYOUTS[name]}) = {float(x[i])}"
            f"{f' (first of {n})' if n > 1 else ''}")


def undefined_inputs(case: mutations.Case) -> tuple[str, ...]:
    """The inputs of ``case`` that make the reference undefined, one string each naming the tensor,
    its first offending index (with the layout) and value: ``scale``, ``softcap`` NaN/inf,
    ``max_bias`` NaN; q NaN/inf; K or V NaN/inf at a key some row reads (:func:`_live_keys`; a key
    masked in every row is never read); a mask entry NaN or +inf; a sink NaN or +inf. Empty when all
    are defined."""
    out = [f"{n} = {x}" for n, x in (("scale", case.scale), ("softcap", case.softcap))
           if not math.isfinite(x)]
    if math.isnan(case.max_bias):
        out.append(f"max_bias = {case.max_bias}")
    q = np.asarray(case.q)
    out.append(_first_bad("q", q, ~np.isfinite(q)))
    live = _live_keys(case)[..., None]
    for name, x in (("k", np.asarray(case.k)), ("v", np.asarray(case.v))):
        out.append(_first_bad(name, x, ~np.isfinite(x) & live))
    for name, x in (("mask", case.mask), ("sinks", case.sinks)):
        if x is not None:
            x = np.asarray(x)
            out.append(_first_bad(name, x, np.isnan(x) | (x == np.inf)))
    return tuple(x for x in out if x)


def reference_undefined(case: mutations.Case, golden=None) -> str | None:
    """Why the float64 reference of ``case`` is undefined (its output holds NaN or inf), or None.
    ``golden``: :func:`golden_output` of the case if already computed."""
    g = golden_output(case) if golden is None else np.asarray(golden, np.float64)
    bad = ~np.isfinite(g)
    if not bad.any():
        return None
    causes = undefined_inputs(case)
    if causes:
        return "reference undefined: non-finite input " + "; ".join(causes)
    i = tuple(int(a) for a in np.argwhere(bad)[0])
    return (f"reference undefined: the golden overflows to {g[i]} at out[{', '.join(map(str, i))}] "
            f"(b, query, head, dim) on finite inputs")


def below_signal(budget: Budget, golden, emu=None, emu_unit: float = U32) -> bool:
    """Whether a verdict can tell a result from nothing: True when it rejects the all-zero output
    (on the golden's finite elements) — by the golden budget (NMSE 1 > ``budget.nmse`` or
    ``max|golden|`` > ``budget.max_abs``) or by the sharp check against ``emu`` [B, n_q, H, Dv].
    A verdict that rejects zero also rejects the sign-flipped output (NMSE 4, max-abs
    ``2 max|golden|``, twice the emulation distance). True when the golden is zero everywhere (a zero
    output is then the right answer)."""
    g = np.asarray(golden, np.float64)
    fin = np.isfinite(g)
    if not np.any(g[fin] != 0):
        return True
    zero = np.where(fin, 0.0, g)
    if not budget.allows(errors(zero, g)):
        return True
    if emu is not None:
        e = np.asarray(emu, np.float64)
        return not emu_check(np.where(np.isfinite(e), 0.0, e), e, emu_unit).ok
    return False


# ----------------------------------------------------------------------------------------------------
# verdicts


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


def verify_case(case: mutations.Case, got, model, precision: str, *, name: str = "",
                emu=None, emu_unit: float = U32, golden=None, diagnose: bool = True,
                variant_outputs: dict | None = None, model_fn=None, model_name: str | None = None,
                fallback: str | None = None) -> Verdict:
    """Verdict of a kernel output ``got`` [B, n_q, H, Dv] on ``case``, given the honest model's output
    ``model`` for ``precision`` and, under ggml-cpu, the emulation ``emu`` (the same array as model).
    ``variant_outputs``, ``model_fn``: passed to :func:`jaxkv.diagnose.diagnose`. ``model_name``
    overrides the precision's model name (a fallback model), ``fallback`` says why.
    ``undecided`` (module docstring) when the reference is undefined, or when the output passes but
    the verdict would pass the all-zero output too."""

    g = golden_output(case) if golden is None else np.asarray(golden, np.float64)
    if model_name is None:
        model_name = {"ggml-cpu": "ggml-cpu emulation", "f16": "f16 model", "f32": "f32 reference",
                      "f64": "f64 golden"}[precision]
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
    """Verify one loaded trace (``jaxkv.trace.Trace``) -> :class:`Verdict`."""
    name = name if name is not None else str(getattr(trace, "path", "") or "trace")
    prec = resolve_precision(trace, precision)
    case = case_from_trace(trace)
    got = np.asarray(trace.out, np.float64)
    fallback = model_name = None
    try:
        model = model_output(trace, case, prec)
    except NotImplementedError as e:  # a path the declared model does not cover (ggml_cpu.Unmodelled)
        model, model_name = fallback_model(trace, case)
        msg = str(e).strip().splitlines()
        fallback = f"the {prec} model does not cover this trace ({msg[0] if msg else type(e).__name__})"
    emu = model if prec == "ggml-cpu" and fallback is None else None
    g = golden_for(trace.op, case, prec)
    v = verify_case(case, got, model, prec, name=name, emu=emu, emu_unit=_acc_unit(trace), golden=g,
                    diagnose=diagnose, model_fn=dense_model_fn(trace, prec), model_name=model_name,
                    fallback=fallback)
    if diagnose and v.status == "fail" and emu is not None and not v.emu.ok:
        extra = tuple(_config_findings(trace, case, got, v.budget, v.emu.unit, g))
        if extra:
            v = dataclasses.replace(v, diagnosis=v.diagnosis + extra, localization=None)
    return v


def _config_findings(trace, case, got, budget, unit, g) -> list[dict]:
    """ggml configured otherwise than the trace says: the mixed cache's regions in the other order
    (mask alike), another thread count (split-KV chunking), another SIMD build. Each is the emulation
    rerun so configured; it explains the output when both checks then pass."""
    from jaxkv import ggml_cpu

    tries = []
    if trace.op == "mixed_flash_attn" and hasattr(trace, "with_kv_order"):
        other = "hot,cold" if trace.kv_order == "cold,hot" else "cold,hot"
        tries.append((f"computed with kv_order {other} (mask alike), not the declared {trace.kv_order}",
                      trace.with_kv_order(other), {}))
    if trace.op != "soft_max_attn":
        kt = "f16" if trace.op == "mixed_flash_attn" else _type_name(trace.k)
        vt = "f16" if trace.op == "mixed_flash_attn" else _type_name(trace.v)
        B, n_q = case.q.shape[:2]
        n_kv = case.k.shape[1]
        chunks = {ggml_cpu.split_chunks(n_q, B, kt, vt, n_kv, case.n_threads)}
        for nt in (1, 2, 3, 4, 6, 8, 16, 32):
            c = ggml_cpu.split_chunks(n_q, B, kt, vt, n_kv, nt)
            if c not in chunks:
                chunks.add(c)
                tries.append((f"ran with n_threads={nt} ({c} split-KV chunks), not the recorded "
                              f"{case.n_threads}", trace, {"n_threads": nt}))
    declared = trace_isa(trace)
    for isa in ggml_cpu.ISAS:
        if isa != declared:
            tries.append((f"a ggml-cpu {isa} build, not {declared}", trace, {"isa": isa}))
    found = []
    for label, t2, cfg in tries:
        try:
            emu2 = model_output(t2, case, "ggml-cpu", **cfg)
        except (ValueError, NotImplementedError):
            continue
        ec = emu_check(got, emu2, unit)
        e = errors(got, g)
        if ec.ok and budget.allows(e):
            found.append(dict(hypothesis="ggml_config", label=label, nmse=errors(got, emu2).nmse,
                              max_abs=ec.max_abs, level="emulation (configuration)"))
    return found


def dense_model_fn(trace, precision: str):
    """The honest model of a resolved precision as a function of a dense :class:`mutations.Case`
    (used to re-derive budgets on a bug's inputs): ``f64`` -> None (the budget is the floor);
    ``f32`` -> ``attention(precision="f32")``; ``f16`` and ``ggml-cpu`` -> the f16 model with the
    trace's dot type (the emulation needs typed operands; the generic model makes the same roundings)."""
    if precision == "f64":
        return None
    if precision == "f32":
        return lambda c: _f32_model(c)
    from jaxkv.precision import f16_attention

    mixed = trace.op == "mixed_flash_attn"
    dot = "f16" if mixed else _dot_type(trace.k)

    def fn(c):
        return np.asarray(f16_attention(c.q, c.k, c.v, scale=c.scale, mask=c.mask,
                                        softcap=c.softcap, max_bias=c.max_bias, sinks=c.sinks,
                                        dot_type=dot, kv_f16=mixed), np.float64)
    return fn


def _f32_model(case):
    from jaxkv.attention import attention

    f = np.float32
    return np.asarray(attention(case.q.astype(f), case.k.astype(f), case.v.astype(f),
                                scale=case.scale, mask=None if case.mask is None
                                else case.mask.astype(f), softcap=case.softcap,
                                max_bias=case.max_bias, sinks=None if case.sinks is None
                                else case.sinks.astype(f), precision="f32"), np.float64)
