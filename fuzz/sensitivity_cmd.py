"""``python -m fuzz sensitivity``: how wrong is decode attention over a mixed KV cache (last W tokens F16,
the rest in a ggml block format), and which channels hurt.

    python -m fuzz sensitivity [--formats q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl] [--k-format F,..]
        [--v-format F,..] [--hot-window 0,32,128,512] [--kv-len 512,4096] [--head-dim 64,128]
        [--dist normal,outliers] [--samples 64] [--seed 0] [--out out/sensitivity] [--plot/--no-plot]
        [--devices N] [--resume]
    python -m fuzz sensitivity --from-traces DIR ...   the real K/V of a captured run (fuzz.sensitivity_traces)

Formats: with neither --k-format nor --v-format, K and V both use each of --formats; otherwise the
configurations are k-formats x v-formats (a missing side comes from --formats; ``f16`` = unquantized).
Writes DIR/results.jsonl (rows appended as each group of configurations finishes; --resume skips the
configurations already there; an --out holding results is refused without --resume or --overwrite), DIR/results.csv, DIR/results.json, DIR/channels.json and PNG plots, and
prints a summary table. Exit status: 0 done; 2 bad arguments (one line on stderr).

Bounds (bad arguments otherwise): --kv-len and --hot-window at most `MAX_LEN`, --head-dim at most
`MAX_HEAD_DIM`, --samples at most `MAX_SAMPLES`, and samples x kv_len x head_dim of the largest
configuration at most `MAX_WORK` (4x the default sweep's largest, 64 x 4096 x 128 = 2^25); an empty list
(``--formats ""``) is an error, not the default. --resume reads DIR/results.jsonl only when it is a regular
file (a FIFO there is refused, not waited on).
Library and method: jaxkv.sensitivity; findings: docs/sensitivity.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import time

import jax

from fuzz import sensitivity_plots, sensitivity_traces
from jaxkv import sensitivity as sens
from jaxkv.textsafe import escape

try:  # private API (it may move): whether JAX's backend has started
    from jax._src import xla_bridge as _xla_bridge
except ImportError:
    _xla_bridge = None

__all__ = ["main", "MAX_LEN", "MAX_HEAD_DIM", "MAX_SAMPLES", "MAX_WORK"]

MAX_LEN = 1 << 17
MAX_HEAD_DIM = 1024
MAX_SAMPLES = 1 << 16
MAX_WORK = 1 << 27


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fuzz sensitivity", description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=",".join(sens.DEFAULT_FORMATS),
                   help="formats for K and V (comma list)")
    p.add_argument("--k-format", default=None, help="K formats (comma list); with --v-format: cross product")
    p.add_argument("--v-format", default=None, help="V formats (comma list)")
    p.add_argument("--hot-window", default="0,32,128,512", help="F16 hot-window sizes W (tokens)")
    p.add_argument("--kv-len", default="512,4096", help="context lengths L")
    p.add_argument("--head-dim", default="64,128", help="head sizes D")
    p.add_argument("--dist", default="normal,outliers", help="sample distributions")
    p.add_argument("--samples", default="64", help="Monte-Carlo samples per configuration (>= 2)")
    p.add_argument("--seed", default="0", help="seed (same seed, same numbers, on any device count)")
    p.add_argument("--out", default="out/sensitivity", help="output directory")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    p.add_argument("--devices", default=None, help="JAX devices to shard samples over (default: all)")
    p.add_argument("--resume", action="store_true", help="skip configurations already in results.jsonl")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier sweep in --out (without it, or --resume, an --out "
                        "holding results is refused)")
    return p


def _ints(text: str, field: str) -> list[int]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            out.append(int(part))
        except ValueError:
            raise _UsageError(f"{field}: expected comma-separated integers, got {text!r}") from None
    return out


def _names(text: str | None, field: str = "list") -> list[str] | None:
    if text is None:
        return None
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise _UsageError(f"{field}: expected at least one name, got {text!r}")
    return names


def _bounded(vals: list[int], field: str, hi: int) -> list[int]:
    for v in vals:
        if v > hi:
            raise _UsageError(f"{field}: expected values <= {hi}, got {v}")
    return vals


def _set_devices(n: int) -> None:
    """Ask for n CPU devices before JAX's backend starts (no-op when it already has started; importing
    jax and jaxkv does not start it)."""
    try:
        started = _xla_bridge.backends_are_initialized()
    except Exception:  # private API moved: assume started, make_mesh reports any shortfall
        started = True
    if not started and n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except Exception:
            pass


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return "nan"
    return f"{x:.2e}"


def _summary(rows: list[dict], out) -> None:
    """Pivot tables of mean NMSE (format pair x hot window) per (dist, head_dim, kv_len)."""
    combos = sorted({(r["dist"], r["head_dim"], r["kv_len"]) for r in rows})
    ws = sorted({r["hot_window"] for r in rows})
    pairs = list(dict.fromkeys((r["k_format"], r["v_format"]) for r in rows))
    by = {(r["dist"], r["head_dim"], r["kv_len"], r["k_format"], r["v_format"], r["hot_window"]): r
          for r in rows}
    for dist, d, n in combos:
        print(f"\nNMSE mean [95% CI]  dist={dist} D={d} L={n}   (pred = 1st-order / measured at "
              f"W={ws[0]}; cos = mean cosine at W={ws[0]})", file=out)
        head = f"{'K/V format':15s}" + "".join(f"{'W=' + str(w):>24s}" for w in ws) + f"{'pred':>7s}{'cos':>10s}"
        print(head, file=out)
        for k, v in pairs:
            cells = []
            for w in ws:
                r = by.get((dist, d, n, k, v, w))
                cells.append(f"{'-':>24s}" if r is None else
                             f"{_fmt(r['nmse_mean']):>9s} [{_fmt(r['nmse_ci_lo'])},{_fmt(r['nmse_ci_hi'])}]"
                             .rjust(24))
            r0 = by.get((dist, d, n, k, v, ws[0]))
            pr = "" if r0 is None else f"{r0['pred_ratio']:7.3f}{r0['cos_mean']:10.6f}"
            print(f"{k + '/' + v:15s}" + "".join(cells) + pr, file=out)


def _write_tables(out_dir: pathlib.Path, rows: list[dict], channels: list[dict], meta: dict) -> None:
    cols = list(rows[0].keys()) if rows else []
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps(dict(meta, rows=rows), indent=1, allow_nan=True))
    (out_dir / "channels.json").write_text(json.dumps(dict(meta, channels=channels), indent=1))


_ID_FIELDS = ("k_format", "v_format", "hot_window", "kv_len", "head_dim", "dist", "samples", "seed")


def _read_jsonl(path: pathlib.Path, configs: dict | None = None) -> list[dict]:
    """Rows of a --resume file (untrusted). A row of a configuration of this sweep (``configs``: key ->
    Config) is kept only when it is an object whose identifying fields are that configuration's and whose
    other fields are numbers (or null); any other row of the wrong shape is an error naming file:line.
    Lines that are not JSON (a cut write) are recomputed."""
    out = []
    if not path.exists():
        return out
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by an interrupted run: recomputed
            continue
        where = f"{escape(path)}:{i}"
        if not isinstance(r, dict) or not all(isinstance(r.get(f), (str, int)) and not isinstance(r.get(f), bool)
                                              for f in _ID_FIELDS):
            raise _UsageError(f"{where}: expected a result row with {', '.join(_ID_FIELDS)}, found "
                              f"{escape(line, 80)}")
        if configs is not None:
            if not isinstance(r.get("key"), str):
                raise _UsageError(f"{where}: key: expected a string, found {escape(repr(r.get('key')), 80)}")
            cfg = configs.get(r["key"])
            if cfg is None:
                continue
            for f in _ID_FIELDS:
                if r[f] != getattr(cfg, f):
                    raise _UsageError(f"{where}: {f}: expected {getattr(cfg, f)!r} for key {escape(r['key'])}, "
                                      f"found {escape(repr(r[f]), 40)}")
            for k, v in r.items():
                if k not in _ID_FIELDS and k != "key" and v is not None and (
                        isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise _UsageError(f"{where}: {escape(k, 40)}: expected a number, found {escape(repr(v), 40)}")
        out.append(r)
    return out


def main(argv: list[str]) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad arguments)."""
    if any(a == "--from-traces" or a.startswith("--from-traces=") for a in argv):  # a captured run
        return sensitivity_traces.main(argv)
    try:
        args = _parser().parse_args(argv)
        samples = _ints(args.samples, "--samples")
        seed = _ints(args.seed, "--seed")
        if len(samples) != 1 or len(seed) != 1:
            raise _UsageError("--samples/--seed: expected one integer")
        devices = None
        if args.devices is not None:
            dv = _ints(args.devices, "--devices")
            if len(dv) != 1 or dv[0] < 1:
                raise _UsageError(f"--devices: expected a positive integer, got {args.devices!r}")
            devices = dv[0]
            _set_devices(devices)
        if samples[0] > MAX_SAMPLES:
            raise _UsageError(f"--samples: expected at most {MAX_SAMPLES}, got {samples[0]}")
        kv_lens = _bounded(_ints(args.kv_len, "--kv-len"), "--kv-len", MAX_LEN)
        head_dims = _bounded(_ints(args.head_dim, "--head-dim"), "--head-dim", MAX_HEAD_DIM)
        hot = _bounded(_ints(args.hot_window, "--hot-window"), "--hot-window", MAX_LEN)
        work = samples[0] * max(kv_lens) * max(head_dims)
        if work > MAX_WORK:
            raise _UsageError(f"--samples x --kv-len x --head-dim: the largest configuration is {work} elements, "
                              f"expected at most {MAX_WORK}")
        pairs = sens.pairs_from(_names(args.formats, "--formats"), _names(args.k_format, "--k-format"),
                                _names(args.v_format, "--v-format"))
        sweep = sens.Sweep(format_pairs=pairs, hot_windows=hot, kv_lens=kv_lens, head_dims=head_dims,
                           dists=_names(args.dist, "--dist"), samples=samples[0], seed=seed[0])
        mesh = sens.make_mesh(devices)
        out_dir = pathlib.Path(args.out)
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise _UsageError(f"--out: expected a directory, found a file or device at {escape(out_dir)}")
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _UsageError(f"--out: cannot create {escape(out_dir)}: {e.strerror or type(e).__name__}") from None
        for name in ("results.jsonl", "channels.jsonl"):
            q = out_dir / name
            if (q.exists() or q.is_symlink()) and not q.is_file():
                raise _UsageError(f"--out: {escape(q)} is not a regular file (a FIFO or device): remove it")
            if not (args.resume or args.overwrite) and q.is_file() and q.stat().st_size > 0:
                raise _UsageError(f"--out {escape(out_dir)}: holds an earlier sweep's results ({name}); add "
                                  f"--resume to continue it, --overwrite to replace it, or give a new --out DIR")
        if args.resume and args.overwrite:
            raise _UsageError("--resume and --overwrite: choose one")
        return _run(sens, sweep, mesh, out_dir, args, argv)
    except (_UsageError, ValueError, OSError, MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sensitivity: error: {escape(msg)}", file=sys.stderr)
        return 2


def _run(sens, sweep, mesh, out_dir: pathlib.Path, args, argv) -> int:
    res_path, ch_path = out_dir / "results.jsonl", out_dir / "channels.jsonl"
    if not args.resume:
        for p in (res_path, ch_path):
            if p.exists():
                p.unlink()
    done = {r["key"]: r for r in _read_jsonl(res_path, {c.key: c for c in sweep.configs()})}
    ch_done = _read_jsonl(ch_path)
    groups = sweep.groups()
    todo = [g for g in groups if not all(c.key in done for c in g.configs())]
    n_dev = mesh.devices.size
    print(f"sensitivity: {len(sweep.configs())} configurations x {sweep.samples} samples in "
          f"{len(groups)} groups ({len(groups) - len(todo)} already done), {n_dev} device(s) -> {out_dir}",
          file=sys.stderr)
    t0 = time.time()
    skip_keys = {g: all(c.key in done for c in g.configs()) for g in groups}
    for i, (g, rows, chans) in enumerate(sens.run_sweep(sweep, mesh=mesh, skip=lambda g: skip_keys[g])):
        with open(res_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
                done[r["key"]] = r
        with open(ch_path, "a") as f:
            for c in chans:
                f.write(json.dumps(c) + "\n")
        ch_done.extend(chans)
        el = time.time() - t0
        eta = el / (i + 1) * (len(todo) - i - 1)
        print(f"  [{i + 1}/{len(todo)}] {g.label}: {len(rows)} configs, {el:.0f} s elapsed, "
              f"~{eta:.0f} s left", file=sys.stderr, flush=True)

    keys = [c.key for c in sweep.configs()]
    rows = [done[k] for k in keys if k in done]
    want = {(g.k_format, g.v_format, g.dist, g.head_dim, n, g.hot_windows[0], g.samples, g.seed)
            for g in groups for n in g.kv_lens}
    chans = {}
    for c in ch_done:
        kk = (c["k_format"], c["v_format"], c["dist"], c["head_dim"], c["kv_len"], c["hot_window"],
              c["samples"], c["seed"])
        if kk in want:
            chans[kk] = c
    chans = list(chans.values())
    meta = dict(
        command="python -m fuzz sensitivity " + " ".join(argv),
        sweep=dict(format_pairs=[list(p) for p in sweep.format_pairs], hot_windows=list(sweep.hot_windows),
                   kv_lens=list(sweep.kv_lens), head_dims=list(sweep.head_dims), dists=list(sweep.dists),
                   samples=sweep.samples, seed=sweep.seed),
        devices=n_dev,
        statistics="mean and 95th percentile over samples; ci_lo/ci_hi: 95% percentile-bootstrap CI of the "
                   "mean (2000 resamples)",
        reference="float64 attention over the unquantized (F16-exact) K/V; scale 1/sqrt(D)",
        distributions={k: v.description for k, v in sens.DISTRIBUTIONS.items()})
    _write_tables(out_dir, rows, chans, meta)
    _summary(rows, sys.stdout)
    print(f"\nwrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}, {out_dir / 'channels.json'} "
          f"({time.time() - t0:.0f} s)")
    if args.plot:
        try:
            paths = sensitivity_plots.plot_all(rows, chans, out_dir)
        except ImportError as e:
            print(f"plots skipped: {e}")
        else:
            print("plots: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
