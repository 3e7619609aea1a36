"""Which shards of an encode one task does, when the encode runs as N independent tasks (machines).

Every task computes the same shard plan from the inputs and --num-shards (see encode.py), so the tasks
need no coordination: task I of N encodes the shards k with k % N == I (round robin: a slow stretch of
the corpus spreads over the tasks) into the shared output directory and records them in its own manifest
part, `manifest.task-<IIIII>-of-<NNNNN>.json`. `fpa-prep merge` gathers the parts (see gather.py).

The task comes from --task-index / --num-tasks, else from FPA_PREP_TASK_INDEX / FPA_PREP_NUM_TASKS (any
scheduler can set them), else from a SLURM job array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT. Each
value is looked up on its own, so `sbatch --array=2` with FPA_PREP_NUM_TASKS=4 reruns task 2 of 4.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from data_prep.common import PrepError

# (option, generic environment variable, SLURM's) for the task index and the task count, in that order of
# precedence
INDEX_SOURCES = ("--task-index", "FPA_PREP_TASK_INDEX", "SLURM_ARRAY_TASK_ID")
COUNT_SOURCES = ("--num-tasks", "FPA_PREP_NUM_TASKS", "SLURM_ARRAY_TASK_COUNT")
PART_PATTERN = re.compile(r"manifest\.task-(\d{5})-of-(\d{5})\.json")


@dataclass(frozen=True)
class Task:
    """Task `index` (0-based) of `count`; `source` says where the values came from (for the log)."""

    index: int
    count: int
    source: str = "options"

    def shards(self, num_shards: int) -> list[int]:
        """This task's shards of a plan of num_shards (round robin)."""
        return list(range(self.index, num_shards, self.count))

    @property
    def part_name(self) -> str:
        return part_name(self.index, self.count)


def part_name(index: int, count: int) -> str:
    """File name of the manifest part of task `index` of `count`."""
    return f"manifest.task-{index:05d}-of-{count:05d}.json"


def _lookup(option_value: Optional[int], sources: tuple, environ: Mapping[str, str]) -> tuple[Optional[int], str]:
    if option_value is not None:
        return option_value, sources[0]
    for name in sources[1:]:
        raw = environ.get(name, "").strip()
        if raw:
            try:
                return int(raw), name
            except ValueError:
                raise PrepError(f"{name}={raw!r}: not an integer") from None
    return None, ""


def resolve_task(task_index: Optional[int], num_tasks: Optional[int],
                 environ: Optional[Mapping[str, str]] = None) -> Optional[Task]:
    """The task this encode is, or None for a whole encode (no task given, or a single task)."""
    environ = os.environ if environ is None else environ
    index, index_from = _lookup(task_index, INDEX_SOURCES, environ)
    count, count_from = _lookup(num_tasks, COUNT_SOURCES, environ)
    if index is None and count is None:
        return None
    if count is None:
        raise PrepError(f"a task index ({index_from}={index}) needs a task count: --num-tasks or "
                        f"{COUNT_SOURCES[1]}")
    if index is None:
        raise PrepError(f"a task count ({count_from}={count}) needs a task index: --task-index or "
                        f"{INDEX_SOURCES[1]}")
    if count < 1:
        raise PrepError(f"{count_from}={count}: the task count must be at least 1")
    if not 0 <= index < count:
        hint = (" (submit the array as --array=0-<N-1>, or set FPA_PREP_NUM_TASKS when rerunning one task)"
                if index_from == INDEX_SOURCES[2] else "")
        raise PrepError(f"{index_from}={index} is not a task index of {count_from}={count}: it must be 0 .. "
                        f"{count - 1}{hint}")
    if count == 1:
        return None
    return Task(index, count, f"{index_from} and {count_from}")
