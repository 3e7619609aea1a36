"""The pure schedules of a run: the FPA weight lambda_t, the learning rate and the global batch size.

- `LambdaSchedule`: lambda_t = lambda_0 * gamma^t per optimizer update, and the cut-off below which FPA is not
  computed at all.
- `lr_at(t, cfg, total_steps)`: the learning rate of update t (0-based): a linear warmup, then
  `optimizer.lr_schedule` (cosine, wsd, constant, inverse_sqrt). A function of t and the config only, so a
  resume with another schedule (the cooldown of a WSD checkpoint) follows the new config from its step on.
- `BatchSizeRamp`: the global batch size as a function of the consumed samples (Megatron-LM's
  `--rampup-batch-size`), hence the micro-batches per step; a resume mid-ramp needs nothing but the samples.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from fpa_megatron.config import OptimizerConfig


class LambdaSchedule:
    """The FPA weight schedule. `step` is the number of optimizer steps taken (t), saved in checkpoints.

    `active()` is False once lambda_t < min_lambda (or lambda_0 = 0, or FPA disabled): the attention then
    skips the penalty entirely, so late training pays nothing for it.
    """

    def __init__(self, lambda0: float, gamma: float, min_lambda: float = 0.0, enabled: bool = True):
        if not (isinstance(lambda0, (int, float)) and math.isfinite(lambda0) and lambda0 >= 0):
            raise ValueError(f"fpa.lambda0={lambda0!r}: must be a finite number >= 0")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"fpa.gamma={gamma!r}: must satisfy 0 < gamma <= 1")
        if not (isinstance(min_lambda, (int, float)) and math.isfinite(min_lambda) and min_lambda >= 0):
            raise ValueError(f"fpa.min_lambda={min_lambda!r}: must be a finite number >= 0")
        self.lambda0, self.gamma, self.min_lambda, self.enabled = float(lambda0), float(gamma), float(min_lambda), enabled
        self.step = 0

    def value(self, step: int | None = None) -> float:
        """lambda_t for optimizer step t (default: the current step)."""
        t = self.step if step is None else step
        if not self.enabled:
            return 0.0
        return self.lambda0 * self.gamma ** t

    def active(self, step: int | None = None) -> bool:
        lam = self.value(step)
        return self.enabled and lam > 0.0 and lam >= self.min_lambda

    def advance(self) -> None:
        """Called once per optimizer step, after the step."""
        self.step += 1

    def state_dict(self) -> dict:
        return {"lambda0": self.lambda0, "gamma": self.gamma, "min_lambda": self.min_lambda,
                "enabled": self.enabled, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        for key in ("lambda0", "gamma", "min_lambda", "enabled"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint has fpa {key}={state[key]!r} but the config has {getattr(self, key)!r}")
        self.step = int(state["step"])


# ------------------------------------------------------------------------------------------ learning rate

# WSD's decay shapes: the factor on (lr - min_lr) at progress p in [0, 1] of the decay phase
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


def decay_end(cfg: OptimizerConfig, total_steps: int) -> int:
    """The update at which the cosine / WSD decay reaches min_lr: optimizer.decay_steps, else train.steps."""
    return cfg.decay_steps or total_steps


def wsd_decay_start(cfg: OptimizerConfig, total_steps: int) -> int:
    """The update at which WSD's decay begins: optimizer.decay_start, else the end minus decay_fraction of it."""
    end = decay_end(cfg, total_steps)
    if cfg.decay_start is not None:
        return cfg.decay_start
    return end - int(round(cfg.decay_fraction * end))


def _cosine(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    end = decay_end(cfg, total_steps)
    if step >= end:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _wsd(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    start, end = wsd_decay_start(cfg, total_steps), decay_end(cfg, total_steps)
    if step < start:
        return cfg.lr
    if step >= end:
        return cfg.min_lr
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * DECAY_SHAPES[cfg.decay_style]((step - start) / (end - start))


def _constant(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    return cfg.lr


def _inverse_sqrt(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    return max(cfg.min_lr, cfg.lr * math.sqrt(max(cfg.warmup_steps, 1) / (step + 1)))


AFTER_WARMUP = {"cosine": _cosine, "wsd": _wsd, "constant": _constant, "inverse_sqrt": _inverse_sqrt}


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """The learning rate of update `step` (0-based): cfg.lr * (step + 1) / warmup_steps during the warmup, then
    cfg.lr_schedule's value. total_steps (train.steps) ends the cosine / WSD decay unless decay_steps is set."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return AFTER_WARMUP[cfg.lr_schedule](step, cfg, total_steps)


# ------------------------------------------------------------------------------------------ batch size


class BatchSizeRamp:
    """The global batch size of the next step as a function of the samples consumed so far.

    `rampup` = (start, increment, samples), Megatron-LM's `--rampup-batch-size`: the batch starts at `start` and
    grows by `increment` each time another samples / ((global - start) / increment) samples were consumed, up to
    `global_batch_size` (reached once more than `samples` were consumed). None: always global_batch_size.
    `per_microbatch` = micro_batch_size * data_parallel: the samples of one micro-batch on all DP ranks.
    """

    def __init__(self, global_batch_size: int, per_microbatch: int, rampup: Optional[Sequence[int]] = None):
        self.final, self.per_microbatch = int(global_batch_size), int(per_microbatch)
        self.start, self.increment, self.samples = (int(v) for v in (rampup or (global_batch_size, 1, 0)))
        self.increments = (self.final - self.start) // self.increment

    def global_batch_size(self, consumed_samples: int) -> int:
        if self.increments == 0 or consumed_samples > self.samples:
            return self.final
        # int(consumed / (samples / increments)) as Megatron-LM, in exact integer arithmetic
        done = consumed_samples * self.increments // self.samples if self.samples else self.increments
        return min(self.final, self.start + done * self.increment)

    def num_microbatches(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank of the next step."""
        return self.global_batch_size(consumed_samples) // self.per_microbatch

    def sizes(self) -> list[int]:
        """Every global batch size the ramp passes through, the final one last."""
        return [self.start + i * self.increment for i in range(self.increments)] + [self.final]
