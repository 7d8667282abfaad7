"""The C math library's float functions through ctypes: the ``powf`` ggml-cpu computes ALiBi slopes with and
the ``expf`` of its softmax. Loaded once; None where no C math library loads (callers then fall back to
numpy's float32 arithmetic, which may differ by an ulp: docs/ggml-findings.md, finding 1)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["lib", "powf", "expf"]


@functools.lru_cache(maxsize=1)
def lib():
    """The C math library (``ctypes.CDLL``), or None where none loads."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


def _float_fn(name: str, n_args: int):
    m = lib()
    f = getattr(m, name, None) if m is not None else None
    if f is None:
        return None
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float] * n_args
    return f


@functools.lru_cache(maxsize=1)
def powf():
    """``float powf(float, float)``, or None where no C math library loads."""
    return _float_fn("powf", 2)


@functools.lru_cache(maxsize=1)
def expf():
    """``float expf(float)``, or None where no C math library loads."""
    return _float_fn("expf", 1)
