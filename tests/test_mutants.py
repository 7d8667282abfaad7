"""Diagnosis suite on independent mutants (tests/mutants.py): every bug class on every op, split-K bugs
at arbitrary chunkings, over the shared ggml traces' inputs and synthetic cases. The verdict (f64
claim) must fail every mutant, and the top finding of the diagnosis must be the injected bug for
>= 90 % of the mutants of each (op, class) cell. The CI profile runs a small draw; HYPOTHESIS_PROFILE=fuzz
(or ``python tests/test_mutants.py N``) a larger one."""

from __future__ import annotations

import collections
import os
import sys
import time

import numpy as np
import pytest

from jaxkv import verify as vf

import mutants as mt
from conftest import SHARED

CORRECT = 0.90  # the top finding must be the injected bug for >= 90 % of each cell
OPS = ("flash_attn_ext", "mixed_flash_attn", "soft_max_attn")
#: shared traces whose inputs serve as bases (every op; masks per head, ALiBi, softcap, sinks, GQA/MQA,
#: quantized K/V, the mixed cache with quantized cold regions)
SHARED_BASES = {
    "ci": ["fa_f16_alibi_perhead", "fa_f16_softcap", "fa_f16_sinks", "fa_kq8_0_vq4_0",
           "mixed_q4_0_decode", "mixed_q8_0_prefill", "mixed_q5_0_kq8_0",
           "sm_f16_alibi", "sm_f16_random", "sm_kq8_0_causal"],
    "fuzz": None,  # all of them
}
SYNTHETIC = {"ci": 3, "fuzz": 40}  # synthetic bases per op
DRAWS = {"ci": 1, "fuzz": 2}  # mutants per (base, class)


def _bases(profile, rng, n_synthetic=None):
    tr = pytest.importorskip("jaxkv.trace")
    names = SHARED_BASES[profile]
    paths = sorted((SHARED / "traces" / "ggml").glob("*.gguf"))
    if names is not None:
        paths = [SHARED / "traces" / "ggml" / f"{n}.gguf" for n in names]
    out = [(p.stem, vf.case_from_trace(tr.load(p))) for p in paths]
    for op in OPS:
        out.append((f"synthetic {op} all features", mt.synthetic(rng, op, large=False, full=True)))
        out += [(f"synthetic {op} {i}", mt.synthetic(rng, op, large=profile == "fuzz"))
                for i in range(SYNTHETIC[profile] if n_synthetic is None else n_synthetic)]
    return out


def run_suite(profile: str, seed: int = 0, n_synthetic=None):
    """Inject, verify, diagnose -> (table {(op, class): [n, detected, correct]}, misses);
    ``n_synthetic`` overrides the profile's synthetic bases per op."""
    rng = np.random.default_rng(seed)
    table = collections.defaultdict(lambda: [0, 0, 0])
    misses = []
    unobservable = collections.Counter()
    for where, case in _bases(profile, rng, n_synthetic):
        g = vf.golden_output(case)
        cache: dict = {}  # the hypotheses' outputs on this base, shared by its mutants
        for cls in mt.applicable(case):
            for _ in range(DRAWS[profile]):
                m = mt.inject(case, cls, rng)
                if m is None:
                    unobservable[(case.op, cls)] += 1
                    continue
                desc, want, exact = m
                got = want.astype(np.float32)
                v = vf.verify_case(case, got, g, "f64", golden=g, variant_outputs=cache)
                ok = mt.is_correct(case, cls, desc, exact, v.diagnosis, want)
                cell = table[(case.op, cls)]
                cell[0] += 1
                cell[1] += v.status == "fail"
                cell[2] += ok
                if not ok or v.status != "fail":
                    top = [(d["hypothesis"], d["label"]) for d in v.diagnosis[:2]]
                    misses.append(f"{where}: {desc}{' (exact cold)' if exact else ''} -> {v.status}, "
                                  f"top {top}")
    if unobservable:
        misses.append(f"(draws that cannot show on their case, not counted: {dict(unobservable)})")
    return table, misses


def format_table(table) -> str:
    lines = [f"{'op':18} {'class':24} {'n':>4} {'detected':>9} {'correct':>8}"]
    for (op, cls), (n, det, ok) in sorted(table.items()):
        lines.append(f"{op:18} {cls:24} {n:4d} {det / n:9.0%} {ok / n:8.0%}")
    n = sum(c[0] for c in table.values())
    ok = sum(c[2] for c in table.values())
    lines.append(f"{'all':18} {'':24} {n:4d} {'':9} {ok / n:8.1%}")
    return "\n".join(lines)


def _check(table, misses):
    print("\n" + format_table(table))
    for m in misses:
        print("   miss:", m)
    assert {op for op, _ in table} == set(OPS)
    bad = {k: c for k, c in table.items() if c[1] < c[0] or c[2] < CORRECT * c[0]}
    assert not bad, (bad, misses)


def test_mutants_every_op_and_class():
    profile = "fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "ci"
    table, misses = run_suite(profile)
    _check(table, misses)
    for op in OPS:  # every class the op has was drawn (the all-features base has them all)
        want = set(mt.CLASSES) - {"cold_unrounded", "regions_wrong"} if op != "mixed_flash_attn" \
            else set(mt.CLASSES)
        if op == "soft_max_attn":
            want -= {"softcap_wrong", "sinks_missing", "chunk_unrescaled"}
        got = {c for o, c in table if o == op}
        assert got == want, (op, want - got)


def test_mutant_kernel_without_bug_is_the_golden():
    """The mutants' own split-K kernel (any chunking, both readings of a mixed cache) equals
    jaxkv's float64 golden on the F16 reading: the suite's kernel is honest apart from the bug."""
    rng = np.random.default_rng(5)
    for op in OPS:
        case = mt.synthetic(rng, op)
        g = vf.golden_output(case)
        for chunks in mt._chunkings(case, rng)[:6] + [[(0, case.k.shape[1])]]:
            out = mt.kernel(mt.inputs_of(case, False), chunks)
            assert np.max(np.abs(out - g)) <= 1e-12 * np.max(np.abs(g))


if __name__ == "__main__":  # python tests/test_mutants.py [seed] [ci|fuzz] [synthetic bases per op]
    sys.path.insert(0, os.path.dirname(__file__))
    t0 = time.time()
    tab, miss = run_suite(sys.argv[2] if len(sys.argv) > 2 else "fuzz",
                          int(sys.argv[1]) if len(sys.argv) > 1 else 0,
                          int(sys.argv[3]) if len(sys.argv) > 3 else None)
    print(format_table(tab))
    for m_ in miss:
        print("   miss:", m_)
    print(f"{time.time() - t0:.1f} s")


def test_chunk_search_outputs_match_the_mutant_kernel():
    """jaxkv.verify.chunk_search's vectorised outputs (every candidate range at once) equal the independent
    split-K kernel run with that chunk merged without rescaling; its candidates hold every chunk of
    fixed-size chunkings 16..1024 (ragged last), per region, and ggml's thread split."""
    from jaxkv.verify import chunk_search as cs

    rng = np.random.default_rng(7)
    for op in ("flash_attn_ext", "mixed_flash_attn"):
        case = mt.synthetic(rng, op, large=False, full=True)
        n = case.k.shape[1]
        ranges = cs.candidate_ranges(case)
        have = {(r.start, r.stop) for r in ranges}
        for chunks in mt._chunkings(case, rng):
            assert {c for c in chunks if c != (0, n)} <= have
        pick = [ranges[i] for i in rng.choice(len(ranges), min(12, len(ranges)), replace=False)]
        for i0, outs in cs.unrescaled_outputs(case, pick):
            for j, out in enumerate(outs):
                r = pick[i0 + j]
                want = mt.chunk_output(case, False, r.start, r.stop)
                assert np.max(np.abs(out - want)) <= 1e-12 * np.max(np.abs(want)), (op, r)
