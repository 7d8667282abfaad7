"""Injected bugs for captured traces: a copy of a trace whose ``out`` is what a buggy kernel would
have written, to show that ``verify`` rejects it and names the bug.

- ``out_permuted``: the kernel wrote its (real, correct) output as ``[Dv, n_q, H]`` while the reader takes
  ggml's ``[Dv, H, n_q]`` (needs n_q > 1 and H > 1 to change anything);
- ``kv_token_dropped``: the kernel skipped the first KV cell: the ggml-cpu emulation (bit-exact with
  the real kernel on these captures) of the call with that key masked out; the trace keeps the real mask.

The copy is written by :func:`jaxkv.trace.save` from the loaded operands (dense, no views) with the
original metadata (``capture.*``, ``ggml.*``), so ``verify`` judges it under the same model.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np

from jaxkv import trace as T
from jaxkv import verify as V

__all__ = ["BUGS", "buggy_out", "inject"]

BUGS = ("out_permuted", "kv_token_dropped")


def buggy_out(trace, bug: str) -> np.ndarray:
    """The output [B, n_q, H, Dv] float32 of ``trace``'s call under ``bug`` (module docstring)."""
    out = np.asarray(trace.out, np.float32)
    B, n_q, H, Dv = out.shape
    if bug == "out_permuted":
        if n_q < 2 or H < 2:
            raise ValueError(f"bug out_permuted: needs n_q > 1 and H > 1 to change the output, got n_q={n_q}, H={H}")
        mem = np.ascontiguousarray(np.transpose(out, (0, 2, 1, 3)))  # memory [B, H, n_q, Dv] = ne [Dv, n_q, H, B]
        return mem.reshape(B, n_q, H, Dv)
    if bug == "kv_token_dropped":
        n_kv = np.shape(trace.k if trace.k is not None else trace.k_cold)[1]
        mask = np.zeros((1, 1, n_q, n_kv), np.float32) if trace.mask is None else np.array(trace.mask, np.float32)
        mask[..., 0] = -np.inf
        t2 = dataclasses.replace(trace, mask=mask)
        case = V.case_from_trace(t2)
        return np.asarray(V.model_output(t2, case, "ggml-cpu"), np.float32)
    raise ValueError(f"bug: expected one of {BUGS}, got {bug!r}")


def inject(src, dst, bug: str) -> pathlib.Path:
    """Write a copy of the trace file ``src`` to ``dst`` with ``out`` replaced by :func:`buggy_out`."""
    t = T.load(src)
    md = {k: v for k, v in (t.metadata or {}).items() if not k.startswith(("trace.", "jaxkv.", "GGUF."))}
    md["capture.injected_bug"] = bug
    return T.save(dst, t, out=buggy_out(t, bug), metadata=md)


def main(argv=None) -> int:
    """``python -m jaxkv.capture.inject SRC_DIR DST_DIR BUG``: inject BUG into every capture trace of a run
    where it changes the output (out_permuted: calls with n_q > 1; kv_token_dropped: every call)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[2] not in BUGS:
        print(f"usage: python -m jaxkv.capture.inject SRC_DIR DST_DIR {{{'|'.join(BUGS)}}}", file=sys.stderr)
        return 2
    src, dst, bug = pathlib.Path(argv[0]), pathlib.Path(argv[1]), argv[2]
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(src.glob("*.gguf")):
        try:
            inject(p, dst / p.name, bug)
            n += 1
        except ValueError as e:
            print(f"skipped {p.name}: {e}", file=sys.stderr)
    print(f"wrote {n} traces with bug {bug} to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
