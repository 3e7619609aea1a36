"""Checkpoints through DeepSpeed: model shards per TP x PP rank, ZeRO partitions per DP rank, plus our state.

Layout of `<dir>/iter_0000040/`: DeepSpeed's files (mp_rank_XX_model_states.pt, one per model-parallel
rank; *_optim_states.pt, one per rank), `rng_rank_<r>.pt` per global rank (every rank's RNG streams
differ), `trainer_state.pt` (iteration, consumed samples, lambda schedule), `config.yaml`, and the marker
`complete`, written last by rank 0 after every rank has finished: `resume: auto` only trusts directories
that have it. `<dir>/latest` names the newest complete one. The last `keep_last` are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fpa_megatron.config import RunConfig, save_config

MARKER = "complete"
RESHARDED = "resharded.json"  # written by fpa-reshard in place of the per-rank RNG states


def _tag(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves every `interval` steps and at the end; resumes from the newest complete checkpoint."""

    def __init__(self, root: str | Path, interval: int, keep_last: int, resume: str, cfg: RunConfig):
        self.root = Path(root)
        self.interval, self.keep_last, self.resume_mode, self.cfg = interval, keep_last, resume, cfg

    def maybe_save(self, step: int, engine, trainer_state: dict, *, final: bool = False,
                   exiting: bool = False) -> Optional[Path]:
        """`step` = optimizer steps done. Saves on the interval, at the end (checkpoint.save_at_end), and
        always before an early exit (train.exit_interval), so that a rerun resumes where this one stopped."""
        due = ((self.interval > 0 and step % self.interval == 0) or (final and self.cfg.checkpoint.save_at_end)
               or exiting)
        return self.save(step, engine, trainer_state) if due else None

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        path = self.root / _tag(step)
        rank = dist.get_rank()
        if rank == 0 and path.exists():  # an incomplete leftover of a killed run
            shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=_tag(step), client_state={"trainer": trainer_state},
                               save_latest=False)
        torch.save(rng_state(), path / f"rng_rank_{rank}.pt")
        if rank == 0:
            torch.save(trainer_state, path / "trainer_state.pt")
            save_config(self.cfg, path / "config.yaml")
        dist.barrier()
        if rank == 0:
            (path / MARKER).write_text(f"{step}\n")
            tmp = self.root / "latest.tmp"
            tmp.write_text(_tag(step) + "\n")
            os.replace(tmp, self.root / "latest")
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def find_resume(self) -> Optional[Path]:
        if self.resume_mode == "none":
            return None
        if self.resume_mode == "auto":
            found = complete_checkpoints(self.root)
            return found[-1] if found else None
        path = Path(self.resume_mode)
        if not (path / MARKER).exists() and complete_checkpoints(path):
            path = complete_checkpoints(path)[-1]  # a checkpoint root: its newest complete checkpoint
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"checkpoint.resume={self.resume_mode!r} is not a complete checkpoint directory")
        return path

    def newest(self) -> Optional[Path]:
        """The newest complete checkpoint under the root (what a rollback after a loss spike reloads), or None."""
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(self, path: Path, engine) -> dict:
        """Restore model, optimizer (ZeRO partitions), RNG streams; return the trainer state."""
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        rng_file = path / f"rng_rank_{dist.get_rank()}.pt"
        if rng_file.exists() or not (path / RESHARDED).exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif dist.get_rank() == 0:  # RNG streams do not map across layouts: keep those seeded from train.seed
            print(f"{path} was resharded (fpa-reshard): RNG streams start from train.seed", flush=True)
        return client_state["trainer"]
