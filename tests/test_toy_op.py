"""An op is one registry entry (issue #15): a toy op defined in this file alone -- sigmoid attention,
out[b, i, h] = sum_j sigmoid(scale q_i . k_j + mask_ij) v_j -- gets trace save/load, ``verify`` (library
and CLI), live-style replay through ``op.live``, a fuzz target judged by its own golden and f32 model,
and ``replay`` of the failure the campaign saves, without any library change.

The kernels below are module-level ``--target`` functions (``tests.test_toy_op:sigmoid_kernel``,
``tests.test_toy_op:buggy_sigmoid``): they declare ``op`` and ``declared_precision`` as any user's
``MODULE:FUNCTION`` target would. The op is registered when this file is imported as a target module
(``tests.test_toy_op``: ``python -m fuzz``, ``jaxkv replay``, a subprocess); under pytest's own import
the ``toy`` fixture registers it for the tests that use it and unregisters it after, so no other test
module sees it.

Layout (canonical): q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv],
mask [B|1, H|1, n_q, n_kv], out [B, n_q, H, Dv]; query head h reads KV head h // (H / Hkv).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from fuzz import campaign as Cm
from fuzz import properties as P
from jaxkv import cli, ops
from jaxkv import trace as T
from jaxkv import verify as V
from jaxkv.oracles import ggml_replay
from jaxkv.ops.operands import kv_case

NAME = "toy_sigmoid_attn"
MOD = "tests.test_toy_op"


def _sigmoid_attn(q, k, v, scale, mask, dtype):
    """sum_j sigmoid(scale q.k_j + mask_j) v_j in ``dtype`` (np.float64: the golden; np.float32: the
    f32 model). A key masked with -inf contributes exactly 0."""
    g = q.shape[2] // k.shape[2]
    kk = np.repeat(np.asarray(k, dtype), g, axis=2)
    vv = np.repeat(np.asarray(v, dtype), g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", np.asarray(q, dtype), kk) * dtype(scale)
    if mask is not None:
        s = s + np.asarray(mask, dtype)
    with np.errstate(over="ignore"):
        p = dtype(1) / (dtype(1) + np.exp(-s))
    return np.einsum("bhij,bjhd->bihd", p, vv)


def _golden(case):
    return _sigmoid_attn(case.q, case.k, case.v, case.scale, case.mask, np.float64)


def _f32(case):
    return _sigmoid_attn(case.q, case.k, case.v, case.scale, case.mask, np.float32).astype(np.float64)


def _live(ts, params):
    """The op "run live" on a trace's stored tensors (float32 numpy stands in for a backend)."""
    return _sigmoid_attn(ts["q"][1], ts["k"][1], ts["v"][1], params["scale"], params["mask"], np.float32)


TOY = ops.Op(
    name=NAME, doc="sigmoid attention (no softmax), a test op",
    roles={"q": ("f32",), "k": ("f32", "f16"), "v": ("f32", "f16"), "mask": ("f16", "f32"), "out": ("f32",)},
    required=("q", "out", "k", "v"), kv_roles=("k", "v"), params=(),
    case=kv_case, golden=_golden,
    models={"f32": lambda trace, case, **cfg: _f32(case)},
    dense_models={"f32": lambda trace: _f32},
    acc_unit=lambda trace: V.U32, live=_live, target="toy-sigmoid-live", file_tag="toysig",
    absent_why={"sinks": "sigmoid attention has no sinks"})

if __name__.startswith("tests."):  # imported as a --target module (module docstring)
    ops.register(TOY, replace=True)


# ----------------------------------------------------------------------------------------------------
# the kernels (fuzz targets)


def sigmoid_kernel(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """An honest float32 kernel: accumulates key by key (another order than the f32 model's einsum)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2).astype(np.float32), np.repeat(v, g, axis=2).astype(np.float32)
    out = np.zeros(q.shape[:3] + (v.shape[-1],), np.float32)
    for j in range(k.shape[1]):
        s = np.einsum("bihd,bhd->bih", q.astype(np.float32), kk[:, j]) * np.float32(scale)
        if mask is not None:
            s = s + np.transpose(mask[..., j], (0, 2, 1)).astype(np.float32)
        with np.errstate(over="ignore"):
            p = np.float32(1) / (np.float32(1) + np.exp(-s))
        out += p[..., None] * vv[:, j][:, None]
    return out


def buggy_sigmoid(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """A buggy kernel: drops the last key."""
    m = None if mask is None else mask[..., :-1]
    return _sigmoid_attn(q, k[:, :-1], v[:, :-1], scale, m, np.float32)


def maskless_sigmoid(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """A buggy kernel: ignores the mask (right on unmasked cases only)."""
    return _sigmoid_attn(q, k, v, scale, None, np.float32)


def f16_sigmoid(q, k, v, **kw):
    """Declares a precision the op has no model for."""
    return sigmoid_kernel(q, k, v, **kw)


for _f in (sigmoid_kernel, buggy_sigmoid, maskless_sigmoid):
    _f.op, _f.declared_precision = NAME, "f32"
f16_sigmoid.op, f16_sigmoid.declared_precision = NAME, "f16"


@pytest.fixture
def toy():
    ops.register(TOY, replace=True)
    yield ops.get(NAME)
    ops.unregister(NAME)
    assert NAME not in ops.OPS


def _operands(seed=0, B=1, n_q=3, H=4, Hkv=2, n_kv=7, D=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n_q, H, D)).astype(np.float32)
    k = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    mask = np.zeros((B, 1, n_q, n_kv), np.float32)
    mask[..., 0, 5:] = -np.inf  # query 0 sees keys 0..4
    return q, k, v, mask


# ----------------------------------------------------------------------------------------------------
# (a) trace save/load, verify (library and CLI); (d) replay through op.live


def test_toy_op_trace_round_trip_verify_and_replay(toy, tmp_path):
    q, k, v, mask = _operands()
    scale = 0.25
    out = sigmoid_kernel(q, k, v, scale=scale, mask=mask)
    assert toy.name in T.OPS
    p = T.save(tmp_path / "toy.gguf", op=toy.name, producer="toy", scale=scale, q=q, k=k, v=v, mask=mask, out=out)
    t = T.load(p)
    assert t.op == toy.name and t.n_kv == 7 and np.array_equal(np.asarray(t.k), k)
    verdict = V.verify_trace(t, "f32")
    assert verdict.status == "pass", verdict.line()
    assert verdict.budget.model == ops.PRECISIONS["f32"].model_name
    bad = out.copy()
    bad[0, 1, 2] *= -1
    t_bad = T.load(T.save(tmp_path / "bad.gguf", trace=t, out=bad))
    assert V.verify_trace(t_bad, "f32", diagnose=False).status == "fail"
    with pytest.raises(ValueError, match=rf"^precision: op '{NAME}' has no 'ggml-cpu' model"):
        V.verify_trace(t, "ggml-cpu")
    md, ts = ggml_replay.read_trace(p)
    assert np.array_equal(ggml_replay.replay(md, ts), out)
    assert ops.by_target("toy-sigmoid-live") is toy


def _cli_verify(capsys, path, precision):
    capsys.readouterr()
    rc = cli.main(["verify", str(path), "--precision", precision, "--json"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    return rc, json.loads(lines[-1])


def test_toy_op_verify_cli(toy, tmp_path, capsys):
    """``jaxkv verify --precision f32 --json``: the honest kernel passes (exit 0), a kernel that drops the
    last key fails (exit 1); ``--precision ggml-cpu``, a model the op does not have: exit 2, one line."""
    q, k, v, mask = _operands(3, B=2, n_kv=9)
    mask[..., 8] = 0.0  # the last key is live for every query
    kw = dict(scale=0.3, mask=mask)
    good = T.save(tmp_path / "good.gguf", op=NAME, scale=0.3, q=q, k=k, v=v, mask=mask, out=sigmoid_kernel(q, k, v, **kw))
    bad = T.save(tmp_path / "bad.gguf", op=NAME, scale=0.3, q=q, k=k, v=v, mask=mask, out=buggy_sigmoid(q, k, v, **kw))
    rc, j = _cli_verify(capsys, good, "f32")
    assert (rc, j["status"], j["model"]) == (0, "pass", "f32 reference"), j
    rc, j = _cli_verify(capsys, bad, "f32")
    assert (rc, j["status"]) == (1, "fail"), j
    assert j["nmse"] > j["budget"]["nmse"]
    rc, j = _cli_verify(capsys, good, "ggml-cpu")
    assert rc == 2 and j["status"] == "error", j
    assert "\n" not in j["error"] and f"op '{NAME}' has no 'ggml-cpu' model" in j["error"], j


def test_toy_op_role_checks_come_from_the_entry(toy, tmp_path):
    q, k, v, mask = _operands(1)
    out = sigmoid_kernel(q, k, v, scale=0.5, mask=mask)
    p = T.save(tmp_path / "s.gguf", op=toy.name, scale=0.5, q=q, k=k, v=v, out=out, mask=mask,
               sinks=np.zeros(q.shape[2], np.float32))
    with pytest.raises(T.TraceError, match=rf"tensor 'sinks': expected absent for op '{NAME}' \(sigmoid attention has no sinks\)"):
        T.load(p)
    # the types a role may hold are the entry's too: K as Q8_0 is refused for this op (F32/F16 only),
    # though flash_attn_ext's K takes it
    q, k, v, mask = _operands(2, D=32)  # a block type needs rows of 32
    out = sigmoid_kernel(q, k, v, scale=0.5, mask=mask)
    p = T.save(tmp_path / "q8.gguf", op=toy.name, scale=0.5, q=q, k=k, v=v, out=out, mask=mask,
               formats={"k": "q8_0"})
    with pytest.raises(T.TraceError, match=r"tensor 'k' type: expected f32 or f16, found q8_0"):
        T.load(p)


# ----------------------------------------------------------------------------------------------------
# (b) a fuzz target judged by the op's own golden and model; (c) replay of the saved failure


def test_a_toy_op_gets_a_fuzz_target_without_library_code(toy):
    """The ``target`` property draws cases without the operands the op does not take (softcap, sinks,
    ALiBi) and judges them by its golden and f32 model (one check: the budget)."""
    ctx = P.Context(seed=0, target=sigmoid_kernel, target_spec=f"{MOD}:sigmoid_kernel")
    assert ctx.target.op is toy and ctx.target.declared_precision == "f32" and not ctx.target.sharp
    prop = P.get("target")
    cs = Cm.generate(prop, ctx, 0, 0, 4)
    assert all(c["softcap"] == 0.0 and c["max_bias"] == 0.0 and not c["sinks"] for c in cs), cs
    outs = prop.evaluate(cs, ctx)
    assert len(outs) == 4 and all(o["ok"] and o["checks"] == 1 for o in outs), outs
    assert all(o["metrics"]["target"]["model"] == "f32 reference" for o in outs), outs
    a = P.target_call(cs[0], ctx)
    assert np.asarray(a["q"]).ndim == 4


def _campaign(tmp_path, kernel, n):
    out = tmp_path / kernel
    rc = cli.main(["fuzz", "--target", f"{MOD}:{kernel}", "--properties", "target", "--max-examples", str(n),
                   "--seed", "3", "--out", str(out), "--quiet"])
    return rc, out, [r for r in Cm.read_records(out / "results.jsonl") if r.get("type") == "case"]


def test_toy_op_campaign_finds_shrinks_saves_and_replays(toy, tmp_path, capsys):
    rc, _, cases = _campaign(tmp_path, "sigmoid_kernel", 24)
    assert rc == 0 and len(cases) == 24 and all(c["ok"] for c in cases), [c["error"] for c in cases if not c["ok"]]
    rc, out, cases = _campaign(tmp_path, "buggy_sigmoid", 24)
    assert rc == 1 and any(not c["ok"] for c in cases)
    (rec_path,) = sorted((out / "failures").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["property"] == "target" and rec["target"] == f"{MOD}:buggy_sigmoid"
    assert f"target (f32 model of {NAME})" in rec["error"]
    first = rec["original"]
    assert rec["params"]["n_kv"] <= first["n_kv"] and rec["params"]["B"] <= first["B"]
    assert rec["arrays"] and rec["arrays"].endswith(".gguf"), rec
    saved = T.load(rec["arrays"])
    assert saved.op == NAME
    assert V.verify_trace(saved, "f32", diagnose=False).status == "fail"
    capsys.readouterr()
    assert cli.main(["replay", str(rec_path), "--target", f"{MOD}:buggy_sigmoid"]) == 1
    assert capsys.readouterr().out.startswith("FAIL target")
    assert cli.main(["replay", str(rec_path), "--target", f"{MOD}:sigmoid_kernel"]) == 0
    assert capsys.readouterr().out.startswith("PASS target")


def test_a_bug_on_some_cases_only_is_shrunk(toy, tmp_path):
    """A kernel that ignores the mask passes the unmasked cases: the first failing case is a masked one,
    shrunk by hypothesis to a smaller masked case that still fails."""
    rc, out, cases = _campaign(tmp_path, "maskless_sigmoid", 24)
    assert rc == 1 and any(c["ok"] for c in cases) and any(not c["ok"] for c in cases)
    assert all(c["params"]["mask"] != "none" for c in cases if not c["ok"])
    (rec_path,) = sorted((out / "failures").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["shrunk"] and rec["params"]["mask"] != "none", rec
    size = lambda c: (c["B"] * c["n_q"] * c["heads"][0] * c["n_kv"], c["Dk"] + c["Dv"])  # noqa: E731
    assert size(rec["params"]) <= size(rec["original"]), (rec["params"], rec["original"])
    assert cli.main(["replay", str(rec_path), "--target", f"{MOD}:maskless_sigmoid"]) == 1
    assert cli.main(["replay", str(rec_path), "--target", f"{MOD}:sigmoid_kernel"]) == 0


def test_a_precision_the_op_has_no_model_for_is_one_line(toy, tmp_path, capsys):
    rc = cli.main(["fuzz", "--target", f"{MOD}:f16_sigmoid", "--properties", "target", "--max-examples", "2",
                   "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"--target: {MOD}:f16_sigmoid: op '{NAME}' has no 'f16' model" in err[0], err

