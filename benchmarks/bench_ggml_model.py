"""Compare jaxkv's ``ggml-cpu`` precision model against live ggml (jaxkv.oracles.ggml), per format and path.

    python benchmarks/bench_ggml_model.py [--seeds N] [--json OUT.json] [--traces-only]

Part 1 (always): the live oracle against the shared ggml traces (written by ggml 0.21, AVX-512): NMSE and the
fraction of bitwise-equal outputs, per trace.
Part 2 (unless ``--traces-only``): generated cases per K/V format and code path, the model run
with ``isa`` = the loaded library's ISA (``library_info()['isa']``), against live ggml on the same inputs:
NMSE and fraction of bitwise-equal outputs (a bit-faithful model gives 0 and 1.0).

Paths: ``fused-decode`` (per-row loop, n_q = 1), ``fused-prefill`` (per-row loop, n_q = 4, causal mask),
``split-kv`` (F16/F32 K = V, n_q = 1, n_kv >= 512, 4 threads), ``unfused`` (mul_mat + soft_max_ext),
``mixed`` (block-format cold + F16 hot, through F32, concatenated, converted to F16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jaxkv  # noqa: E402,F401  (x64)
from jaxkv import budget, formats, ggml_cpu  # noqa: E402
from jaxkv.oracles import ggml as og  # noqa: E402
from jaxkv.oracles.ggml_replay import read_trace, replay  # noqa: E402

SHARED = REPO.parent / "shared"
FORMATS = tuple(formats.ggml_name(n) for n in formats.KV_TYPES)  # ggml spelling: the oracle's


def bitwise(x, ref) -> float:
    return float(np.mean(np.asarray(x, np.float32).view(np.int32) == np.asarray(ref, np.float32).view(np.int32)))


# --- part 1: traces ----------------------------------------------------------------------------------------


def part_traces():
    rows = []
    for path in sorted((SHARED / "traces" / "ggml").glob("*.gguf")):
        md, ts = read_trace(path)
        out = replay(md, ts)
        ref = ts["out"][1]
        kt = ts.get("k", ts.get("k_cold"))[0]
        vt = ts.get("v", ts.get("v_cold"))[0]
        rows.append(dict(trace=path.stem, op=md["trace.op"], k=kt, v=vt, nmse=budget.nmse(out, ref),
                         bitwise=bitwise(out, ref)))
    return rows


# --- part 2: model vs live ggml ----------------------------------------------------------------------------


def gen(seed, B, n_q, H, Hkv, n_kv, D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n_q, H, D)).astype(np.float32)
    k = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, n_kv, Hkv, D)).astype(np.float32)
    return q, k, v


def causal(n_q, n_kv):
    m = np.zeros((1, 1, n_q, n_kv), np.float32)
    for i in range(n_q):
        m[0, 0, i, n_kv - n_q + i + 1 :] = -np.inf
    return m


def model_kv(x, fmt):
    """Model-side operand: float16 for F16, float32 for F32, formats.QuantArray of ggml's own bytes otherwise."""
    if fmt == "F16":
        return x.astype(np.float16)
    if fmt == "F32":
        return x
    return formats.QuantArray(raw=og.quantize_chunk(x, fmt), fmt=fmt.lower(), n=x.shape[-1])


def part_model(seeds: int, isa: str, contract):
    rows = []

    def record(fmt, path, live, model, t0):
        rows.append(dict(format=fmt, path=path, seed=seed, nmse=budget.nmse(model, live), bitwise=bitwise(model, live),
                         seconds=round(time.time() - t0, 2)))

    for fmt in FORMATS:
        for seed in range(seeds):
            specs = [("fused-decode", 1, 300, 2, None), ("fused-prefill", 4, 96, 2, "causal")]
            if not formats.get_format(fmt).quantized:
                specs.append(("split-kv", 1, 1024, 4, None))
            for path, n_q, n_kv, nt, mk in specs:
                q, k, v = gen(seed, 1, n_q, 8, 2, n_kv, 64)
                mask = causal(n_q, n_kv) if mk else None
                kw = dict(scale=0.125, mask=mask, n_threads=nt)
                live = og.flash_attn_ext(q, k, v, k_format=fmt, v_format=fmt, **kw)
                t0 = time.time()
                try:
                    model = np.asarray(ggml_cpu.flash_attn_ext(q, model_kv(k, fmt), model_kv(v, fmt), softcap=0.0,
                                                               max_bias=0.0, sinks=None, isa=isa, contract=contract,
                                                               **kw))
                except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                    rows.append(dict(format=fmt, path=path, seed=seed, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                record(fmt, path, live, model, t0)
            # unfused: K in fmt, V F16
            q, k, v = gen(seed, 1, 3, 8, 2, 128, 64)
            mask = causal(3, 128)
            live = og.soft_max_attn(q, k, v.astype(np.float16), k_format=fmt, scale=0.125, mask=mask, n_threads=2)
            t0 = time.time()
            try:
                model = np.asarray(ggml_cpu.soft_max_attn(q, model_kv(k, fmt), v.astype(np.float16), scale=0.125,
                                                          mask=mask, max_bias=0.0, n_threads=2, isa=isa,
                                                          contract=contract))
                record(fmt, "unfused", live, model, t0)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(format=fmt, path="unfused", seed=seed, error=f"{type(e).__name__}: {e}"[:200]))
            # mixed: cold fmt + hot F16, through F32 -> F16
            if formats.get_format(fmt).quantized:
                q, k, v = gen(seed, 1, 1, 8, 2, 320, 64)
                kc, vc = og.quantize_chunk(k[:, :256], fmt), og.quantize_chunk(v[:, :256], fmt)
                kh, vh = k[:, 256:].astype(np.float16), v[:, 256:].astype(np.float16)
                live = og.mixed_flash_attn(q, kc, vc, kh, vh, cold_format=fmt, scale=0.125, n_threads=2)
                t0 = time.time()
                try:
                    model = np.asarray(ggml_cpu.mixed_flash_attn(
                        q, model_kv(k[:, :256], fmt), model_kv(v[:, :256], fmt), kh, vh, kv_order="cold,hot",
                        scale=0.125, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=2, isa=isa,
                        contract=contract))
                    record(fmt, "mixed", live, model, t0)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(format=fmt, path="mixed", seed=seed, error=f"{type(e).__name__}: {e}"[:200]))
    return rows


def _contract(isa: str, overrides):
    """The model's compiler-contraction flags for ``isa``'s build (ggml_cpu.BUILD_CONTRACT), with FLAG=0|1
    overrides applied."""
    base = ggml_cpu.BUILD_CONTRACT[isa]
    vals = {}
    for o in overrides:
        key, _, val = o.partition("=")
        if not hasattr(base, key) or val not in ("0", "1"):
            raise SystemExit(f"--contract: expected FLAG=0|1 with FLAG in {list(vars(base))}, got {o!r}")
        vals[key] = val == "1"
    return dataclasses.replace(base, **vals)


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            cells.append(f"{x:.3e}" if c == "nmse" and isinstance(x, float) else
                         f"{x:.3f}" if isinstance(x, float) else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--traces-only", action="store_true")
    ap.add_argument("--contract", action="append", default=[], metavar="FLAG=0|1",
                    help="override one of the model's compiler-contraction flags (ggml_cpu.Contract; default: "
                         "ggml_cpu.BUILD_CONTRACT of the loaded library's isa), e.g. sum_update=1")
    a = ap.parse_args(argv)
    info = og.library_info()
    print(f"live ggml {info['version']} ({info['commit']}), isa {info['isa']}, wheel {info['wheel']}")
    result = {"library": info, "traces": part_traces()}
    print("\n## live ggml vs shared traces (ggml 0.21, AVX-512)\n")
    print(table(result["traces"], ["trace", "op", "k", "v", "nmse", "bitwise"]))
    if not a.traces_only:
        contract = _contract(info["isa"], a.contract)
        result["model"] = part_model(a.seeds, info["isa"], contract)
        result["contract"] = repr(contract)
        print(f"\n## jaxkv.ggml_cpu (isa={info['isa']}, {contract}) vs live ggml, {a.seeds} seeds per cell\n")
        print(table(result["model"], ["format", "path", "seed", "nmse", "bitwise", "seconds", "error"]))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
