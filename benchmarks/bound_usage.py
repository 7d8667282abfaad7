"""How much of the fuzz error bound (fuzz/bounds.py) honest kernels use, and how far bugs exceed it.

    python -m benchmarks.bound_usage [--cases 100] [--seed 0]

Draws ``--cases`` attention cases from the default strategy (fuzz.strategies.attention_case, every
distribution, mask and option), and prints, per kernel, the largest and median ``usage`` (max |out - g|
/ bound over the output; <= 1 passes), the cases failing, the cases whose bound is vacuous (not below
the signal), and the median ``budget_nmse`` (the NMSE the bound implies) next to the median NMSE.
GQA heads (H = 6, Hkv = 2) so that the GQA bug is a bug; one compiled program.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from hypothesis import HealthCheck, given, seed as hseed, settings

from fuzz import bounds as Bd
from fuzz import cases as C
from fuzz import strategies as S
from fuzz import targets as T
from jaxkv import attention as A


def _kw(a):
    return dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"], sinks=a["sinks"])


KERNELS = {
    "attention f32 (two-pass)": ("two-pass", lambda q, k, v, **kw: A.attention(q, k, v, precision="f32", **kw)),
    "online_attention (streaming)": ("streaming",
                                     lambda q, k, v, **kw: A.online_attention(q, k, v, precision="f32", **kw)),
    "flash_decode chunk 24 (streaming)": ("streaming", lambda q, k, v, **kw: A.flash_decode(
        q, k, v, chunk=24, precision="f32", **kw)),
    "targets.mixed_cache (generic)": ("generic", T.mixed_cache),
    "BUG buggy_split_k_no_rescale (generic)": ("generic", T.buggy_split_k_no_rescale),
    "BUG buggy_scale_twice (generic)": ("generic", T.buggy_scale_twice),
    "BUG buggy_gqa_modulo (generic)": ("generic", T.buggy_gqa_modulo),
}


@jax.jit
def _stats(a):
    g = A.attention(a["q"], a["k"], a["v"], precision="f64", **_kw(a))
    t = Bd.terms(a, g)
    b = {s.name: Bd.bound(t, s) for s in (Bd.TWO_PASS, Bd.STREAMING, Bd.GENERIC)}
    return {n: Bd.bound_stats(fn(a["q"], a["k"], a["v"], **_kw(a)), g, b[s], a["valid"])
            for n, (s, fn) in KERNELS.items()}


def _table(title, rows):
    print(f"\n{title}\n")
    print("| kernel | cases | failing | vacuous | max usage | median usage | median nmse | median bound nmse |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in KERNELS:
        ms = [r[name] for r in rows]
        u = [m["usage"] for m in ms]
        print(f"| {name} | {len(ms)} | {sum(m['outside'] > 0 for m in ms)} | {sum(m['vacuous'] for m in ms)} | "
              f"{max(u):.3g} | {np.median(u):.3g} | {np.median([m['nmse'] for m in ms]):.3g} | "
              f"{np.median([m['budget_nmse'] for m in ms]):.3g} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bound_usage", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []

    @settings(max_examples=args.cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @hseed(args.seed)
    @given(S.attention_case(heads=((6, 2),)))
    def collect(c):
        r = jax.device_get(_stats(C.pad_attention(c)))
        rows.append({n: Bd.verdict(v)[1] for n, v in r.items()})

    collect()
    _table(f"{len(rows)} default-strategy cases (GQA H = 6, Hkv = 2, n_kv <= 64), hypothesis seed {args.seed}", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
