"""``python -m fuzz verify TRACE_OR_DIR... [--precision P] [--json] [--names MAP] [--timings]``.

Verifies every trace (trace v1 files, and every step of a foreign multi-step dump) against the reference
under the declared precision model with a per-trace derived tolerance (docs/tolerance.md), and diagnoses
failures. Exit status: 0 all pass; 1 at least one mismatch; 2 at least one trace could not be read or
verified, or a directory holds no trace ("no traces found under DIR"; each reported on one line, the
others are still verified); 3 at least one trace is undecided (its reference is undefined, e.g. a NaN
input, or its budget would pass an all-zero output: ``jaxkv.verify``, docs/tolerance.md). Precedence:
2, then 1, then 3. A trace the declared model does not cover (``jaxkv.ggml_cpu.Unmodelled``) is judged
under the documented fallback budget, which its line names; it never exits 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

from jaxkv import cli
from jaxkv import report
from jaxkv import trace as tr
from jaxkv import verify as vf
from jaxkv.textsafe import escape

__all__ = ["main", "parse_names", "expand_paths", "exit_status"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise _UsageError(message)


class _UsageError(Exception):
    pass


class _NoTraces(Exception):
    """A directory argument that holds no ``*.gguf`` file."""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=cli.prog('verify'), description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="TRACE_OR_DIR")
    p.add_argument("--precision", default="auto", choices=vf.PRECISIONS,
                   help="declared precision model of the kernel (default: from trace.producer)")
    p.add_argument("--json", action="store_true", help="one JSON object per trace on stdout")
    p.add_argument("--names", metavar="MAP", default=None,
                   help="tensor-name map for trace.load: a JSON file or role=name,role=name")
    p.add_argument("--timings", action="store_true",
                   help="print the time spent loading, compiling and computing")
    p.add_argument("--max-elements", type=int, default=None, metavar="N",
                   help="largest attention call accepted: elements of each operand and of the logits "
                        "B*H*n_q*n_kv (default jaxkv.trace.MAX_ELEMENTS = 2^25)")
    return p


def parse_names(spec: str | None) -> dict | None:
    """``--names``: a JSON object file, or comma-separated ``role=name`` pairs -> dict (None if unset)."""
    if spec is None:
        return None
    p = pathlib.Path(spec)
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--names: {spec} is not a JSON object file ({e})") from None
        if not isinstance(d, dict) or not all(isinstance(x, str) for x in d.values()):
            raise ValueError(f"--names: {spec} must hold a JSON object of strings")
        return d
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--names: expected role=name pairs or a JSON file, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _is_dir(p) -> bool:
    try:
        return pathlib.Path(p).is_dir()
    except OSError:  # a name too long for the file system: reported by the loader as unreadable
        return False


def expand_paths(paths) -> list[pathlib.Path]:
    """Files as given; directories -> their ``*.gguf`` files (recursive, sorted). A missing path is
    kept (it is reported as unreadable)."""
    out = []
    for s in paths:
        p = pathlib.Path(s)
        if _is_dir(p):
            out.extend(sorted(x for x in p.rglob("*.gguf") if x.is_file()))
        else:
            out.append(p)
    return out


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _load(path: pathlib.Path, names, max_elements=None) -> list[tuple[str, object]]:
    """(name, Trace) per call in the file: one for trace v1, one per step for a foreign dump."""
    steps = tr.load_steps(path, names=names, max_elements=max_elements or tr.MAX_ELEMENTS)
    foreign = any(any(str(k).startswith("kqv_trace.") for k in (t.metadata or {})) for t in steps)
    if foreign or len(steps) > 1:
        return [(f"{path}[step {i + 1}]", t) for i, t in enumerate(steps)]
    return [(str(path), t) for t in steps]


def main(argv: list[str]) -> int:
    """Run the verify command on ``argv`` (the arguments after ``verify``); returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        names = parse_names(args.names)
        if args.max_elements is not None and args.max_elements < 1:
            raise ValueError(f"--max-elements: expected >= 1, got {args.max_elements}")
    except (_UsageError, ValueError) as e:
        print(f"error: {escape(str(e))}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.json:  # numpy's RuntimeWarnings (overflow in a forged trace) must not garble --json's stderr
        warnings.simplefilter("ignore", RuntimeWarning)
    timings = vf.Timings()
    seen = set()
    done = []  # (name, trace or None, verdict): the whole-run table of captured runs (jaxkv.report)
    paths = []
    for s in args.paths:
        found = expand_paths([s])
        if _is_dir(s) and not found:
            found = [(s, _NoTraces(f"no traces found under {s}"))]
        paths.extend(found)
    for path in paths:
        if isinstance(path, tuple):
            items = [path]
        else:
            try:
                with timings.loading():
                    items = _load(path, names, args.max_elements)
            except Exception as e:  # unreadable: one line, go on
                items = [(str(path), e)]
        for name, t in items:
            if isinstance(t, _NoTraces):
                verdict = vf.Verdict(name, "error", error=str(t))
            elif isinstance(t, BaseException):
                verdict = vf.Verdict(name, "error", error=_one_line(t))
            else:
                try:
                    with timings.computing():
                        verdict = vf.verify_trace(t, args.precision, name=name)
                except Exception as e:
                    verdict = vf.Verdict(name, "error", error=_one_line(e))
            done.append((name, None if isinstance(t, BaseException) else t, verdict))
            seen.add(verdict.status)
            if args.json:
                print(json.dumps(verdict.to_json()), flush=True)
            else:
                print(escape(verdict.line(), 2000), flush=True)
                if verdict.status in ("fail", "undecided"):
                    print("\n".join(escape(x, 2000) for x in verdict.details().splitlines()), flush=True)
    rows = [r for r in (report.row(n, t, v) for n, t, v in done) if r.layer is not None]
    if rows:
        print(report.render(rows), file=sys.stderr if args.json else sys.stdout)
    if args.timings:
        print(timings.line(), file=sys.stderr if args.json else sys.stdout)
    return exit_status(seen)


def exit_status(statuses) -> int:
    """The command's exit status for the set of verdict statuses seen: error 2, else fail 1, else
    undecided 3, else 0 (``jaxkv.verify.EXIT_CODES``)."""
    for s in ("error", "fail", "undecided"):
        if s in statuses:
            return vf.EXIT_CODES[s]
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # output piped into a closed reader (e.g. head)
        sys.stderr.close()
        sys.exit(1)
