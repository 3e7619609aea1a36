"""Gather the manifest parts of an encode run as tasks (tasks.py) into the one-machine encode's files.

`fpa-prep merge DIR` calls `gather_parts` first. It trusts nothing the tasks wrote: the parts must be of
one encode (same fingerprint: settings, inputs and tokenizer hash), each part's planned shards must be
its task's share of the plan, and every planned shard must be done by exactly one part, with its commit
record and files on disk as the part recorded them. Errors name the missing or duplicate shards, the task
that owes them and the part file. Then it writes `manifest.json` and `rejects.jsonl` exactly as a
one-machine encode of the same inputs writes them (same bytes), and the merge goes on as for one machine.
"""

from __future__ import annotations

import os
from typing import Optional

from data_prep.common import PrepError, atomic_write_json
from data_prep.encode import MANIFEST, _diff, _load_json, _manifest, _ranges, _shard_done, _write_rejects
from data_prep.tasks import PART_PATTERN, Task, part_name

BASE_KEYS = ("tool", "fingerprint", "settings", "inputs", "tokenizer")


def find_parts(out_dir: str) -> list[str]:
    """The manifest part files in out_dir, sorted by task count then index."""
    found = [e for e in os.listdir(out_dir) if PART_PATTERN.fullmatch(e)]
    return sorted(found, key=lambda e: tuple(reversed([int(g) for g in PART_PATTERN.fullmatch(e).groups()])))


def _read_part(out_dir: str, name: str) -> dict:
    part = _load_json(os.path.join(out_dir, name))
    index, count = (int(g) for g in PART_PATTERN.fullmatch(name).groups())
    if not isinstance(part, dict) or any(k not in part for k in (*BASE_KEYS, "task", "shards_done", "shard_records")):
        raise PrepError(f"{os.path.join(out_dir, name)} is not a readable manifest part (damaged? rerun task "
                        f"{index} of {count})")
    if part["task"] != {"index": index, "count": count}:
        raise PrepError(f"{os.path.join(out_dir, name)} records task {part['task']}, not the task its name says")
    return part


def _missing_message(missing: list[int], num_shards: int, parts: dict, counts: set) -> str:
    """Which tasks owe the missing shards (when the parts agree on a task count), else just the shards."""
    head = f"{len(missing)} of {num_shards} planned shard(s) missing: {_ranges(missing)}"
    if len(counts) != 1:
        return head
    count = counts.pop()
    owed = []
    for index in range(count):
        shards = [k for k in Task(index, count).shards(num_shards) if k in set(missing)]
        if not shards:
            continue
        name = part_name(index, count)
        why = "no manifest part " + name if name not in parts else f"{name} has {len(parts[name]['shards_done'])} " \
              f"of its {len(parts[name]['shards_planned'])} shards done"
        owed.append(f"task {index} of {count} ({why}): shard(s) {_ranges(shards)}")
    return head + "; rerun " + "; ".join(owed)


def gather_parts(out_dir: str) -> Optional[dict]:
    """Check the manifest parts in out_dir and write manifest.json and rejects.jsonl from them; returns the
    manifest, or None when out_dir holds no part (a one-machine encode)."""
    names = find_parts(out_dir)
    if not names:
        return None
    parts = {name: _read_part(out_dir, name) for name in names}
    first_name = names[0]
    first = parts[first_name]
    for name, part in parts.items():
        if part["fingerprint"] != first["fingerprint"]:
            raise PrepError(f"{name} and {first_name} in {out_dir} are parts of different encodes "
                            f"({_diff(first, part)}): every task must run the same command; remove the stale part")
    base = {k: first[k] for k in BASE_KEYS}
    num_shards = base["settings"]["num_shards"]
    keys = base["settings"]["text_keys"]
    old = _load_json(os.path.join(out_dir, MANIFEST))
    if old is not None and old.get("fingerprint") != base["fingerprint"]:
        raise PrepError(f"{os.path.join(out_dir, MANIFEST)} is of another encode than the manifest parts "
                        f"({_diff(old, base)}): remove it or the parts")
    claims: dict[int, list[str]] = {}
    for name, part in parts.items():
        task = Task(**part["task"])
        if part.get("shards_planned") != task.shards(num_shards):
            raise PrepError(f"{name}: its planned shards are not task {task.index} of {task.count}'s share of "
                            f"{num_shards} shards")
        for k in part["shards_done"]:
            claims.setdefault(k, []).append(name)
    duplicates = {k: v for k, v in sorted(claims.items()) if len(v) > 1}
    if duplicates:
        listed = "; ".join(f"shard {k} by {', '.join(v)}" for k, v in duplicates.items())
        raise PrepError(f"shard(s) done by more than one task in {out_dir}: {listed} (parts of runs with another "
                        "--num-tasks? remove the stale parts)")
    missing = [k for k in range(num_shards) if k not in claims]
    if missing:
        raise PrepError(f"cannot merge {out_dir}: " + _missing_message(
            missing, num_shards, parts, {p["task"]["count"] for p in parts.values()}))
    states = {}
    for k, (name,) in sorted(claims.items()):
        record = _shard_done(out_dir, k, base["fingerprint"])
        if record is None or record != parts[name]["shard_records"].get(str(k)):
            task = parts[name]["task"]
            raise PrepError(f"shard {k} of {name}: its commit record or files in {out_dir} are missing, damaged "
                            f"or from another run; rerun task {task['index']} of {task['count']}")
        states[k] = record
    _write_rejects(out_dir, num_shards, base["inputs"])
    manifest = _manifest(base, states, num_shards, keys)
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest
