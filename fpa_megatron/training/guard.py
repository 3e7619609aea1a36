"""The training guard: after each forward/backward, all ranks decide together whether the update is kept.

Each rank contributes four flags to ONE all-reduce (MAX over the whole world, pipeline stages included):

- non-finite: the step's LM loss or penalty is NaN/inf, or a gradient that reached one of this rank's
  parameters was (`GradientProbe`: autograd hooks, so it sees gradients before DeepSpeed reduces them);
- spike: the LM loss is far above the recent ones, at any loss scale (`SpikeDetector`: above factor x their
  median AND above their median by more than an absolute floor and more than a multiple of their robust spread);
- stop: this rank received SIGTERM or SIGUSR1 (`StopSignals`);
- save: checkpoint.interval_minutes passed (only rank 0's clock sets it: `Checkpointer.time_due`), so that
  every rank saves a wall-clock checkpoint at the same step.

With train.slow_rank on, the same tensor also carries every rank's step time and data wait (each rank fills its
own two slots, the others' are 0, so the MAX leaves every rank's values): `rank_seconds`, which
training/slow_ranks.py judges. The flags, and so the decision, are the same with or without them.

The decision (`Verdict`) is made before `engine.step()`. That matters: DeepSpeed ZeRO-1/2 silently drops an
update whose gradient norm is not finite, while the step counter, the LR and the lambda schedules would
advance. Here a dropped update is dropped on every rank, counted, and the schedules stay where they are.
`conclude` keeps the counters and raises `RunStopped` (exit codes 81, 82) once a limit is passed.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fpa_megatron.config import TrainConfig
from fpa_megatron.exit_codes import Diverged, LossSpikeStop
from fpa_megatron.run_log import get_logger
from fpa_megatron.parallel.state import compute_device

log = get_logger("guard")

UPDATE, SKIP, ROLLBACK, STOP = "update", "skip", "rollback", "stop"  # what a Verdict asks for
ACTION_ON_SPIKE = {"warn": UPDATE, "skip": SKIP, "rollback": ROLLBACK, "stop": STOP}  # train.spike.policy


class GradientProbe:
    """Adds up the sum of every gradient that reaches the model's parameters during backward.

    In float64 a sum of finite float32/bf16 values stays finite, so the total is non-finite exactly when some
    gradient element was NaN or inf. One reduction per parameter and micro-batch, no copy of the gradients.
    """

    def __init__(self, model: torch.nn.Module):
        self.total = torch.zeros((), dtype=torch.float64, device=compute_device())
        self._hooks = [p.register_hook(self._add) for p in model.parameters() if p.requires_grad]

    def _add(self, grad: torch.Tensor) -> None:
        self.total += grad.detach().sum(dtype=torch.float64)

    def nonfinite(self) -> torch.Tensor:
        """0-d float tensor: 1.0 when a non-finite gradient was seen since the last reset."""
        return (~torch.isfinite(self.total)).to(torch.float64)

    def reset(self) -> None:
        self.total.zero_()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class SpikeDetector:
    """A loss is a spike when it is far above the last `window` recorded losses, whatever their scale.

    With m the median of the recorded losses and s their robust spread (1.4826 x the median absolute deviation:
    the standard deviation for normal noise, unmoved by a few outliers), a loss L is a spike when all three hold:

    - L > factor x m (train.spike.factor): the ratio test. At LM losses (2 to 10 nats) it is the binding one:
      a loss 3x the recent median is far outside step-to-step noise;
    - L - m > min_increase (train.spike.min_increase, nats): an absolute floor. A ratio means little near zero
      loss: at a median of 0.13 the ratio test fires at 0.4, i.e. on the noise of a model that already fits
      its data (mock data runs at losses of 0.001 to 0.6). With factor 3 the floor binds only below a median
      of min_increase / 2; above it the ratio test asks for the larger increase anyway;
    - L - m > deviations x s (train.spike.deviations; 0 turns the test off): a loss within a few robust
      standard deviations of the recent ones is their noise, at any scale (a noisy phase widens the bar, a
      steady phase leaves it at the other two tests).

    A loss that passes all three is far above the recent losses in ratio, in nats and in their own noise. The
    decision depends only on the recorded losses, which are the same on every rank (the guard all-reduces the
    flag anyway).
    """

    SPREAD_PER_MAD = 1.4826  # MAD x this = the standard deviation of normal noise

    def __init__(self, factor: float, window: int, min_history: int, min_increase: float = 0.0,
                 deviations: float = 0.0):
        self.factor, self.min_history = factor, min_history
        self.min_increase, self.deviations = min_increase, deviations
        self.history: deque[float] = deque(maxlen=window)

    def spread(self) -> float:
        """1.4826 x the median absolute deviation of the recorded losses (0.0 with none)."""
        if not self.history:
            return 0.0
        median = statistics.median(self.history)
        return self.SPREAD_PER_MAD * statistics.median(abs(x - median) for x in self.history)

    def threshold(self) -> Optional[float]:
        """The loss above which a step is a spike; None until min_history losses were recorded."""
        if len(self.history) < self.min_history:
            return None
        median = statistics.median(self.history)
        return max(self.factor * median, median + self.min_increase, median + self.deviations * self.spread())

    def describe(self, loss: float) -> str:
        """Why `loss` is a spike, with the numbers of each test (for the log)."""
        median = statistics.median(self.history)
        return (f"lm_loss {loss:.4f} > {self.factor:g} x median {median:.4f} of the last {len(self.history)} "
                f"steps, and above it by {loss - median:.4f} > max(min_increase {self.min_increase:g}, "
                f"{self.deviations:g} x spread {self.spread():.4f})")

    def is_spike(self, loss: float) -> bool:
        limit = self.threshold()
        return limit is not None and loss > limit

    def record(self, loss: float) -> None:
        self.history.append(float(loss))


@dataclass(frozen=True)
class Verdict:
    """What all ranks agreed to do with this step."""

    action: str  # UPDATE, SKIP, ROLLBACK or STOP
    nonfinite: bool = False
    spike: bool = False
    stop_requested: bool = False  # a SIGTERM/SIGUSR1 reached some rank: save after this step and exit
    save_due: bool = False  # rank 0's clock says checkpoint.interval_minutes passed: save after this step

    @property
    def update(self) -> bool:
        return self.action == UPDATE


class TrainingGuard:
    """Non-finite and spike guard for one run; `check` once per step, then `conclude` once the step is done."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, rank: int):
        self.max_consecutive_skips = cfg.max_consecutive_skips
        self.policy, self.max_rollbacks = cfg.spike.policy, cfg.spike.max_rollbacks
        self.spikes = SpikeDetector(cfg.spike.factor, cfg.spike.window, cfg.spike.min_history,
                                     cfg.spike.min_increase, cfg.spike.deviations)
        self.probe = GradientProbe(model)
        self.rank = rank
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.timed_ranks = world if cfg.slow_rank.factor and cfg.slow_rank.steps and world > 1 else 0
        self.rank_seconds: list[tuple[float, float]] = []  # last check: (step time, data wait) of every rank
        self.skipped_steps = 0  # steps whose update was dropped, since the start of training
        self.consecutive_skips = 0
        self.rollbacks = 0
        self._rollback_target: Optional[str] = None
        self._rollbacks_to_target = 0

    @property
    def sound(self) -> bool:
        """The last step was updated normally: its state may be saved (a skipped step's is never saved)."""
        return self.consecutive_skips == 0

    def check(self, step: int, lm_loss: float, penalty: float, stop_requested: bool,
              save_due: bool = False, step_seconds: float = 0.0, data_wait_seconds: float = 0.0) -> Verdict:
        """Combine every rank's flags (and step time and data wait) in one all-reduce and decide what to do
        with step `step`."""
        finite = math.isfinite(lm_loss) and math.isfinite(penalty)
        spike = finite and self.spikes.is_spike(lm_loss)
        local = [float(not finite), float(spike), float(stop_requested), float(save_due)]
        seconds = [0.0] * (2 * self.timed_ranks)
        if self.timed_ranks:
            seconds[2 * self.rank:2 * self.rank + 2] = [max(step_seconds, 0.0), max(data_wait_seconds, 0.0)]
        values = torch.tensor(local + seconds, dtype=torch.float64, device=self.probe.total.device)
        values = torch.cat([self.probe.nonfinite().reshape(1), values])
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the guard's one collective per step
        self.probe.reset()
        values = values.tolist()
        self.rank_seconds = list(zip(values[5::2], values[6::2]))
        bad_grads, bad_loss, spike, stop, save_due = (bool(x) for x in values[:5])
        nonfinite = bad_grads or bad_loss
        if nonfinite:
            action = SKIP
        elif spike:
            action = ACTION_ON_SPIKE[self.policy]
            if self.rank == 0:
                log.warning(f"step {step}: loss spike: {self.spikes.describe(lm_loss)} "
                            f"(train.spike.policy={self.policy})")
        else:
            action = UPDATE
        return Verdict(action, nonfinite=nonfinite, spike=spike, stop_requested=stop, save_due=save_due)

    def conclude(self, step: int, verdict: Verdict, applied: bool, lm_loss: float,
                 rolled_back_to: Optional[Path] = None) -> None:
        """Count the step's outcome; raise Diverged / LossSpikeStop when a limit is passed.

        `applied`: the optimizer really updated (DeepSpeed may still drop an update whose global gradient norm
        overflowed). `rolled_back_to`: the checkpoint a ROLLBACK reloaded (None: there was none, so skipped).
        """
        if verdict.action == STOP:
            raise LossSpikeStop(f"step {step}: loss spike with train.spike.policy=stop (lm_loss {lm_loss:.4f}); "
                                f"no checkpoint written", step)
        if verdict.action == ROLLBACK and rolled_back_to is not None:
            self._count_rollback(step, str(rolled_back_to))
            return
        if applied:
            self.consecutive_skips = 0
            self.spikes.record(lm_loss)
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.rank == 0:
            log.warning(f"step {step}: update skipped on every rank ({self._reason(verdict, lm_loss)}); "
                        f"{self.skipped_steps} skipped so far, {self.consecutive_skips} in a row "
                        f"(train.max_consecutive_skips={self.max_consecutive_skips})")
        if self.consecutive_skips > self.max_consecutive_skips:
            raise Diverged(f"step {step}: {self.consecutive_skips} steps in a row were skipped "
                           f"(more than train.max_consecutive_skips={self.max_consecutive_skips}); the run has "
                           f"diverged; nothing is saved after step {step - self.consecutive_skips}", step)

    def _reason(self, verdict: Verdict, lm_loss: float) -> str:
        if verdict.nonfinite:
            return f"loss or gradients not finite on some rank, lm_loss {lm_loss:.4g}"
        if verdict.spike:
            return "loss spike" + (", and no checkpoint to roll back to" if verdict.action == ROLLBACK else "")
        return "DeepSpeed found the global gradient norm not finite"

    def _count_rollback(self, step: int, target: str) -> None:
        same = target == self._rollback_target
        self._rollback_target = target
        self._rollbacks_to_target = self._rollbacks_to_target + 1 if same else 1
        self.rollbacks += 1
        self.consecutive_skips = 0
        if self._rollbacks_to_target > self.max_rollbacks:
            raise LossSpikeStop(f"step {step}: {self._rollbacks_to_target} rollbacks to {target} (more than "
                                f"train.spike.max_rollbacks={self.max_rollbacks}); stopping", step)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "rollbacks": self.rollbacks, "loss_history": list(self.spikes.history)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.rollbacks = int(state["rollbacks"])
        self.spikes.history.clear()
        self.spikes.history.extend(float(x) for x in state["loss_history"])
