"""``python -m fuzz``: fuzz campaigns that find, shrink, save and replay numerical bugs.

    python -m fuzz [--max-examples N | --time-budget SECONDS] [--seed S] [--properties P1,P2|all]
                   [--target MODULE:FUNCTION|ggml|ggml-unfused|ggml-mixed] [--threads N | --menu ci|full|tiled]
                   [--traces DIR]
                   [--out DIR] [--resume | --overwrite] [--quiet] [--list] [--shard I/N] [--no-shrink]
    python -m fuzz replay FILE [--target SPEC]   re-run a saved failure (exit 1: still fails, 0: passes now)
    python -m fuzz merge DIR...         one summary over several campaigns' results (e.g. shards)
    python -m fuzz verify ...           verify traces (fuzz.verify_cmd)
    python -m fuzz sensitivity ...      (fuzz.sensitivity_cmd, when present)
    python -m fuzz record ...           (fuzz.record_cmd, when present)
    python -m fuzz capture ...          capture a real llama.cpp run as traces (fuzz.capture_cmd)

The subcommands are the rows of :data:`jaxkv.cli.COMMANDS`, the same as the ``jaxkv`` console script's
(``jaxkv --help``); ``python -m fuzz`` without one is ``jaxkv fuzz``.

``--target ggml|ggml-unfused|ggml-mixed`` fuzzes live ggml (the ``ggml`` extra, libggml-python) at
``--threads N`` (default 1) through ``fuzz.ggml_targets.make_target``; such a target declares the
``ggml-cpu`` precision and is judged against its emulation (jaxkv.ggml_cpu) with jaxkv.verify's budget.
``--target ggml --menu ci|full|tiled`` draws instead from a fixed-bucket case menu
(fuzz.strategies.MENUS) whose cases name their own live op (ggml, ggml-unfused, ggml-mixed), formats and
threads: the campaign formerly run as ``python -m fuzz.ggml_campaign`` (its ``--n`` is ``--max-examples``).

``--out`` (default ``fuzz-out``) never destroys an earlier run: a non-empty directory is refused unless
``--resume`` (continue that campaign) or ``--overwrite`` (replace its results.jsonl and failures/); the
refusal says which to add. The default stays one fixed directory (not a fresh one per run) so that
``--resume``, ``merge`` and the README's commands find it without naming it; running the main command
twice therefore asks, in one line, whether to resume, overwrite or use another ``--out``.

Files read back (results.jsonl, failure records, traces) are untrusted data: validated against their
schemas (fuzz.schema, jaxkv.trace), never imported or executed, and escaped (jaxkv.textsafe) when shown.

Exit status: 0 no property failed, 1 a property failed, 2 bad arguments or unreadable input (one line on
stderr), 130 interrupted (the summary is still written).
"""

from __future__ import annotations

import sys

from fuzz.target_spec import GGML_TARGETS, load_target  # noqa: F401  (re-exported: older imports)
from jaxkv import cli

__all__ = ["main"]


def main(argv=None) -> int:
    """``python -m fuzz [SUBCOMMAND] ...``: the subcommands of :mod:`jaxkv.cli` (the same table as the
    ``jaxkv`` command); without one, a campaign (:mod:`fuzz.fuzz_cmd`)."""
    return cli.run(list(sys.argv[1:] if argv is None else argv), prog="python -m fuzz", default="fuzz")


if __name__ == "__main__":
    sys.exit(main())
