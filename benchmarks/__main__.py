"""Run every benchmark and write their figures into docs/benchmarks.md.

    python -m benchmarks [--only decode,mixed,...] [--quick] [--out docs/benchmarks.md] [--no-write]

Each benchmark script runs in its own process (a fresh JAX, nothing shared between them), with the
arguments listed in ``BENCHES`` (``--quick``: fewer repeats and smaller sizes, for a smoke run). Its
command, exit status, wall time and complete output go into the generated part of ``--out`` (between
the ``<!-- benchmarks:begin -->`` / ``<!-- benchmarks:end -->`` markers; the hand-written text around
them is kept; with ``--only`` the other benchmarks' subsections are kept as they were), under a header naming the machine, the software versions, the git commit and the load
average before and after. Exit status: 0 when every benchmark exited 0, else 1 (the document is
written either way, with the failure shown).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

# name -> (script, full arguments, --quick arguments)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "decode": ("bench_decode.py", ["--markdown"], ["--markdown", "--repeat", "3"]),
    "mixed": ("bench_mixed.py", ["--markdown", "--dequant"], ["--markdown", "--repeat", "3", "--n-kv", "8192"]),
    "ablate-decode": ("ablate_decode.py", [], ["--repeat", "3", "--n-kv", "8192"]),
    "formats": ("bench_formats.py", ["--repeat", "9"], ["--repeat", "3", "--mib", "16", "--formats", "q4_0,q8_0"]),
    "trace": ("bench_trace.py", [], ["--repeat", "3"]),
    "fuzz": ("bench_fuzz.py", [], ["--cases", "128", "--naive-cases", "4"]),
    "ggml-model": ("bench_ggml_model.py", ["--seeds", "2"], ["--seeds", "1"]),
    "capture": ("bench_capture.py", ["--repeat", "3"], ["--repeat", "1", "--configs", "fa_f16"]),
    "sensitivity": ("bench_sensitivity.py", [], ["--kv-len", "512", "--hot-window", "0,32", "--samples", "16",
                                                 "--repeat", "1"]),
}


def _machine() -> list[str]:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l.split()[1] for l in f if l.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    vers = subprocess.run([sys.executable, "-c", "import jax, jaxlib, numpy; print(jax.__version__, "
                           "jaxlib.__version__, numpy.__version__, jax.devices()[0].device_kind)"],
                          capture_output=True, text=True, cwd=ROOT).stdout.split()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    lines = [f"- machine: {cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"]
    if len(vers) >= 4:
        lines.append(f"- software: Python {platform.python_version()}, jax {vers[0]}, jaxlib {vers[1]}, "
                     f"numpy {vers[2]}; default device: {' '.join(vers[3:])}")
    lines.append(f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}")
    return lines


def run_one(name: str, quick: bool, timeout: int) -> tuple[str, int]:
    script, full, short = BENCHES[name]
    args = short if quick else full
    cmd = [sys.executable, os.path.join("benchmarks", script)] + args
    shown = " ".join(["python", "benchmarks/" + script] + args)
    print(f"[benchmarks] {shown}", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + (("\n" + p.stderr[-3000:]) if p.returncode else "")
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\n(timed out after {timeout} s)"
    wall = time.perf_counter() - t0
    print(out.rstrip(), flush=True)
    status = "ok" if rc == 0 else f"exit {rc}"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"### {name}", "", f"    {shown}", "",
          f"{status}, {when}, {wall:.0f} s wall, load average {load0:.2f} before / "
          f"{os.getloadavg()[0]:.2f} after.", "",
          "```text", out.rstrip(), "```", ""]
    return "\n".join(md), rc


def write(path: str, head: list[str], parts: dict[str, str]) -> None:
    """Rewrite the generated block of ``path``: the header, then one subsection per benchmark in
    ``BENCHES`` order; benchmarks not run this time keep their previous subsection (with its own date)."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    old: dict[str, str] = {}
    if BEGIN in text and END in text:
        block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
        for chunk in block.split("\n### ")[1:]:
            name = chunk.split("\n", 1)[0].strip()
            old[name] = "### " + chunk.rstrip() + "\n"
    merged = {**old, **parts}
    body = "\n".join(head + [merged[n] for n in BENCHES if n in merged])
    new = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ",".join(BENCHES))
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes (smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"benchmarks: --only: unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"## Latest run: `python -m benchmarks{' --quick' if a.quick else ''}"
            f"{' --only ' + a.only if a.only != ','.join(BENCHES) else ''}` ({now})", "",
            "Each subsection says when it ran (a run with --only keeps the other subsections)."] \
        + _machine() + [""]
    parts, worst = {}, 0
    for n in names:
        md, rc = run_one(n, a.quick, a.timeout)
        parts[n] = md
        worst = worst or rc
    if not a.no_write:
        write(a.out, head, parts)
        print(f"[benchmarks] wrote {os.path.relpath(a.out, ROOT)}")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
