"""Experiment trackers beside TensorBoard: the metrics logger sends every scalar and image to each of them.

A tracker is one small class with the `Tracker` interface; `WandbTracker` is Weights & Biases (optional: `pip
install -e .[wandb]`; `logging.wandb.mode: offline` needs no network, `wandb sync <dir>` uploads later). Its run id
is saved in every checkpoint (`TrainState.tracker_run_id`), so a resume, a requeue or an elastic restart
continues the same tracker run, and a rollback is logged into it as `train/rolled_back_to_step`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fpa_megatron.config import RunConfig, config_to_dict


class Tracker:
    """What the metrics logger needs of a tracker."""

    run_id: Optional[str] = None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """`image`: [height, width, 3] uint8."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    def __init__(self, cfg: RunConfig, run_dir: str, run_id: Optional[str], layout: Mapping):
        import wandb  # optional dependency (the [wandb] extra)

        w = cfg.logging.wandb
        self._wandb = wandb
        self.run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=w.dir or run_dir,
                              id=run_id, resume="allow", name=cfg.logging.run_name,
                              config={**config_to_dict(cfg), "layout": dict(layout)}, settings=wandb.Settings(
                                  silent=True, console="off"))
        self.run_id = self.run.id

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self._wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def trackers_for_run(cfg: RunConfig, run_dir: str, run_id: Optional[str], layout: Mapping) -> list[Tracker]:
    """The trackers the config asks for (on the logging rank only)."""
    return [WandbTracker(cfg, run_dir, run_id, layout)] if cfg.logging.wandb.project else []
