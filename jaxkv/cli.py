"""The ``jaxkv`` command: one table of subcommands, shared with ``python -m fuzz``.

    jaxkv fuzz [...]          a fuzz campaign (what ``python -m fuzz [...]`` runs)
    jaxkv verify TRACE...     verify traces against a precision model
    jaxkv replay FILE         re-run a saved failure
    jaxkv merge DIR...        one summary over several campaigns' results
    jaxkv record ...          a trace of a real ggml call (libggml-python)
    jaxkv capture ...         every attention call of a llama.cpp run, as traces
    jaxkv sensitivity ...     quantisation-error studies
    jaxkv ggml-replay FILE... re-run a trace through live ggml
    jaxkv bench [...]         the benchmarks (from a source checkout)

Each subcommand is one row of :data:`COMMANDS` (module, function, summary): the module is imported only
when its subcommand runs, so an optional dependency missing for one command (ggml, llama.cpp, matplotlib)
never breaks another. ``python -m fuzz SUB ...`` looks up the same table, and ``python -m fuzz`` without
a subcommand is ``jaxkv fuzz``.

Exit status: the subcommand's own (0 pass, 1 a failure found, 2 bad arguments or unreadable input); 2
for an unknown subcommand or one whose module is not installed; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from jaxkv.textsafe import escape

__all__ = ["Command", "COMMANDS", "UsageError", "Parser", "prog", "one_line", "run", "main"]


class UsageError(Exception):
    """A subcommand's bad arguments: reported as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one line, no usage dump) instead of
    exiting."""

    def error(self, message):
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``module.function(argv) -> int`` and its one-line summary."""

    module: str
    function: str
    summary: str


COMMANDS: dict[str, Command] = {
    "fuzz": Command("fuzz.fuzz_cmd", "campaign_main", "run a fuzz campaign (python -m fuzz)"),
    "verify": Command("fuzz.verify_cmd", "main", "verify traces against a precision model"),
    "replay": Command("fuzz.replay", "main", "re-run a saved failure record"),
    "merge": Command("fuzz.replay", "merge_main", "one summary over several campaigns' results"),
    "record": Command("fuzz.record_cmd", "main", "record a trace of a real ggml call (libggml-python)"),
    "capture": Command("fuzz.capture_cmd", "main", "capture the attention calls of a llama.cpp run"),
    "sensitivity": Command("fuzz.sensitivity_cmd", "main", "quantisation-error sensitivity studies"),
    "ggml-replay": Command("jaxkv.oracles.ggml_replay", "main", "re-run a trace through live ggml"),
    "bench": Command("benchmarks.__main__", "main", "run the benchmarks (source checkout)"),
}


def prog(sub: str | None = None) -> str:
    """How the user invoked a subcommand, for usage lines and errors: ``jaxkv SUB`` when the running
    script is the ``jaxkv`` console script, else ``python -m fuzz SUB`` (``python -m fuzz`` alone for
    the campaign, its default subcommand)."""
    if os.path.basename(sys.argv[0] or "") == "jaxkv":
        return f"jaxkv {sub}" if sub else "jaxkv"
    return "python -m fuzz" if sub in (None, "fuzz") else f"python -m fuzz {sub}"


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, control characters escaped (safe for a terminal)."""
    lines = str(e).strip().splitlines()
    return escape(lines[0] if lines else type(e).__name__)


def _help(prog: str) -> str:
    w = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n:<{w}}  {c.summary}" for n, c in COMMANDS.items())
    return (f"usage: {prog} SUBCOMMAND [ARGS...]   ({prog} SUBCOMMAND --help for its options)\n\n"
            f"subcommands:\n{rows}\n")


def _resolve(name: str, prog: str):
    """The callable of subcommand ``name``, or an exit status with its one-line message printed."""
    cmd = COMMANDS[name]
    try:
        mod = importlib.import_module(cmd.module)
    except ModuleNotFoundError as e:
        # only the subcommand's own module (or its package) missing is "not available"; a missing
        # dependency inside it is reported with its name
        missing = e.name or "?"
        print(f"{prog} {name}: not available ({missing} is not installed)", file=sys.stderr)
        return 2
    return getattr(mod, cmd.function)


def run(argv: list[str], *, prog: str = "jaxkv", default: str | None = None) -> int:
    """Dispatch ``argv`` (``[SUBCOMMAND, *args]``) through :data:`COMMANDS`. With ``default`` set, an
    ``argv`` that does not start with a subcommand name runs ``default`` on all of it (``python -m fuzz``
    runs a campaign). Returns the exit status."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
    elif default is not None:
        name, rest = default, argv
    elif not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_help(prog))
        return 0
    else:
        shown = argv[0].encode("unicode_escape").decode("ascii")[:80]
        print(f"{prog}: unknown subcommand {shown!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    fn = _resolve(name, prog)
    if isinstance(fn, int):
        return fn
    try:
        return int(fn(rest) or 0)
    except ValueError as e:  # a subcommand's bad argument or unreadable input: one line, exit 2
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # the file system or the machine refused: one line, exit 2
        print(f"{prog}: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxkv`` console script."""
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
