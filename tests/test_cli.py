"""The one CLI (issue #15): the installed ``jaxkv`` console script and ``python -m fuzz`` both answer
``--help``, list every subcommand of ``jaxkv.cli.COMMANDS`` and dispatch to the same code."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from jaxkv.cli import COMMANDS

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(sys.executable).parent / "jaxkv"


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_console_script_is_installed_and_lists_every_subcommand():
    assert SCRIPT.exists(), f"{SCRIPT}: the jaxkv console script ([project.scripts]) is not installed"
    r = _run(str(SCRIPT), "--help")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("sub", ["verify", "replay", "fuzz"])
def test_both_forms_give_the_same_subcommand_help(sub):
    a = _run(str(SCRIPT), sub, "--help")
    b = _run(sys.executable, "-m", "fuzz", sub, "--help") if sub != "fuzz" else _run(sys.executable, "-m", "fuzz", "--help")
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    # the same parser: identical text after the usage block; each names how it was invoked
    body = lambda s: s.split("\n\n", 1)[1]  # noqa: E731
    assert body(a.stdout) == body(b.stdout)
    assert a.stdout.startswith(f"usage: jaxkv {sub} ")
    assert b.stdout.startswith("usage: python -m fuzz " if sub == "fuzz" else f"usage: python -m fuzz {sub} ")


def test_unknown_subcommand_is_one_line_exit_2():
    r = _run(str(SCRIPT), "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
