"""Whole-run verification report: the verdicts of a captured run as a per-layer, per-step table.

Input: one :class:`Row` per verified call (from its trace metadata ``capture.layer`` /
``capture.step`` and its :class:`jaxkv.verify.Verdict`). Cells (``CELL``):

==========  ===========================================================================
``=``       pass, bit-exact with the ggml-cpu emulation (no output element differs)
``0.37``    pass, not bit-exact: max units from the emulation (budget EMU_UNITS)
``F``       fail (outside the budget; the first failing call is detailed)
``E``       error (not verifiable: e.g. ggml's tiled prefill path is not modelled)
``.``       not captured
==========  ===========================================================================
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re

__all__ = ["Row", "row", "table", "summary", "first_failure", "render"]

_FILE = re.compile(r"^s(\d+)_(?:prefill|decode)_l(\d+)_(?:fa|sm)\.gguf$")  # jaxkv.capture.writer.file_name


@dataclasses.dataclass(frozen=True)
class Row:
    """One call: ``name`` (file), ``layer``, ``step`` (0 = prefill), ``op``, ``status`` (pass | fail |
    error), ``units`` (max units vs the emulation, None without one), ``n_differ`` (elements differing
    from the emulation), ``nmse`` (vs the float64 golden), ``error`` (one line), ``verdict``, ``run``
    (the capture directory: one table per run)."""

    name: str
    layer: int | None
    step: int | None
    op: str
    status: str
    units: float | None = None
    n_differ: int | None = None
    nmse: float | None = None
    error: str | None = None
    verdict: object = None
    run: str = ""

    @property
    def bit_exact(self) -> bool:
        return self.status == "pass" and self.n_differ == 0


def row(name: str, trace, verdict) -> Row:
    """The :class:`Row` of a verdict; ``trace`` (a loaded Trace or None) supplies layer, step and op."""
    md = (trace.metadata or {}) if trace is not None else {}
    layer, step = md.get("capture.layer"), md.get("capture.step")
    if layer is None or step is None:  # unreadable file: the writer's name says s<step>_..._l<layer>_
        m = _FILE.match(pathlib.Path(str(name)).name)
        if m:
            step, layer = int(m.group(1)), int(m.group(2))
    emu, e = getattr(verdict, "emu", None), getattr(verdict, "errors", None)
    return Row(name=str(name), layer=None if layer is None else int(layer), step=None if step is None else int(step),
               op="?" if trace is None else trace.op, status=verdict.status,
               units=None if emu is None else float(emu.units), n_differ=None if emu is None else int(emu.n_differ),
               nmse=None if e is None else float(e.nmse), error=verdict.error, verdict=verdict,
               run=str(pathlib.Path(str(name)).parent))


def _cell(r: Row) -> str:
    if r.status == "error":
        return "E"
    if r.status == "fail":
        return "F"
    if r.status == "undecided":
        return "U"
    if getattr(r.verdict, "fallback", None):
        return "fb"  # passed under the fallback budget: the declared model does not cover the call
    if r.bit_exact:
        return "="
    return "pass" if r.units is None else f"{r.units:.2f}"


def table(rows) -> str:
    """Layers down, steps across (``P`` = prefill); one :data:`CELL <jaxkv.report>` per call."""
    rows = [r for r in rows if r.layer is not None and r.step is not None]
    if not rows:
        return ""
    layers = sorted({r.layer for r in rows})
    steps = sorted({r.step for r in rows})
    cells = {(r.layer, r.step): _cell(r) for r in rows}
    w = max(4, max(len(c) for c in cells.values()))
    head = "layer " + " ".join(("P" if s == 0 else str(s)).rjust(w) for s in steps)
    lines = [head]
    for il in layers:
        lines.append(f"{il:>5} " + " ".join(cells.get((il, s), ".").rjust(w) for s in steps))
    return "\n".join(lines)


def _reason(err: str | None) -> str:
    e = err or ""
    if "tiled" in e:
        return "ggml's tiled path (n_q >= 64, F16/F32 K and V) is not modelled"
    return e.split(":", 1)[0] if ":" in e else e


def summary(rows) -> dict:
    """Counts and figures: ``n``, ``bit_exact``, ``passed``, ``failed``, ``errors``, ``fraction_bit_exact``
    (of all calls), ``max_units`` (over the verified calls), ``error_reasons`` {reason: count}."""
    rows = list(rows)
    verified = [r for r in rows if r.status in ("pass", "fail") and r.units is not None]
    reasons: dict[str, int] = {}
    for r in rows:
        if r.status == "error":
            k = _reason(r.error)
            reasons[k] = reasons.get(k, 0) + 1
    n = len(rows)
    mx = max((r.units for r in verified if math.isfinite(r.units)), default=None)
    return dict(n=n, bit_exact=sum(r.bit_exact for r in rows), passed=sum(r.status == "pass" for r in rows),
                failed=sum(r.status == "fail" for r in rows), errors=sum(r.status == "error" for r in rows),
                undecided=sum(r.status == "undecided" for r in rows),
                fallback=sum(bool(getattr(r.verdict, "fallback", None)) for r in rows),
                fraction_bit_exact=(sum(r.bit_exact for r in rows) / n) if n else 0.0, max_units=mx,
                error_reasons=reasons)


def first_failure(rows) -> Row | None:
    """The first failing call in run order (step, then layer); errors count only if nothing failed."""
    key = (lambda r: (r.step if r.step is not None else 1 << 30, r.layer if r.layer is not None else 1 << 30))
    fails = sorted((r for r in rows if r.status == "fail"), key=key)
    return fails[0] if fails else None


def render(rows) -> str:
    """The report text: table, summary, error reasons and the first failing call with its details."""
    rows = list(rows)
    s = summary(rows)
    out = []
    runs = sorted({r.run for r in rows})
    for run in runs:
        t = table([r for r in rows if r.run == run])
        if t:
            out += [f"{run}: per-layer, per-step verdicts (= bit-exact with the ggml-cpu emulation; number: "
                    f"max units from it; F fail; U undecided; fb passed under the fallback budget; E not verifiable; "
                    f". not captured):", t]
    mx = "n/a" if s["max_units"] is None else f"{s['max_units']:.3g}"
    out.append(f"{s['n']} calls: {s['bit_exact']} bit-exact ({100 * s['fraction_bit_exact']:.1f} %), "
               f"{s['passed']} pass, {s['failed']} fail, {s['errors']} not verifiable, {s['undecided']} undecided, "
               f"{s['fallback']} judged under the fallback budget; max {mx} units from the emulation")
    for reason, c in sorted(s["error_reasons"].items(), key=lambda kv: -kv[1]):
        out.append(f"  not verifiable ({c}): {reason}")
    f = first_failure(rows)
    if f is not None:
        out.append(f"first failing call: step {f.step} layer {f.layer} ({f.name})")
        v = f.verdict
        if v is not None and getattr(v, "errors", None) is not None:
            out.append("  " + v.line())
            out.append(v.details())
    return "\n".join(out)
