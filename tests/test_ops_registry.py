"""The op registry (jaxkv.ops): every entry is consistent and look-up errors are one line naming the
field. (An op defined in a test file alone: tests/test_toy_op.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from jaxkv import formats, ops
from jaxkv.attention import attention
from jaxkv import verify as V

# ----------------------------------------------------------------------------------------------------
# every registered op


@pytest.mark.parametrize("name", list(ops.OPS))
def test_entry_is_consistent(name):
    op = ops.get(name)
    assert op.name == name
    assert set(op.required) <= set(op.roles), (op.required, tuple(op.roles))
    assert set(op.kv_roles) <= set(op.roles)
    assert {"q", "out"} <= set(op.required)
    assert set(op.models) <= set(ops.PRECISIONS), tuple(op.models)
    assert set(op.dense_models) <= set(op.models)
    assert all(set(types) <= set(formats.KV_TYPES) for types in op.roles.values()), dict(op.roles)
    assert set(op.absent_why).isdisjoint(op.roles)
    for region in op.kv_regions:
        assert {f"k_{region}", f"v_{region}"} <= set(op.required)
    if op.target is not None:
        assert ops.by_target(op.target) is op
    assert op.file_tag


def test_targets_and_file_tags_are_unique():
    targets = [o.target for o in ops.OPS.values() if o.target is not None]
    tags = [o.file_tag for o in ops.OPS.values()]
    assert len(set(targets)) == len(targets) and len(set(tags)) == len(tags)


@pytest.mark.parametrize("call,field", [(lambda: ops.get("nope"), "op"),
                                        (lambda: ops.get("nope", "trace.op"), "trace.op"),
                                        (lambda: ops.by_target("nope"), "--target"),
                                        (lambda: ops.by_target("nope", "target"), "target"),
                                        (lambda: ops.precision("f8"), "precision"),
                                        (lambda: ops.get("flash_attn_ext").model("f8"), "precision")])
def test_lookup_errors_are_one_line_naming_the_field(call, field):
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field}: "), msg


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        ops.register(ops.get("flash_attn_ext"))


def test_verify_precisions_come_from_the_registry():
    assert V.PRECISIONS == ("auto",) + tuple(ops.PRECISIONS)
    assert [p for p in ops.PRECISIONS.values() if p.sharp] == [ops.PRECISIONS["ggml-cpu"]]


def _operands(seed=0, B=1, n_q=3, H=4, Hkv=2, n_kv=7, D=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n_q, H, D)).astype(np.float32)
    k = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    return q, k, v


def test_golden_equals_attention_f64_for_every_family_op():
    """The registered ops' golden (numpy float64) equals jaxkv.attention(precision="f64") on their case."""
    q, k, v = _operands(2, n_kv=9)
    mask = np.zeros((1, 1, 3, 9), np.float32)
    mask[..., 5:] = -np.inf
    for name in ops.OPS:
        c = V.mutations.Case(op=name, q=q.astype(np.float64), k=k.astype(np.float64), v=v.astype(np.float64),
                             mask=mask.astype(np.float64), scale=0.3)
        ref = np.asarray(attention(c.q, c.k, c.v, scale=c.scale, mask=c.mask, precision="f64"))
        np.testing.assert_allclose(ops.get(name).golden(c), ref, rtol=1e-12, atol=1e-14)
