"""Batched evaluation: bucketed, vmapped, jitted programs; compile counting; tolerance verdicts.

Every property evaluates its cases in batches of ``BATCH`` cases of one bucket (a bucket fixes every
array shape). A batch smaller than ``BATCH`` is filled with copies of its first case (results dropped),
so each (property, bucket) is exactly one XLA program whatever the number of cases; a shrink or replay of
one case reuses it. On a host with several JAX devices the batch axis is sharded over them
(``jax.sharding``; ``BATCH`` is rounded up to a multiple of the device count).

Tolerance (the method of ``jaxkv.verify``, docs/tolerance.md): a kernel output ``got`` is compared with
the float64 golden reference; the budget is ``FACTOR`` times the error of an honest float32
implementation (``attention(precision="f32")``) plus a floor of ``FLOOR_UNITS`` float32 unit roundoffs
of ``max|golden|``, on the NMSE (factor squared) and on the max-abs error; any NaN where the golden has
none fails. :func:`verdict` mirrors ``jaxkv.verify.derive_budget`` / ``Budget.allows`` on statistics
computed inside the program (:func:`stats`) over the case's real output region.
"""

from __future__ import annotations

import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.budget import FACTOR, FLOOR_UNITS, U32

__all__ = ["BATCH", "CompileCounter", "COMPILES", "differences", "stats", "verdict", "Batched", "tree_stack"]

BATCH = 32
_TINY = 2.0 ** -126


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring ``backend_compile_duration`` events) process-wide."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        import jax.monitoring as mon

        mon.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kw):
        if event == self.EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration


COMPILES = CompileCounter()


def differences(got, ref, valid):
    """In-program elementwise differences over the real region (``valid`` 1.0, broadcastable), float64:
    ``(d, rf, nan_count, valid)`` with d = |got - ref| (NaN in both: 0; NaN in one side only: inf; 0
    outside the region), rf = ref where finite and valid (else 0), nan_count = NaN in got only, and
    ``valid`` as a boolean of got's shape."""
    got = got.astype(jnp.float64)
    ref = ref.astype(jnp.float64)
    valid = jnp.broadcast_to(valid, got.shape) > 0
    both = jnp.isnan(got) & jnp.isnan(ref)
    d = jnp.where(both, 0.0, jnp.abs(got - ref))
    d = jnp.where(jnp.isnan(d), jnp.inf, d)
    d = jnp.where(valid, d, 0.0)
    rf = jnp.where(valid & jnp.isfinite(ref), ref, 0.0)
    nan = jnp.sum(valid & jnp.isnan(got) & ~jnp.isnan(ref)).astype(jnp.float64)
    return d, rf, nan, valid


def stats(got, ref, valid):
    """In-program error statistics over the real region (``valid`` 1.0, broadcastable):
    [e2 = sum d^2, power = sum ref^2, max_abs, nan_count, max|ref|] (float64), where d = |got - ref|
    with NaN in both counting 0 and a NaN in one side only counting inf."""
    d, rf, nan, _ = differences(got, ref, valid)
    return jnp.stack([jnp.sum(d * d), jnp.sum(rf * rf), jnp.max(d), nan, jnp.max(jnp.abs(rf))])


def _nmse(e2, power):
    if e2 == 0:
        return 0.0
    if power == 0 or not math.isfinite(e2):
        return math.inf
    return e2 / power


def verdict(got_stats, model_stats, factor: float = FACTOR) -> tuple[bool, dict]:
    """(ok, metrics) of a kernel from its :func:`stats` against the golden and the honest model's."""
    e2, power, mx, nan, gmax = (float(x) for x in got_stats)
    me2, mpower, mmx, _, _ = (float(x) for x in model_stats)
    nmse, model_nmse = _nmse(e2, power), _nmse(me2, mpower)
    b_nmse = factor ** 2 * model_nmse + (FLOOR_UNITS * U32) ** 2
    b_max = factor * mmx + FLOOR_UNITS * U32 * max(gmax, _TINY)
    ok = nan == 0 and nmse <= b_nmse and mx <= b_max
    return ok, dict(nmse=nmse, max_abs=mx, nan_count=int(nan), budget_nmse=b_nmse, budget_max_abs=b_max,
                    model_nmse=model_nmse, model_max_abs=mmx)


def tree_stack(items):
    """Stack a list of equal-structure pytrees of numpy arrays along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)


class Batched:
    """A property's batched programs, one per bucket key: ``make(key)`` returns the per-case function
    (JAX, positional pytree arguments); :meth:`run` stacks per-case argument tuples, pads to a multiple of
    ``BATCH`` and returns the per-case outputs (numpy pytrees)."""

    def __init__(self, make):
        self.make = make
        self._jit = {}
        self._sharding = None
        self.last_devices = 0  # devices the last batch ran on

    def _program(self, key):
        if key not in self._jit:
            self._jit[key] = jax.jit(jax.vmap(self.make(key)))
        return self._jit[key]

    def _batch_size(self):
        n = jax.device_count()
        return -(-BATCH // n) * n

    def _place(self, tree):
        n = jax.device_count()
        if n == 1:
            return tree
        if self._sharding is None:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(jax.devices()), ("cases",))
            self._sharding = NamedSharding(mesh, PartitionSpec("cases"))
        return jax.device_put(tree, self._sharding)

    @property
    def programs(self) -> int:
        return len(self._jit)

    def run(self, key, arg_list):
        """arg_list: list of per-case argument tuples (numpy pytrees) -> list of per-case outputs."""
        prog = self._program(key)
        bs = self._batch_size()
        out = []
        for s in range(0, len(arg_list), bs):
            chunk = list(arg_list[s:s + bs])
            n = len(chunk)
            chunk += [chunk[0]] * (bs - n)
            args = self._place(tree_stack(chunk))
            res = prog(*args)
            leaf = jax.tree_util.tree_leaves(res)[0]
            self.last_devices = len(getattr(leaf, "sharding", None).device_set) if hasattr(leaf, "sharding") else 1
            res = jax.device_get(res)
            for i in range(n):
                out.append(jax.tree_util.tree_map(lambda x, i=i: x[i], res))
        return out
