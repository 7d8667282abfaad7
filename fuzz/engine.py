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

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkv.budget import FACTOR, budget_of, derive_budget, emu_check, errors, nmse, nmse_from_sums
from jaxkv.ops.family import acc_unit  # the sharp check's unit (re-exported: fuzz.engine.acc_unit)

__all__ = ["BATCH", "CompileCounter", "COMPILES", "differences", "stats", "verdict", "Batched", "tree_stack",
           "Result", "judge", "acc_unit"]

BATCH = 32


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


def verdict(got_stats, model_stats, factor: float = FACTOR) -> tuple[bool, dict]:
    """(ok, metrics) of a kernel from its :func:`stats` against the golden and the honest model's."""
    e2, power, mx, nan, gmax = (float(x) for x in got_stats)
    me2, mpower, mmx, _, _ = (float(x) for x in model_stats)
    nmse, model_nmse = nmse_from_sums(e2, power), nmse_from_sums(me2, mpower)
    b = budget_of(model_nmse, mmx, gmax, "model", factor)
    b_nmse, b_max = b.nmse, b.max_abs
    ok = nan == 0 and nmse <= b_nmse and mx <= b_max
    return ok, dict(nmse=nmse, max_abs=mx, nan_count=int(nan), budget_nmse=b_nmse, budget_max_abs=b_max,
                    model_nmse=model_nmse, model_max_abs=mmx)


@dataclasses.dataclass(frozen=True)
class Result:
    """One sharp (``ggml-cpu``) case's outcome (:func:`judge`): ``ok``; ``bitwise`` (fraction of output
    elements equal to the model's); ``nmse_model`` (kernel vs model); ``emu_units``
    (jaxkv.verify.emu_check); ``nmse``/``budget_nmse`` (vs the golden and its budget); ``why`` (the
    failed checks). Float32 subnormal outputs count like any other value (the model keeps them, as ggml
    does: docs/ggml-findings.md, finding 3)."""

    ok: bool
    bitwise: float
    nmse_model: float
    emu_units: float
    nmse: float
    budget_nmse: float
    why: str | None


def judge(got, model, g, unit, unfused_dead=None) -> Result:
    """The verdict of a kernel output ``got`` against its bit-faithful model ``model`` (the ``ggml-cpu``
    emulation) and the float64 golden ``g`` (all [B, n_q, H, Dv]; ``unit``: the V accumulator's unit
    roundoff, jaxkv.budget.U16 or U32: :func:`acc_unit`): jaxkv.verify's budget vs the golden (``error <= 3 * error(model)
    + 4 f32 units``) and its sharp check vs the emulation (within ``EMU_UNITS`` accumulator roundings:
    ``verify.emu_check``). ``unfused_dead`` (bool [B, n_q, H], ggml's unfused path only): rows with no
    live key, where ggml's soft_max_ext gives NaN: kernel and model must both be NaN in exactly those
    rows, which are then judged as the golden's 0."""
    why = []
    if unfused_dead is not None:
        dead = np.asarray(unfused_dead, bool)[..., None]
        for name, x in (("kernel", got), ("model", model)):
            nan = np.isnan(x)
            if not np.array_equal(nan, np.broadcast_to(dead, x.shape)):
                why.append(f"{name}: NaN in {int(nan.sum())} elements, expected exactly the "
                           f"{int(np.broadcast_to(dead, x.shape).sum())} of the rows with no live key")
        got, model = np.where(dead, 0.0, got), np.where(dead, 0.0, model)
    same = (got == model) | (np.isnan(got) & np.isnan(model))
    budget = derive_budget(g, model, "ggml-cpu emulation")
    e = errors(got, g)
    emu = emu_check(got, model, unit)
    if not budget.allows(e):
        why.append(f"vs golden: nmse {e.nmse:.3g} (budget {budget.nmse:.3g}), max_abs {e.max_abs:.3g} "
                   f"(budget {budget.max_abs:.3g}), NaN {e.nan_count}")
    if not emu.ok:
        why.append(f"vs emulation: {emu.units:.3g} units (budget {emu.budget_units:g}), {emu.n_differ} differ")
    with np.errstate(all="ignore"):
        nm = nmse(np.nan_to_num(got), np.nan_to_num(model))
    return Result(ok=not why, bitwise=float(same.mean()), nmse_model=nm, emu_units=emu.units, nmse=e.nmse,
                  budget_nmse=budget.nmse, why="; ".join(why) or None)


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
