"""jaxkv.testing.assert_attention_close: the verify verdict as a pytest assertion."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxkv import attention as A
from jaxkv import ggml_cpu
from jaxkv.testing import assert_attention_close

B, NQ, H, HKV, NKV, D = 1, 3, 4, 2, 40, 32


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NQ, H, D)).astype(np.float32)
    k = rng.standard_normal((B, NKV, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, NKV, HKV, D)).astype(np.float32)
    return q, k, v


def _ref(q, k, v):
    return np.asarray(A.attention(q, k, v, scale=D ** -0.5, precision="f32"))


def test_passes_on_correct_output_f32_and_ggml_cpu():
    q, k, v = _inputs()
    v_ok = assert_attention_close(_ref(q, k, v), q, k, v)
    assert v_ok.status == "pass" and v_ok.precision == "f32"
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    mask = np.zeros((1, 1, NQ, NKV), np.float32)
    mask[..., :5] = -np.inf
    emu = np.asarray(ggml_cpu.flash_attn_ext(q, k16, v16, scale=D ** -0.5, mask=mask))
    v_emu = assert_attention_close(emu, q, k16, v16, mask=mask, precision="ggml-cpu")
    assert v_emu.status == "pass" and v_emu.emu.units == 0.0
    # the same output claimed as f32 fails: F16 K/V products in an F16 accumulator are far off an f32 claim
    with pytest.raises(AssertionError, match="FAIL under precision f32"):
        assert_attention_close(emu, q, k16, v16, mask=mask, precision="f32", diagnose=False)


def _message(bad, q, k, v, **kw) -> str:
    with pytest.raises(AssertionError) as ei:
        assert_attention_close(bad, q, k, v, **kw)
    return str(ei.value)


def test_permuted_output_fails_with_a_torch_style_message_and_diagnosis():
    q, k, v = _inputs()
    out = _ref(q, k, v)
    # written [B, H, n_q, Dv] in memory, read as [B, n_q, H, Dv]
    perm = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(out.shape)
    msg = _message(perm, q, k, v)
    lines = msg.splitlines()
    assert lines[0] == "Attention output is not close (FAIL under precision f32, model f32 reference)!"
    m = re.match(r"Mismatched elements: (\d+) / (\d+) \((\d+\.\d)%\)", lines[1])
    assert m and int(m.group(2)) == out.size
    # the elements where the permutation moves a different value, by hand: heads/queries (0,0) ... differ
    moved = np.abs(perm.astype(np.float64) - out) > 0
    assert 0 < int(m.group(1)) <= int(moved.sum())
    assert re.match(r"Greatest absolute difference: [\d.e+-]+ at index \(0, \d, \d, \d+\) \(up to "
                    r"[\d.e+-]+ allowed\)", lines[2])
    assert lines[3].startswith("Greatest relative difference: ")
    assert lines[4].startswith("NMSE: ")
    assert "budget: nmse <=" in msg
    assert "out_permuted: out written as [Dv, n_q, H, B] instead of [Dv, H, n_q, B]" in msg


def test_dropped_token_output_fails_and_is_named():
    q, k, v = _inputs(1)
    dropped = _ref(q, k[:, 1:], v[:, 1:])
    msg = _message(dropped, q, k, v)
    assert "Mismatched elements:" in msg and "NMSE:" in msg
    assert "kv_token_dropped: first KV token dropped" in msg


def test_undecided_raises_unless_allowed():
    q, k, v = _inputs(2)
    q[0, 1, 3, 7] = np.nan
    out = _ref(q, k, v)
    assert np.isnan(out[0, 1, 3]).all() and not np.isnan(out[0, 0]).any()  # NaN propagates to its row
    msg = _message(out, q, k, v)
    assert msg.startswith("Attention output cannot be judged (UNDECIDED under precision f32")
    assert "q[0, 1, 3, 7] (b, query, head, dim) = nan" in msg
    v_und = assert_attention_close(out, q, k, v, allow_undecided=True)
    assert v_und.status == "undecided" and v_und.exit_code == 3


def test_zero_output_of_tiny_values_is_undecided_under_f16():
    """V of magnitude 1e-9 underflows in an F16 accumulator: the f16 model's own output is 0, so its
    budget (9x its error) would pass the all-zero output -> undecided, never a pass; an f32 claim on
    the same inputs still decides (and fails the zero output)."""
    q, k, v = _inputs(3)
    v = (v * 1e-9).astype(np.float32)
    zero = np.zeros((B, NQ, H, D), np.float32)
    msg = _message(zero, q, k, v, precision="f16")
    assert "UNDECIDED" in msg and "budget not below the signal" in msg
    with pytest.raises(AssertionError, match="FAIL under precision f32"):
        assert_attention_close(zero, q, k, v, precision="f32", diagnose=False)
    assert assert_attention_close(_ref(q, k, v), q, k, v, precision="f32").status == "pass"


def test_bad_precision_is_a_value_error():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="precision"):
        assert_attention_close(_ref(q, k, v), q, k, v, precision="auto")
