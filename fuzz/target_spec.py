"""``--target`` specifications: a ``MODULE:FUNCTION`` kernel or a live ggml op name -> the callable."""

from __future__ import annotations

import importlib
import sys

__all__ = ["GGML_TARGETS", "load_target"]

GGML_TARGETS = ("ggml", "ggml-unfused", "ggml-mixed")


def load_target(spec: str, threads: int | None = None):
    """'MODULE:FUNCTION' -> the callable; 'ggml' / 'ggml-unfused' / 'ggml-mixed' ->
    fuzz.ggml_targets.make_target(spec, threads or 1). ValueError with one line otherwise (a bad
    spec, --threads with a MODULE:FUNCTION target, ggml not installed)."""
    if threads is not None and (isinstance(threads, bool) or not 1 <= threads <= 512):
        raise ValueError(f"--threads: expected an int in [1, 512], got {threads!r}")
    if spec in GGML_TARGETS:
        from fuzz import ggml_targets

        try:
            return ggml_targets.make_target(spec, 1 if threads is None else threads)
        except (ImportError, OSError, RuntimeError) as e:  # OracleUnavailable is a RuntimeError
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"--target {spec}: live ggml is not available (install the extra: pip install "
                             f"'jaxkv[ggml]'): {msg}") from None
    if threads is not None:
        raise ValueError(f"--threads: only for --target {'|'.join(GGML_TARGETS)}, not {spec!r}")
    if ":" not in spec:
        raise ValueError(f"--target: expected MODULE:FUNCTION or one of {', '.join(GGML_TARGETS)}, got {spec!r}")
    mod, fn = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        m = importlib.import_module(mod)
    except Exception as e:
        raise ValueError(f"--target: cannot import {mod!r}: {type(e).__name__}: {e}") from None
    f = getattr(m, fn, None)
    if not callable(f):
        raise ValueError(f"--target: {mod!r} has no function {fn!r}")
    return f
