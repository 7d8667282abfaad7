"""``python -m fuzz sensitivity --from-traces DIR``: the studies of jaxkv.realstudy on a captured run.

    python -m fuzz sensitivity --from-traces DIR [--formats q8_0,q4_0] [--hot-window 0,32]
        [--compare LABEL=DIR,...] [--threads 1,2,4,8] [--out DIR] [--plot/--no-plot]

DIR is a ``python -m fuzz capture`` run with an F16 K/V cache (the unquantized values). Prints and writes
(``--out``, default out/real-sensitivity): per layer and head, each format and hot window, the NMSE of
the attention output when the real cached K/V are quantized (mean over the decode steps, 95 % bootstrap
CI) with the first-order prediction (``pred_ratio``; ``sensitivity_rows.csv``); per call, the F16
accumulator headroom and the split-KV chunking by thread count with the output movement it causes
(``calls.csv``); with ``--compare``, per layer and step, how far each other run's output (same prompt,
another ``--cache-type-k/v``) moves from DIR's (``differential.csv``); with ``--plot`` a per-layer /
per-head heatmap (``heatmap_layers_heads.png``). Exit status: 0 done; 2 bad arguments or unreadable runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys

import numpy as np

from jaxkv import formats as F
from jaxkv import realstudy as RS

__all__ = ["main"]

_PROG = "python -m fuzz sensitivity --from-traces"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _parser():
    p = _Parser(prog=_PROG, description=__doc__.splitlines()[0])
    p.add_argument("--from-traces", required=True, metavar="DIR")
    p.add_argument("--formats", default=",".join(RS.STUDY_FORMATS))
    p.add_argument("--hot-window", default="0,32")
    p.add_argument("--compare", default=None, metavar="LABEL=DIR,...")
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--out", default="out/real-sensitivity")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    return p


def _ints(text, flag, lo):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < lo for v in vals):
        raise _UsageError(f"{flag}: expected integers >= {lo}, got {text!r}")
    return tuple(vals)


def _write_csv(path, rows):
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _heatmap(rows, path, W):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = sorted({r["format"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    heads = sorted({r["head"] for r in rows})
    size = (2.2 + 1.6 * len(fmts) * max(1, len(heads) / 4), 0.28 * len(layers) + 1.6)
    fig, axes = plt.subplots(1, len(fmts), figsize=size, squeeze=False)
    for ax, f in zip(axes[0], fmts):
        m = np.full((len(layers), len(heads)), np.nan)
        for r in rows:
            if r["format"] == f and r["hot_window"] == W:
                m[layers.index(r["layer"]), heads.index(r["head"])] = r["nmse_mean"]
        im = ax.imshow(np.log10(m), aspect="auto", cmap="viridis")
        ax.set_title(f"{f} K and V, W={W}", fontsize=9)
        ax.set_xticks(range(len(heads)), [str(h) for h in heads])
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="log10 NMSE (mean over decode steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv) -> int:
    """CLI entry (module docstring); returns the exit status."""
    try:
        a = _parser().parse_args(argv)
        fmts = tuple(x.strip().lower() for x in a.formats.split(",") if x.strip())
        for f in fmts:
            try:
                if not F.get_format(f).quantized:
                    raise ValueError
            except ValueError:
                raise _UsageError(f"--formats: {f!r} is not a ggml block format") from None
        windows = _ints(a.hot_window, "--hot-window", 0)
        threads = _ints(a.threads, "--threads", 1)
        compare = {}
        for part in (a.compare or "").split(","):
            if part.strip():
                if "=" not in part:
                    raise _UsageError(f"--compare: expected LABEL=DIR, got {part!r}")
                k, v = part.split("=", 1)
                compare[k.strip()] = v.strip()
        for d in [a.from_traces, *compare.values()]:
            if not pathlib.Path(d).is_dir():
                raise _UsageError(f"{d}: not a directory")
    except _UsageError as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return int(e.code or 0)

    try:
        base = RS.load_run(a.from_traces)
        if not base:
            raise ValueError(f"{a.from_traces}: no capture traces (capture.layer / capture.step metadata)")
        skipped: list[str] = []
        rows = RS.sensitivity_rows(base, fmts, windows, skipped=skipped)
        others = {k: RS.load_run(v) for k, v in compare.items()}
    except (ValueError, OSError) as e:
        print(f"{_PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = []
    for c in base:
        h = RS.headroom(c.trace)
        tm = RS.thread_movement(c.trace, threads)
        calls.append(dict(layer=c.layer, step=c.step, op=c.trace.op, accumulator=h["accumulator"],
                          max_partial=h["max_partial"], headroom=h["headroom"],
                          chunks=json.dumps(tm["chunks"]), thread_units=max(tm["units"].values(), default=0.0),
                          note=tm["note"], file=pathlib.Path(c.path).name))
    diff = RS.differential_rows(base, others)
    _write_csv(out / "sensitivity_rows.csv", rows)
    _write_csv(out / "calls.csv", calls)
    _write_csv(out / "differential.csv", diff)

    layers = sorted({r["layer"] for r in rows})
    print(f"{a.from_traces}: {len(base)} calls, {sum(c.step > 0 for c in base)} decode calls, sensitivity "
          f"for layers {','.join(map(str, layers)) or 'none'}")
    for msg in skipped:
        print(f"  sensitivity skipped: {msg}")
    W0 = windows[0]
    print(f"\nper layer (mean over heads of the per-head mean NMSE over decode steps; W={W0}; pred_ratio = "
          f"first-order / measured):")
    print("layer " + " ".join(f"{f + ' nmse':>12} {'pred':>5}" for f in fmts) + "  min F16 headroom")
    for il in layers:
        cells = []
        for f in fmts:
            rs = [r for r in rows if r["layer"] == il and r["format"] == f and r["hot_window"] == W0]
            cells.append(f"{np.mean([r['nmse_mean'] for r in rs]):12.3g} {np.mean([r['pred_ratio'] for r in rs]):5.2f}")
        hr = min(c["headroom"] for c in calls if c["layer"] == il)
        print(f"{il:>5} " + " ".join(cells) + f"  {hr:10.1f}")
    worst = min(calls, key=lambda c: c["headroom"])
    print(f"\nF16 accumulator headroom: min {worst['headroom']:.1f}x below 65504 (max partial sum "
          f"{worst['max_partial']:.4g}, layer {worst['layer']} step {worst['step']})")
    moved = [c for c in calls if c["thread_units"] > 0]
    print(f"thread counts {list(threads)}: {len(moved)} of {len(calls)} calls change output "
          f"(max {max((c['thread_units'] for c in calls), default=0):.3g} units); "
          + (calls[-1]["note"] if not moved and calls[-1]["note"] else ""))
    if diff:
        print("\ndifferential (output NMSE vs the F16 run, mean over steps with the same tokens; P = prefill):")
        labels = sorted({d["run"] for d in diff})
        print("layer " + " ".join(f"{lab + ' P':>14} {lab + ' decode':>16}" for lab in labels))
        for il in sorted({d["layer"] for d in diff}):
            cells = []
            for lab in labels:
                pre = [d["nmse"] for d in diff if d["run"] == lab and d["layer"] == il and d["step"] == 0]
                dec = [d["nmse"] for d in diff if d["run"] == lab and d["layer"] == il and d["step"] > 0]
                cells.append(f"{(pre[0] if pre else math.nan):14.3g} {(np.mean(dec) if dec else math.nan):16.3g}")
            print(f"{il:>5} " + " ".join(cells))
        for lab in labels:
            st = sorted({d["step"] for d in diff if d["run"] == lab})
            print(f"  {lab}: steps compared {st}")
    if a.plot:
        try:
            p = _heatmap(rows, out / "heatmap_layers_heads.png", W0)
            print(f"\nplot: {p}")
        except ImportError:
            print("\nplot: matplotlib not installed (pip install '.[plot]')")
    print(f"wrote {out}/sensitivity_rows.csv, calls.csv" + (", differential.csv" if diff else ""))
    return 0
