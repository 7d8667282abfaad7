"""``jaxkv fuzz`` / ``python -m fuzz`` without a subcommand: the campaign's command line (options in
:mod:`fuzz.__main__`'s docstring): parse, load the ``--target`` (:mod:`fuzz.target_spec`), build the
:class:`fuzz.registry.Context` and run :class:`fuzz.campaign.Campaign`."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax

from jaxkv import cli
from fuzz import properties as P
from fuzz.campaign import Campaign, Options
from fuzz.properties import cache_pairs
from fuzz.target_spec import GGML_TARGETS, load_target
from jaxkv.cli import COMMANDS, one_line
from jaxkv.textsafe import escape

__all__ = ["DEFAULT_EXAMPLES", "campaign_main", "default_traces", "default_ggml_target", "enable_compile_cache"]

DEFAULT_EXAMPLES = 64


class UsageError(Exception):
    pass


def _parser():
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    p = Parser(prog=cli.prog("fuzz"), description="Fuzz campaigns over jaxkv's properties and kernels.",
               epilog="subcommands (python -m fuzz SUB --help; the same as jaxkv SUB): " + " | ".join(
                   n for n in COMMANDS if n != "fuzz"),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-examples", type=int, metavar="N",
                   help=f"cases per property (default {DEFAULT_EXAMPLES} when no --time-budget)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS", help="wall-clock budget, split over the properties")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0): same seed, same cases")
    p.add_argument("--properties", default=None, metavar="P1,P2|all",
                   help="properties to run (default: all; with --target/--traces and no --properties: "
                        "just target/traces)")
    p.add_argument("--target", metavar="MODULE:FUNCTION|" + "|".join(GGML_TARGETS),
                   help="kernel fn(q, k, v, *, scale, mask, softcap, max_bias, sinks) -> out to fuzz; or a "
                        "live ggml op (the 'ggml' extra): ggml = flash_attn_ext, ggml-unfused = mul_mat + "
                        "soft_max_ext + mul_mat (no softcap, no sinks), ggml-mixed = a dequantized cold "
                        "region + an F16 hot window; judged against the ggml-cpu model")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="n_threads of a ggml --target (default 1)")
    p.add_argument("--menu", default=None, metavar="ci|full|tiled",
                   help="with --target ggml: cases from a fixed-bucket menu of every live ggml op "
                        "(fuzz.strategies.MENUS; each case draws its op, K/V types and threads)")
    p.add_argument("--traces", metavar="DIR", help="verify every trace (*.gguf) under DIR")
    p.add_argument("--out", default="fuzz-out", metavar="DIR", help="results directory (default fuzz-out)")
    p.add_argument("--resume", action="store_true", help="continue the campaign recorded in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results.jsonl and failures/ already in --out (default: refuse a non-empty --out)")
    p.add_argument("--quiet", action="store_true", help="plain progress lines, no progress bar")
    p.add_argument("--list", action="store_true", help="list the properties and exit")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run shard I of N (disjoint cases)")
    p.add_argument("--no-shrink", action="store_true", help="save failures without shrinking them")
    p.add_argument("--no-ggml", action="store_true",
                   help="the default campaign without live ggml (by default, when the ggml extra loads, its "
                        "target property fuzzes live ggml's flash_attn_ext against the ggml-cpu model)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache (default $JAXKV_FUZZ_CACHE or "
                        "~/.cache/jaxkv/fuzz-xla; 'off' disables)")
    return p


def enable_compile_cache(spec: str | None) -> str | None:
    """Point JAX's persistent compilation cache at ``spec`` (None: $JAXKV_FUZZ_CACHE or
    ~/.cache/jaxkv/fuzz-xla; 'off': leave it disabled). A campaign's programs then compile once per
    machine, not once per run. Returns the directory used."""
    spec = spec or os.environ.get("JAXKV_FUZZ_CACHE") or str(pathlib.Path.home() / ".cache" / "jaxkv" / "fuzz-xla")
    if spec == "off":
        return None
    try:
        pathlib.Path(spec).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", spec)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception:  # an unusable cache directory only costs speed
        return None
    return spec


def _parse_shard(s: str):
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise UsageError(f"--shard: expected I/N with integers, got {s!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard: need 0 <= I < N, got {s!r}")
    return i, n


def default_traces() -> str | None:
    """The real-model traces shipped in the repository (``traces/gemma3-270m``, captured from llama.cpp by
    ``python -m fuzz capture``), next to the fuzz package or under the working directory: the default
    campaign verifies them in its ``traces`` property; ``--traces DIR`` replaces them."""
    for root in (pathlib.Path(__file__).resolve().parent.parent, pathlib.Path.cwd()):
        p = root / "traces" / "gemma3-270m"
        if p.is_dir():
            return str(p)
    return None


def default_ggml_target():
    """(spec, target) of the live-ggml target the default campaign fuzzes when the ggml extra
    (libggml-python, or a build named by ``JAXKV_GGML_LIB_DIR``) loads; (None, None) when it does not."""
    try:
        return "ggml", load_target("ggml", None)
    except ValueError:
        return None, None


def _campaign(argv) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        ctx = P.Context(traces=default_traces())
        w = max(len(n) for n in P.PROPERTIES)
        for name, p in P.PROPERTIES.items():
            why = P.available(p, ctx)
            note = f"  [{why}]" if why else ""
            print(f"{name:<{w}}  {p.doc}{note}")
        return 0
    if args.max_examples is not None and args.max_examples < 0:
        raise UsageError("--max-examples: must be >= 0")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageError("--time-budget: must be > 0")
    shard = _parse_shard(args.shard)
    enable_compile_cache(args.compile_cache)
    if args.properties is None and (args.target or args.traces):
        names = (["traces"] if args.traces else []) + (["target"] if args.target else [])
    elif args.properties is None or args.properties.strip() == "all":
        names = list(P.PROPERTIES)
    else:
        names = [x.strip() for x in args.properties.split(",") if x.strip()]
        if not names:
            raise UsageError("--properties: empty list")
        for n in names:
            P.get(n)  # ValueError names the unknown one
    if args.threads is not None and not args.target:
        raise UsageError(f"--threads: only with --target {'|'.join(GGML_TARGETS)}")
    if args.menu is not None and not args.target:
        raise UsageError(f"--menu: only with --target {'|'.join(GGML_TARGETS)}")
    target = load_target(args.target, args.threads, args.menu) if args.target else None
    if target is None and "target" in names and not args.no_ggml:
        # the default campaign fuzzes live ggml too when the ggml extra is installed
        args.target, target = default_ggml_target()
    if args.traces:
        try:
            is_dir = pathlib.Path(args.traces).is_dir()
            exists = is_dir or pathlib.Path(args.traces).exists()
        except OSError:
            is_dir = exists = False
        if not is_dir:
            raise ValueError(f"--traces: expected a directory of *.gguf traces, found "
                             f"{'a file' if exists else 'nothing'} at {escape(args.traces)} (one file: "
                             f"python -m fuzz verify FILE)")
    args.traces = args.traces or default_traces()

    max_ex = args.max_examples
    if max_ex is None and args.time_budget is None:
        max_ex = DEFAULT_EXAMPLES
    opts = Options(max_examples=max_ex, time_budget=args.time_budget, seed=args.seed, properties=tuple(names),
                   target=args.target, traces=args.traces, out=args.out, resume=args.resume,
                   overwrite=args.overwrite,
                   quiet=args.quiet, shard=shard, shrink=not args.no_shrink, threads=args.threads,
                   menu=args.menu)
    ctx = P.Context(seed=args.seed, target=target, target_spec=args.target, traces=args.traces,
                    cache_pairs=cache_pairs(args.seed))
    return Campaign(opts, ctx).run()


def _line(e: BaseException) -> str:
    """An exception as one escaped line."""
    return one_line(e)


def campaign_main(argv) -> int:
    """``python -m fuzz [options]`` / ``jaxkv fuzz [options]``: run a campaign; bad arguments or
    unreadable input -> one line on stderr, exit 2."""
    try:
        return _campaign(list(argv))
    except UsageError as e:
        print(f"{cli.prog('fuzz')}: error: {_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{cli.prog('fuzz')}: error: {_line(e)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # the file system or the machine refused: one line, no traceback
        print(f"{cli.prog('fuzz')}: error: {type(e).__name__}: {_line(e)}", file=sys.stderr)
        return 2


