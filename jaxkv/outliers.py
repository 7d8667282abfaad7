"""Outlier channels: the one definition of "outlier" in jaxkv's value distributions, and its profiles.

An outlier profile scales a few head-dim channels (the last axis) of a tensor by one factor, like the
few large channels real K caches show. It is two numbers: ``per_64`` channels of every 64 (at least
one) and ``scale``. :func:`Outliers.channels` draws which channels, :func:`Outliers.apply` scales them.

The profiles differ on purpose; each is named for what it is for (:data:`PROFILES`):

- ``"fuzz"``: x50 on 4 of 64 channels of q and k (``fuzz.cases``' ``outlier`` distribution for the
  attention properties): a product of two outlier channels (x2500) dominates the logit, so the
  softmax is peaked and the float32 sums see large, cancelling terms, while every stored value stays
  far below F16's 65504.
- ``"menu"``: x30 on 4 of 64 channels (the live-ggml case menus, ``fuzz.cases.menu_values``), whose
  values ggml stores in F16 and block formats; the figures of docs/ggml-findings.md ("outlier channels
  (x30)") were measured with it.
- ``"sensitivity"``: x10 on 2 of 64 K channels (``jaxkv.sensitivity``'s ``outliers``): the
  quantisation-error study, where the outlier sets a block's scale (docs/sensitivity.md); the
  measured figures there are for this profile.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Outliers", "PROFILES", "FUZZ", "MENU", "SENSITIVITY"]


@dataclasses.dataclass(frozen=True)
class Outliers:
    """``per_64`` of every 64 channels (at least one) scaled by ``scale``; ``reason``: what the factor is for."""

    per_64: int
    scale: float
    reason: str = ""

    def count(self, d: int) -> int:
        """How many of ``d`` channels are outliers: ``max(1, per_64 * d // 64)`` (0 when ``per_64 <= 0``)."""
        return 0 if self.per_64 <= 0 else max(1, (self.per_64 * int(d)) // 64)

    def channels(self, rng: np.random.Generator, d: int) -> np.ndarray:
        """The outlier channels of a ``d``-channel axis, drawn without replacement from ``rng`` (unsorted)."""
        return rng.choice(int(d), size=self.count(d), replace=False)

    def apply(self, rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
        """``x`` [..., D] (float, modified in place and returned) with :meth:`channels` scaled by ``scale``."""
        x[..., self.channels(rng, x.shape[-1])] *= self.scale
        return x


FUZZ = Outliers(4, 50.0, "fuzz attention cases: a peaked softmax from q.k outlier products, F16-safe values")
MENU = Outliers(4, 30.0, "live-ggml case menus: values ggml stores in F16 and block formats")
SENSITIVITY = Outliers(2, 10.0, "quantisation sensitivity study: K outliers that set their blocks' scales")

#: profile name -> :class:`Outliers`
PROFILES: dict[str, Outliers] = {"fuzz": FUZZ, "menu": MENU, "sensitivity": SENSITIVITY}
