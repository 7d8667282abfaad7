"""Capture overhead and whole-run verify time on a real model (jaxkv.capture, python -m fuzz verify).

    python benchmarks/bench_capture.py [--model gemma3-270m] [--n-predict 8] [--threads 2] [--repeat 3]
                                       [--configs fa_f16,sm_f16,fa_q8_0,fa_q4_0] [--keep DIR]

For each config (flash attention on/off, K/V cache type) the same greedy run (the fixed ~80-token prompt
below, then ``--n-predict`` decode steps) is made ``--repeat`` times without the eval callback and
``--repeat`` times capturing every layer and step, alternating. Rows: prefill ms and decode ms per token
(median over the decode steps of the best repeat, i.e. ``llama_decode`` wall time, the callback's copies
included), the trace-writing time per token (files are written after each ``llama_decode`` returns),
the bytes written, and the wall time of ``python -m fuzz verify`` on the captured run (a fresh process:
imports, JAX compilation and the ggml-cpu emulation of every call) with its exit status. Needs the
``capture`` extra. ``OMP_WAIT_POLICY=passive`` is set (spin-waiting distorts every figure on a shared CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
          "faster than scribes. Within fifty years presses were operating in hundreds of European cities, and the "
          "price of books fell sharply. Scholars argue about how much this changed literacy, religion and "
          "science, but most agree that")
CONFIGS = {"fa_f16": (True, "F16", "F16"), "sm_f16": (False, "F16", "F16"),
           "fa_q8_0": (True, "Q8_0", "Q8_0"), "fa_q4_0": (True, "Q4_0", "Q4_0")}


def _one(cfg_name, capture_dir, a):
    from jaxkv.capture.runner import RunConfig, run

    fa, kt, vt = CONFIGS[cfg_name]
    t0 = time.perf_counter()
    res = run(RunConfig(model=a.model, prompt=PROMPT, n_predict=a.n_predict, flash_attn=fa, cache_type_k=kt,
                        cache_type_v=vt, threads=a.threads, out=capture_dir))
    wall = time.perf_counter() - t0
    return res, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--n-predict", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the captured runs under DIR")
    a = p.parse_args(argv)
    if importlib.util.find_spec("llama_cpp") is None:
        print("skipped: llama-cpp-python is not installed (pip install '.[capture]')")
        return 0
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            p.error(f"--configs: unknown {n!r}; known {', '.join(CONFIGS)}")
    base = pathlib.Path(a.keep) if a.keep else pathlib.Path(tempfile.mkdtemp(prefix="bench_capture_"))
    rows = []
    for name in names:
        plain, capt, writes = [], [], []
        nbytes, n_prompt, n_files, errors = 0, 0, 0, 0
        for _ in range(a.repeat):
            r0, _w0 = _one(name, None, a)
            plain.append(r0)
            d = base / name
            shutil.rmtree(d, ignore_errors=True)
            r1, w1 = _one(name, str(d), a)
            capt.append(r1)
            writes.append(w1 - sum(r1.step_ms) / 1e3)
            n_prompt, n_files, errors = r1.n_prompt, len(r1.files), len(r1.errors)
            nbytes = sum(pathlib.Path(f).stat().st_size for f in r1.files)
        def best(rs):
            return min(rs, key=lambda r: statistics.median(r.step_ms[1:]))
        bp, bc = best(plain), best(capt)
        tv = time.perf_counter()
        v = subprocess.run([sys.executable, "-m", "fuzz", "verify", str(base / name), "--timings"], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
        tv = time.perf_counter() - tv
        summary = next((l for l in v.stdout.splitlines() if " calls: " in l), "")
        timing = next((l for l in v.stdout.splitlines() if l.startswith("timings:")), "")
        rows.append(dict(name=name, n_prompt=n_prompt, files=n_files, errors=errors, mb=nbytes / 2**20,
                         pre0=bp.step_ms[0], pre1=bc.step_ms[0], dec0=statistics.median(bp.step_ms[1:]),
                         dec1=statistics.median(bc.step_ms[1:]),
                         write=min(writes) * 1e3 / (a.n_predict + 1), verify=tv, rc=v.returncode,
                         summary=summary, timing=timing))
    print(f"model {a.model}, {rows[0]['n_prompt'] if rows else '?'}-token prompt + {a.n_predict} decode steps, "
          f"threads {a.threads}, all layers captured; best of {a.repeat}\n")
    print("| config | prefill ms (no capture / capture) | decode ms/token (no capture / capture) | "
          "overhead/token | write ms/step | traces | MiB | verify s (exit) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['pre0']:.1f} / {r['pre1']:.1f} | {r['dec0']:.1f} / {r['dec1']:.1f} | "
              f"{r['dec1'] - r['dec0']:+.1f} ms | {r['write']:.1f} | {r['files']} ({r['errors']} not captured) | "
              f"{r['mb']:.1f} | {r['verify']:.1f} ({r['rc']}) |")
    print()
    for r in rows:
        print(f"{r['name']}: {r['summary'].strip()}; {r['timing'].strip()}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
