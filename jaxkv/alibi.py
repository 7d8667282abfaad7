"""ALiBi slopes, ggml's formula, in the three arithmetics the project needs.

ggml (``ggml_compute_forward_soft_max`` / ``flash_attn_ext``): ``n_log2 = 2^floor(log2(H))``,
``m0 = 2^(-max_bias/n_log2)``, ``m1 = 2^(-(max_bias/2)/n_log2)``; head ``h`` gets ``m0^(h+1)`` for
``h < n_log2`` else ``m1^(2(h-n_log2)+1)``; all ones when ``max_bias <= 0``. The arithmetic is a
parameter (``pow``):

- ``"libm"``: float32 with the C library's ``powf``, exactly as ggml-cpu computes them (the ggml-cpu
  model); numpy's float32 ``power`` is one ulp off libm for some bases (docs/ggml-findings.md, finding 1).
  Where no C math library loads, numpy's float32 power stands in (then an ulp may differ).
- ``"numpy"``: float32 with numpy's ``power`` (the float32 reference :mod:`jaxkv.attention`, the
  float64 golden's hooks in :mod:`jaxkv.verify.mutations`).
- ``"exact"``: float64 throughout, ``max_bias`` as given (an independent float64 golden).

:func:`slopes` returns float64 ``[H]`` (holding float32 values except under ``"exact"``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxkv import libm

__all__ = ["POWS", "libm_powf", "slopes", "traced_slopes"]

POWS = ("libm", "numpy", "exact")


def libm_powf():
    """The C library's ``float powf(float, float)`` (ctypes, loaded once: :func:`jaxkv.libm.powf`), or None
    where no C math library loads."""
    return libm.powf()


def _numpy_powf(x, y) -> float:
    return float(np.power(np.float32(x), np.float32(y), dtype=np.float32))


def _exponents(n_head: int):
    """(n_log2, low [H] bool: head takes m0, expo [H] int) of ggml's formula."""
    n_head = int(n_head)
    if n_head < 1:
        raise ValueError(f"n_head: must be >= 1, got {n_head}")
    n_log2 = 1 << int(math.floor(math.log2(n_head)))
    h = np.arange(n_head)
    low = h < n_log2
    return n_log2, low, np.where(low, h + 1, 2 * (h - n_log2) + 1)


def traced_slopes(n_head: int, max_bias):
    """The slopes float32 [n_head] of a traced (jit) ``max_bias``, in XLA float32 ops."""
    n_log2, low, expo = _exponents(n_head)
    mb = jnp.asarray(max_bias, jnp.float32)
    m0 = jnp.power(jnp.float32(2.0), -mb / jnp.float32(n_log2))
    m1 = jnp.power(jnp.float32(2.0), -(mb / jnp.float32(2.0)) / jnp.float32(n_log2))
    s = jnp.power(jnp.where(low, m0, m1), expo.astype(np.float32))
    return jnp.where(mb > 0, s, jnp.ones_like(s)).astype(jnp.float32)


def slopes(n_head: int, max_bias: float, pow: str = "numpy") -> np.ndarray:
    """ALiBi slopes float64 [n_head] of ggml's formula in the arithmetic ``pow`` (module docstring)."""
    n_log2, low, expo = _exponents(n_head)
    if pow not in POWS:
        raise ValueError(f"pow: expected one of {POWS}, got {pow!r}")
    h = np.arange(int(n_head))
    if pow == "exact":
        mb = float(max_bias)
        if not mb > 0:
            return np.ones(n_head, np.float64)
        m0 = 2.0 ** (-mb / n_log2)
        m1 = 2.0 ** (-(mb / 2.0) / n_log2)
        return np.where(low, m0 ** (h + 1), m1 ** expo).astype(np.float64)
    mb = np.float32(max_bias)
    if not mb > 0:
        return np.ones(n_head, np.float64)
    if pow == "numpy":
        with np.errstate(all="ignore"):
            m0 = np.power(np.float32(2.0), -mb / np.float32(n_log2), dtype=np.float32)
            m1 = np.power(np.float32(2.0), -(mb / np.float32(2.0)) / np.float32(n_log2), dtype=np.float32)
            base = np.where(low, m0, m1).astype(np.float32)
            return np.power(base, expo.astype(np.float32), dtype=np.float32).astype(np.float64)
    powf = libm_powf() or _numpy_powf
    m0 = powf(2.0, float(-mb / np.float32(n_log2)))
    m1 = powf(2.0, float(-(mb / np.float32(2.0)) / np.float32(n_log2)))
    return np.array([powf(m0 if lo else m1, float(e)) for lo, e in zip(low, expo)], np.float64)
