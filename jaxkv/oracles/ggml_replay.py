"""Re-run a trace v1 file's op through live ggml (:mod:`jaxkv.oracles.ggml`) on the trace's stored inputs.

    python -m jaxkv.oracles.ggml_replay FILE.gguf [--threads N]

prints, per file, whether live ggml reproduces the stored ``out`` bit for bit (NaN == NaN), the NMSE, and
the output rows that are NaN (ggml's unfused path gives NaN on rows with no live key). Exit 0 when every
file reproduces, 1 otherwise, 2 when a file cannot be read.

The reader interprets tensors independently of :mod:`jaxkv.trace` (gguf's reader + :mod:`jaxkv.layout`
only), so comparing the oracle with traces does not go through the trace loader under test; only the
file's GGUF structure is first checked with `jaxkv.trace.check_file` (bounded reads: a forged count or
length cannot make gguf loop or allocate without bound; FIFOs and devices are refused). Metadata keys are
checked for type, tensors for role, type and size (each at most ``--max-elements``, and the logits
B*H*n_q*n_kv too), before anything reaches ggml. Quantized tensors stay raw blocks (uint8, bytes on the
last axis) and reach ggml as stored. Anything wrong with a file is one escaped ``ERROR`` line on stderr.

Layout (canonical): q [B, n_q, H, Dk], k/v [B, n_kv, Hkv, D] (or raw blocks [B, n_kv, Hkv, row_bytes]),
mask [B|1, H|1, n_q(+padding), n_kv], sinks [H], out [B, n_q, H, Dv].
"""

from __future__ import annotations

import argparse
import math
import sys

import gguf
import numpy as np

from jaxkv import cli
from jaxkv import budget, formats, layout, ops
from jaxkv import trace as _structure
from jaxkv.textsafe import escape

__all__ = ["read_trace", "replay", "main"]

_ROLES = {"q": "q", "k": "k", "k_cold": "k", "v_cold": "v", "k_hot": "k", "v_hot": "v", "mask": "mask",
          "out": "out"}


#: trace.* key -> (python type(s), required)
_KEYS = {"trace.op": (str, True), "trace.scale": (float, True), "trace.max_bias": (float, False),
         "trace.logit_softcap": (float, False), "trace.n_threads": (int, False), "trace.kv_order": (str, False),
         "trace.v_transposed": (bool, False)}
_DEFAULTS = {"trace.max_bias": 0.0, "trace.logit_softcap": 0.0, "trace.n_threads": 1, "trace.kv_order": "cold,hot",
             "trace.v_transposed": False}
_TYPES = tuple(formats.ggml_name(t) for t in formats.KV_TYPES)
MAX_ELEMENTS = 1 << 25


def read_trace(path, max_elements: int = MAX_ELEMENTS):
    """(metadata, tensors) of a trace v1 file: metadata = the ``trace.*`` keys; tensors = {name: (ggml
    type name, canonical array or raw blocks)} (``v`` is un-transposed when ``trace.v_transposed``).
    ValueError (one line, naming the key or tensor) for a file that is not such a trace."""
    _structure.check_file(path)
    r = gguf.GGUFReader(path)
    md = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("trace.")}
    if "trace.view." in " ".join(md):
        raise ValueError("trace.view.*: views are not supported by this reader (load the trace with jaxkv.trace)")
    for k, (typ, required) in _KEYS.items():
        if k not in md:
            if required:
                raise ValueError(f"key {k!r}: required")
            md[k] = _DEFAULTS[k]
        v = md[k]
        if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            md[k] = float(v)
        elif typ is int and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 512:
            pass
        elif typ in (str, bool) and isinstance(v, typ):
            pass
        else:
            raise ValueError(f"key {k!r}: expected a {'finite ' if typ is float else ''}{typ.__name__}"
                             f"{' in [1, 512]' if typ is int else ''}, found {escape(repr(v), 60)}")
    roles = dict(_ROLES, v="v_t" if md.get("trace.v_transposed") else "v", sinks="sinks")
    ts = {}
    for t in r.tensors:
        if t.name not in roles:
            raise ValueError(f"tensor {escape(repr(t.name), 80)}: expected one of {sorted(roles)}")
        if t.name in ts:
            raise ValueError(f"tensor {t.name!r}: expected once, found twice")
        if t.tensor_type.name not in _TYPES:
            raise ValueError(f"tensor {t.name!r} type: expected one of {_TYPES}, found {t.tensor_type.name}")
        ne = [int(x) for x in t.shape] + [1] * (4 - len(t.shape))
        if math.prod(ne) > max_elements:
            raise ValueError(f"tensor {t.name!r}: {math.prod(ne)} elements, more than --max-elements {max_elements}")
        d = np.asarray(t.data)
        if t.name == "sinks":
            ts[t.name] = (t.tensor_type.name, d.reshape(-1))
            continue
        d = d.reshape(ne[::-1]) if t.tensor_type.name in ("F32", "F16") else d.reshape(ne[3], ne[2], ne[1], -1)
        ts[t.name] = (t.tensor_type.name, np.asarray(layout.ggml_to_canonical(roles[t.name], d)))
    if "q" not in ts or "out" not in ts:
        raise ValueError(f"tensors: expected q and out, found {sorted(ts)}")
    B, n_q, H, _ = ts["q"][1].shape
    n_kv = sum(a.shape[1] for n, (_, a) in ts.items() if n in ("k", "k_cold", "k_hot"))
    if B * H * n_q * n_kv > max_elements:
        raise ValueError(f"tensor 'q': logits B*H*n_q*n_kv = {B * H * n_q * n_kv}, more than --max-elements "
                         f"{max_elements}")
    return md, ts


def replay(md, ts, n_threads=None) -> np.ndarray:
    """Live ggml's float32 output [B, n_q, H, Dv] for a trace read by :func:`read_trace` (the trace's
    ``n_threads`` unless given; mask padding rows dropped): the trace's op's ``live`` (:mod:`jaxkv.ops`)."""
    op = ops.get(md["trace.op"], "trace.op")
    if op.live is None:
        raise ValueError(f"trace.op: op {op.name!r} has no live ggml implementation")
    q = ts["q"][1]
    mask = ts["mask"][1][:, :, : q.shape[1], :].astype(np.float32) if "mask" in ts else None
    params = dict(scale=md["trace.scale"], n_threads=int(n_threads or md["trace.n_threads"]), mask=mask,
                  max_bias=md["trace.max_bias"], softcap=md["trace.logit_softcap"], kv_order=md["trace.kv_order"])
    return op.live(ts, params)


def main(argv=None) -> int:
    """CLI (module docstring)."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2
            print(f"python -m jaxkv.oracles.ggml_replay: error: {escape(message)}", file=sys.stderr)
            sys.exit(2)

    p = Parser(prog=cli.prog('ggml-replay'))
    p.add_argument("files", nargs="+")
    p.add_argument("--threads", type=int, default=None, help="n_threads (default: the trace's)")
    p.add_argument("--max-elements", type=int, default=MAX_ELEMENTS,
                   help=f"largest tensor / logits (B*H*n_q*n_kv) accepted (default {MAX_ELEMENTS})")
    a = p.parse_args(argv)
    if a.threads is not None and not 1 <= a.threads <= 512:
        p.error(f"--threads: expected 1..512, got {a.threads}")
    if a.max_elements < 1:
        p.error(f"--max-elements: expected >= 1, got {a.max_elements}")
    rc = 0
    for f in a.files:
        try:
            md, ts = read_trace(f, a.max_elements)
            live = np.asarray(replay(md, ts, a.threads), np.float64)
        except Exception as e:  # noqa: BLE001 - one line per file that is not a replayable trace
            msg = str(e).strip().splitlines()
            print(f"ERROR {escape(f)}: {type(e).__name__}: {escape(msg[0] if msg else '')}", file=sys.stderr)
            rc = 2
            continue
        ref = np.asarray(ts["out"][1], np.float64)
        same = np.array_equal(live, ref, equal_nan=True)
        nan_rows = np.argwhere(np.isnan(live).any(axis=-1))
        ok = np.isfinite(live) & np.isfinite(ref)
        nmse = budget.nmse(np.where(ok, live, 0.0), np.where(ok, ref, 0.0))  # finite elements only
        print(f"{'SAME' if same else 'DIFF'} {escape(f)}: op {escape(md['trace.op'])}, bitwise "
              f"{'equal' if same else 'different'}, nmse {nmse:.3g} (finite elements), NaN rows "
              f"{len(nan_rows)} of {int(np.prod(live.shape[:-1]))}"
              + (f" (batch, query, head): {[tuple(int(x) for x in r) for r in nan_rows[:8]]}"
                 + (" ..." if len(nan_rows) > 8 else "") if len(nan_rows) else ""))
        rc = max(rc, 0 if same else 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
