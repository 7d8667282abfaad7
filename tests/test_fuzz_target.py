"""The typed fuzz target (fuzz.target.Target): a user's MODULE:FUNCTION function is wrapped once at the
edge (its declared attributes read there, nothing probed later) and ``--target`` specs load as Targets.
(An op registered in a test alone gets a fuzz target: tests/test_toy_op.py.)"""


import pytest

from fuzz import properties as P
from fuzz import targets
from fuzz.target import Target, as_target
from fuzz.target_spec import GGML_TARGETS, load_target
from jaxkv import ops


def test_as_target_reads_declared_attributes_once():
    def kern(q, k, v, **kw):
        return targets.numpy_attention(q, k, v, **kw)

    kern.unsupported = ["softcap", "sinks"]
    kern.op = "soft_max_attn"
    t = as_target(kern, "mod:kern")
    assert isinstance(t, Target) and t.name == "mod:kern" and t.fn is kern
    assert t.unsupported == ("softcap", "sinks") and t.op is ops.get("soft_max_attn")
    assert not t.sharp and t.model is None and t.case_strategy is None
    kern.unsupported = []  # read once, at the edge: the Target keeps what was declared then
    assert t.unsupported == ("softcap", "sinks")
    assert as_target(t) is t and as_target(None) is None
    kern.op = "no_such_op"
    with pytest.raises(ValueError, match="^op"):
        as_target(kern)


def test_load_target_and_context_give_targets():
    t = load_target("fuzz.targets:flash_decode")
    assert isinstance(t, Target) and t.name == "fuzz.targets:flash_decode" and t.fn is targets.flash_decode
    ctx = P.Context(target=targets.numpy_attention)
    assert isinstance(ctx.target, Target) and ctx.target.fn is targets.numpy_attention
    assert GGML_TARGETS == tuple(o.target for o in ops.OPS.values() if o.target)
    with pytest.raises(ValueError, match="^--menu"):
        load_target("fuzz.targets:flash_decode", None, "ci")
    with pytest.raises(ValueError, match="^--threads"):
        load_target("fuzz.targets:flash_decode", 2)
