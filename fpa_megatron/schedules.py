"""lambda_t = lambda_0 * gamma^t per optimizer step, and the cut-off below which FPA is not computed at all."""

from __future__ import annotations

import math


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
