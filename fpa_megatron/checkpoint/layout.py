"""How a checkpoint's shards are cut (`layout.json`), and whether a run's layout can load them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fpa_megatron.config import ConfigError, RunConfig, load_config

LAYOUT = "layout.json"


class CheckpointLayoutError(ConfigError):
    """The checkpoint was saved under another world size, TP or PP than this run."""


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint's shards are cut: DeepSpeed files per TP x PP rank, ZeRO partitions per DP x CP rank.

    Context parallelism shards no weight: the CP ranks of one replica are part of DeepSpeed's data-parallel
    group, so they only multiply the ZeRO partitions (`zero_partitions` = data x context)."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    virtual_pipeline: int = 1  # model chunks per stage; their layers are numbered per chunk in the files
    context: int = 1

    @classmethod
    def of_run(cls, cfg: RunConfig, world_size: int) -> "CheckpointLayout":
        tp, cp, pp = cfg.parallel.tensor, cfg.parallel.context, cfg.parallel.pipeline
        return cls(world_size, tp, pp, world_size // (tp * cp * pp), cfg.optimizer.zero_stage,
                   virtual_pipeline=cfg.parallel.virtual_pipeline, context=cp)

    @property
    def model_cut(self) -> tuple[int, int, int, int]:
        """(TP, CP, PP, VP): what cuts the model; the rest of the world size is data parallel."""
        return self.tensor, self.context, self.pipeline, self.virtual_pipeline

    @property
    def zero_partitions(self) -> int:
        return self.data * self.context

    def describe(self) -> str:
        vp = f" x VP{self.virtual_pipeline}" if self.virtual_pipeline > 1 else ""
        context = f" x CP{self.context}" if self.context > 1 else ""
        return f"TP{self.tensor}{context} x PP{self.pipeline}{vp} x DP{self.data} ({self.world_size} ranks)"

    def shards_match(self, other: "CheckpointLayout") -> bool:
        """Same cut of model shards and ZeRO partitions (ZeRO-1 and -2 write the same files; DP x CP is
        world / (TP x PP) either way, so CP may change at the same world size)."""
        return ((self.world_size, self.tensor, self.pipeline, self.virtual_pipeline)
                == (other.world_size, other.tensor, other.pipeline, other.virtual_pipeline))


def read_layout(path: Path) -> CheckpointLayout:
    """The layout a checkpoint was saved with: its layout.json, else (older or converted checkpoints) its
    config.yaml and the number of per-rank files (RNG states, or DeepSpeed's ZeRO partitions: one per rank)."""
    if (path / LAYOUT).is_file():
        values = json.loads((path / LAYOUT).read_text())  # older ones: no virtual_pipeline, no context (1)
        return CheckpointLayout(**{k: int(values[k]) for k in CheckpointLayout.__dataclass_fields__ if k in values})

    saved = load_config(path / "config.yaml")
    world = max(len(list(path.glob("rng_rank_*.pt"))), len(list(path.glob("*_optim_states.pt"))))
    return CheckpointLayout.of_run(saved, world)


def check_layout(path: Path, run: CheckpointLayout, elastic: bool = False) -> Optional[CheckpointLayout]:
    """None when the checkpoint at path loads into run as it is; with `elastic` (parallel.elastic), its saved
    layout when only the data-parallel size differs (the caller rewrites it: elastic.py); else raise
    CheckpointLayoutError naming both layouts."""
    saved = read_layout(path)
    if saved.shards_match(run):
        return None
    if elastic and saved.model_cut == run.model_cut:
        return saved
    raise CheckpointLayoutError(
        f"checkpoint {path.name} ({path}) was saved with {saved.describe()}; this run is {run.describe()}: "
        f"its model shards and optimizer partitions do not fit this layout. Convert it with "
        f"`fpa-reshard --checkpoint {path} --tensor {run.tensor} --pipeline {run.pipeline} "
        + (f"--virtual-pipeline {run.virtual_pipeline} " if run.virtual_pipeline > 1 else "")
        + (f"--context {run.context} " if run.context != saved.context else "")
        + f"--world-size {run.world_size} --out NEW_DIR`, "
        f"then resume with checkpoint.resume=NEW_DIR (or run with parallel.tensor={saved.tensor} "
        + (f"parallel.context={saved.context} " if saved.context > 1 else "")
        + f"parallel.pipeline={saved.pipeline} "
        + (f"parallel.virtual_pipeline={saved.virtual_pipeline} " if saved.virtual_pipeline > 1 else "")
        + f"on {saved.world_size} ranks)"
        + ("; or let the run rewrite it as it resumes: parallel.elastic=true (launch/torchrun.sh sets it for "
           "--nnodes MIN:MAX)" if saved.model_cut == run.model_cut else ""))
