"""``python -m fuzz replay FILE`` and ``python -m fuzz merge DIR...``.

Replay re-evaluates a saved failure (the JSON record under ``OUT/failures/``, or its ``.gguf``/``.npz``
sibling) through the same property, bucket and program as the campaign: exit 1 when it still fails, 0
when it passes now, 2 when the file cannot be read. Merge combines the ``results.jsonl`` of several
campaign directories (shards, resumed runs; case ids deduplicated) into one summary; exit 1 when any case
failed.
"""

from __future__ import annotations

import json
import pathlib
import sys

__all__ = ["load_record", "replay", "main", "merge_main"]


def load_record(path) -> dict:
    """The failure record at ``path`` (.json, or a saved array file next to its .json)."""
    p = pathlib.Path(path)
    if p.suffix != ".json":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise ValueError(f"replay: no failure record at {p}")
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"replay: {p} is not a failure record ({e})") from None
    if not isinstance(rec, dict) or "property" not in rec or "params" not in rec:
        raise ValueError(f"replay: {p} is not a failure record (no property/params)")
    return rec


def replay(rec: dict) -> dict:
    """Re-evaluate a record's minimal case -> the outcome dict (ok, checks, error, metrics)."""
    from fuzz import properties as P
    from fuzz.target_spec import load_target

    prop = P.get(rec["property"])
    P.set_active([prop.name])
    target = load_target(rec["target"], rec.get("threads")) if rec.get("target") else None
    ctx = P.Context(seed=rec.get("seed", 0), target=target, target_spec=rec.get("target"),
                    traces=rec.get("traces"))
    why = P.available(prop, ctx)
    if why:
        raise ValueError(f"replay: property {prop.name} cannot run: {why}")
    return prop.evaluate([rec["params"]], ctx)[0]


def main(argv) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m fuzz replay FILE", file=sys.stderr)
        return 2
    rec = load_record(argv[0])
    o = replay(rec)
    if o["ok"]:
        print(f"PASS {rec['property']} {rec.get('case_id', '')}: the saved case passes now")
        return 0
    print(f"FAIL {rec['property']} {rec.get('case_id', '')}: {o['error']}")
    return 1


def merge_main(argv) -> int:
    from fuzz.campaign import format_summary, read_records, summarize

    if not argv:
        print("usage: python -m fuzz merge DIR...", file=sys.stderr)
        return 2
    records = []
    for d in argv:
        p = pathlib.Path(d) / "results.jsonl"
        if not p.is_file():
            raise ValueError(f"merge: {d} has no results.jsonl")
        records += read_records(p)
    props = summarize(records)
    print(format_summary(props))
    fails = [r for r in records if r.get("type") == "failure"]
    for f in fails:
        print(f"FAIL {f['property']}: {f['error']}\n  replay: {f['replay']}")
    return 1 if any(s["failures"] for s in props.values()) else 0
