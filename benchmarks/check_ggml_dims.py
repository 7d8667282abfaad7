"""Bit-exactness of the ``ggml-cpu`` model against the loaded live ggml, per head size.

    python benchmarks/check_ggml_dims.py [--dims 1-139] [--kv f32|f16] [--n-kv 2,7] [--n-q 1,3] [--heads 4]
                                         [--mul-mat]

For every head size D in ``--dims`` (Dk = Dv = D): ``flash_attn_ext`` with F32 (or F16) K and V (per-row
loop), one thread, no mask, random inputs; the model runs with the loaded library's ISA
(``library_info()['isa']``). ``--mul-mat``: also raw F32 ``mul_mat`` (8 rows x 1 column, ``ggml_vec_dot_f32``
unless the build hands it to llamafile's sgemm). Prints one line per D with the outputs that differ, and
a summary; exit 1 when any output differs. Point ``JAXKV_GGML_LIB_DIR`` at another build's libraries to
check that build.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jaxkv  # noqa: E402,F401  (x64)
from jaxkv import ggml_cpu  # noqa: E402
from jaxkv.ggml_cpu import dot as D  # noqa: E402
from jaxkv.oracles import ggml as og  # noqa: E402


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="1-139")
    ap.add_argument("--kv", choices=("f32", "f16"), default="f32")
    ap.add_argument("--n-kv", default="2,7")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-q", default="1,3")
    ap.add_argument("--mul-mat", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not og.available():
        print("live ggml unavailable", file=sys.stderr)
        return 2
    info = og.library_info()
    isa = info["isa"]
    print(f"ggml {info['version']} ({info['commit']}) {isa} from {info['lib_dir']}; K/V {a.kv}")
    rng = np.random.default_rng(a.seed)
    dt = np.float32 if a.kv == "f32" else np.float16
    bad_fa = bad_mm = total_fa = total_mm = 0
    for d in _ints(a.dims):
        line = []
        for n_kv in _ints(a.n_kv):
            for n_q in _ints(a.n_q):
                q = rng.standard_normal((1, n_q, a.heads, d)).astype(np.float32)
                k = rng.standard_normal((1, n_kv, a.heads, d)).astype(dt)
                v = rng.standard_normal((1, n_kv, a.heads, d)).astype(dt)
                scale = float(np.float32(1 / np.sqrt(d)))
                fmt = a.kv.upper()
                live = og.flash_attn_ext(q, k, v, k_format=fmt, v_format=fmt, scale=scale)
                emu = np.asarray(ggml_cpu.flash_attn_ext(q, k, v, scale=scale, isa=isa))
                nd = int((live.view(np.uint32) != emu.view(np.uint32)).sum())
                bad_fa += nd
                total_fa += live.size
                line.append(f"fa n_kv={n_kv} n_q={n_q}: {nd}/{live.size}")
        if a.mul_mat:
            x = rng.standard_normal((8, d)).astype(np.float32)
            y = rng.standard_normal((1, d)).astype(np.float32)
            live = og.mul_mat(x, y)[0]
            emu = np.asarray(D.dot_f32(x.astype(np.float64), y.astype(np.float64), isa)).astype(np.float32)
            nd = int((live.view(np.uint32) != emu.view(np.uint32)).sum())
            bad_mm += nd
            total_mm += live.size
            line.append(f"mul_mat: {nd}/8")
        print(f"D={d}: " + "; ".join(line), flush=True)
    print(f"flash_attn_ext: {bad_fa} of {total_fa} outputs differ")
    if a.mul_mat:
        print(f"mul_mat: {bad_mm} of {total_mm} outputs differ")
    return 1 if bad_fa or bad_mm else 0


if __name__ == "__main__":
    sys.exit(main())
