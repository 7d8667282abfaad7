"""The op registry (jaxkv.ops): every entry is consistent, look-up errors are one line naming the field,
and an op defined in this file alone is saved, loaded, verified and replayed without library changes."""

from __future__ import annotations

import numpy as np
import pytest

from jaxkv import formats, ops
from jaxkv.attention import attention
from jaxkv import trace as T
from jaxkv import verify as V
from jaxkv.oracles import ggml_replay
from jaxkv.ops.operands import kv_case

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


# ----------------------------------------------------------------------------------------------------
# a toy op, defined here alone: linear attention out[b, i, h] = sum_j (scale q.k_j) v_j


def _linear(q, k, v, scale, dtype):
    B, n_q, H, Dk = q.shape
    g = H // k.shape[2]
    kk = np.repeat(np.asarray(k, dtype), g, axis=2)
    vv = np.repeat(np.asarray(v, dtype), g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", np.asarray(q, dtype), kk) * dtype(scale)
    return np.einsum("bhij,bjhd->bihd", s, vv)


def _toy_golden(case):
    return _linear(case.q, case.k, case.v, case.scale, np.float64)


def _toy_live(ts, params):
    return _linear(ts["q"][1], ts["k"][1], ts["v"][1], params["scale"], np.float32)


TOY = ops.Op(
    name="toy_linear_attn", doc="linear attention (no softmax), a test op",
    roles={"q": ("f32",), "k": ("f32",), "v": ("f32",), "out": ("f32",)},
    required=("q", "out", "k", "v"), kv_roles=("k", "v"), params=(),
    case=kv_case, golden=_toy_golden,
    models={"f32": lambda trace, case, **cfg: _linear(case.q, case.k, case.v, case.scale, np.float32).astype(np.float64),
            "f64": lambda trace, case, **cfg: _toy_golden(case)},
    acc_unit=lambda trace: V.U32, live=_toy_live, target="toy-live", file_tag="toy",
    absent_why={"mask": "no mask"})


@pytest.fixture
def toy():
    ops.register(TOY)
    yield TOY
    ops.unregister(TOY.name)
    assert TOY.name not in ops.OPS


def _operands(seed=0, B=1, n_q=3, H=4, Hkv=2, n_kv=7, D=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n_q, H, D)).astype(np.float32)
    k = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    return q, k, v


def test_toy_op_trace_round_trip_verify_and_replay(toy, tmp_path):
    q, k, v = _operands()
    scale = 0.25
    out = _linear(q, k, v, scale, np.float32)
    assert toy.name in T.OPS
    p = T.save(tmp_path / "toy.gguf", op=toy.name, producer="toy", scale=scale, q=q, k=k, v=v, out=out)
    t = T.load(p)
    assert t.op == toy.name and t.n_kv == 7 and np.array_equal(np.asarray(t.k), k)
    verdict = V.verify_trace(t, "f32")
    assert verdict.status == "pass", verdict.line()
    assert verdict.budget.model == ops.PRECISIONS["f32"].model_name
    bad = out.copy()
    bad[0, 1, 2] *= -1
    t_bad = T.load(T.save(tmp_path / "bad.gguf", trace=t, out=bad))
    assert V.verify_trace(t_bad, "f32", diagnose=False).status == "fail"
    with pytest.raises(ValueError, match=r"^precision: op 'toy_linear_attn' has no 'ggml-cpu' model"):
        V.verify_trace(t, "ggml-cpu")
    md, ts = ggml_replay.read_trace(p)
    assert np.array_equal(ggml_replay.replay(md, ts), out)
    assert ops.by_target("toy-live") is toy


def test_toy_op_role_checks_come_from_the_entry(toy, tmp_path):
    q, k, v = _operands(1)
    out = _linear(q, k, v, 0.5, np.float32)
    mask = np.zeros((1, 1, q.shape[1], k.shape[1]), np.float32)
    p = T.save(tmp_path / "m.gguf", op=toy.name, scale=0.5, q=q, k=k, v=v, out=out, mask=mask)
    with pytest.raises(T.TraceError, match=r"tensor 'mask': expected absent for op 'toy_linear_attn' \(no mask\)"):
        T.load(p)


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
