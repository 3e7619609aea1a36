"""Elastic resume: continue a run on another number of data-parallel replicas, for a job whose node count
changed between attempts (torchrun --nnodes MIN:MAX after a node was lost or came back; launch/torchrun.sh
sets `parallel.elastic` for such a range).

Only the data-parallel size may change (TP, CP, PP and VP are the config's, checked as always). The newest
checkpoint, saved under the old world size, is rewritten for this one by fpa-reshard's writer: the ZeRO
partitions of the fp32 master weights and AdamW's moments gathered and cut again for the new DP x CP size,
DeepSpeed's own file format. Rank 0 writes it into `<checkpoint root>/elastic/`, every rank loads it, and it
is removed once all have read it (the original stays where it is, on the lineage). The global batch is the
config's, so fewer replicas run more micro-batches each (train.global_batch_size / (micro x DP)) and see the
same samples per step; the per-rank RNG streams start again from train.seed, as after fpa-reshard.
Cost: rank 0 writes one checkpoint's worth of files, streaming (each file built from the tensors it needs, read
one at a time, then written: about the largest file written plus the largest read in host memory, whatever the
model's size); the other ranks wait (parallel.timeout_minutes bounds it).
Why not DeepSpeed's elastic checkpoints: they are for ZeRO's own universal format, whose per-module names
do not survive Megatron's per-stage layer numbering (see reshard.py); the rewrite is the same code path
fpa-reshard's tests prove equal.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from fpa_megatron.checkpoint.integrity import agree_on_problem
from fpa_megatron.checkpoint.layout import CheckpointLayout, CheckpointLayoutError
from fpa_megatron.checkpoint.reshard import reshard
from fpa_megatron.run_log import get_logger

ELASTIC = "elastic"  # the rewritten copies, under the checkpoint root
log = get_logger("elastic")


def rewrite_for_this_world(path: Path, saved: CheckpointLayout, run: CheckpointLayout, root: Path) -> Path:
    """All ranks: rank 0 rewrites checkpoint `path` (saved as `saved`) for this run's layout into
    `<root>/elastic/`; every rank waits for it. Returns the iteration directory to load. A failure on rank 0
    (a damaged file, a layout the config refuses) raises on every rank, naming it."""
    target = root / ELASTIC / f"{path.name}-world{run.world_size}"
    problem = None
    if dist.get_rank() == 0:
        log.warning(f"parallel.elastic: checkpoint {path.name} was saved with {saved.describe()}; this run is "
                    f"{run.describe()}: rewriting its ZeRO partitions for DP{run.data} into {target}")
        shutil.rmtree(target, ignore_errors=True)  # what an attempt killed while writing left behind
        try:
            reshard(path, target, run.tensor, run.pipeline, world_size=run.world_size,
                    virtual_pipeline=run.virtual_pipeline, context=run.context, log=lambda line: log.info(line))
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            problem = f"{type(err).__name__}: {err}"
    problem = agree_on_problem(problem)  # doubles as the barrier: the copy is complete before anyone reads it
    if problem:
        raise CheckpointLayoutError(f"parallel.elastic: checkpoint {path} could not be rewritten for "
                                    f"{run.describe()}: {problem}")
    return target / path.name


def remove_copy(load_dir: Path, root: Path) -> None:
    """Rank 0, once every rank has loaded: drop the rewritten copy (it is derived; the original is kept)."""
    if load_dir.parent.parent == root / ELASTIC:
        shutil.rmtree(load_dir.parent, ignore_errors=True)
