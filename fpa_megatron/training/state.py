"""The trainer's state: where the run is, saved in every checkpoint and restored in one place.

`step` counts the global batches consumed (a skipped or rolled-back step consumes its batch); `updates` counts
the optimizer updates applied, which the LR and lambda schedules follow. The global batch of the next step (and
its micro-batches) follows `consumed_samples` through the batch-size ramp, so a resume mid-ramp needs no
more than the samples. The lambda schedule and the guard own their counters; `mixture` records the samples each
dataset of the blend gave (data/mixture.py; set by the trainer once the data is built, None with mock data);
`state_dict()` is what `trainer_state.pt` holds (the keys are the checkpoint format's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fpa_megatron.data.mixture import STATE_KEY as MIXTURE_KEY, MixtureRecord
from fpa_megatron.schedules import BatchSizeRamp, LambdaSchedule
from fpa_megatron.training.guard import TrainingGuard


@dataclass
class TrainState:
    lambdas: LambdaSchedule
    guard: TrainingGuard
    batch_sizes: BatchSizeRamp
    step: int = 0  # global batches consumed
    consumed_samples: int = 0
    updates: int = 0  # optimizer updates applied
    first_step: int = field(default=0, init=False)  # where this process started (resumed or 0)
    tracker_run_id: Optional[str] = None  # the experiment tracker's run (W&B), continued on resume
    mixture: Optional[MixtureRecord] = None  # the data mixture and what each of its datasets gave

    def global_batch_size(self) -> int:
        """The samples of the next step (all DP ranks)."""
        return self.batch_sizes.global_batch_size(self.consumed_samples)

    def num_microbatches(self) -> int:
        """The micro-batches of the next step, per data-parallel rank."""
        return self.batch_sizes.num_microbatches(self.consumed_samples)

    def advance(self, applied: bool) -> None:
        """One step done: its batch is consumed whatever happened to its update; an applied update moves the
        schedules."""
        self.consumed_samples += self.global_batch_size()
        self.step += 1
        if applied:
            self.updates += 1
            self.lambdas.advance()

    def steps_this_run(self) -> int:
        return self.step - self.first_step

    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only (read back with weights_only=True)."""
        state = {"step": self.step, "consumed_samples": self.consumed_samples, "updates": self.updates,
                 "lambda_schedule": self.lambdas.state_dict(), "guard": self.guard.state_dict()}
        if self.tracker_run_id is not None:
            state["tracker_run_id"] = self.tracker_run_id
        if self.mixture is not None:
            state[MIXTURE_KEY] = self.mixture.state_dict(self.consumed_samples)
        return state

    def load_state_dict(self, saved: dict, *, rollback: bool = False) -> None:
        """Resume: everything. Rollback (after a loss spike): the model's schedules only, i.e. updates and lambda;
        the data position moves on (the batches after the checkpoint are not replayed) and the guard keeps its
        counts (it limits rollbacks)."""
        self.updates = saved.get("updates", saved["step"])  # saved before updates were counted: one per step
        self.lambdas.load_state_dict(saved["lambda_schedule"])
        if rollback:
            return
        self.step, self.consumed_samples = saved["step"], saved["consumed_samples"]
        self.first_step = self.step
        if "guard" in saved:
            self.guard.load_state_dict(saved["guard"])
        self.tracker_run_id = saved.get("tracker_run_id", self.tracker_run_id)
