"""One-line stdout progress plus TensorBoard scalars and [layers x heads] heatmaps (penalty, attention entropy).

Only the logging rank constructs an enabled `MetricsLogger`; on every other rank it is a no-op, so the
trainer can call it unconditionally. Lines go to the run log (`fpa_megatron.run_log`: timestamp and
rank in front), or to `stream` when one is given. Tags are stable (see `TAGS`) so runs compare in one TensorBoard.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, TextIO

import numpy as np

from fpa_megatron.attention.stats import attention_summary, per_layer
from fpa_megatron.config import LoggingConfig
from fpa_megatron.run_log import get_logger
from fpa_megatron.training.trackers import Tracker

# metric key passed to `log` -> (TensorBoard tag, stdout label, stdout format)
TAGS: dict[str, tuple[str, str, str]] = {
    "lm_loss": ("train/lm_loss", "lm_loss", "{:.4f}"),
    "penalty": ("train/penalty", "penalty", "{:.4g}"),
    "penalty_weighted": ("train/penalty_weighted", "lambda*penalty", "{:.2e}"),
    "z_loss": ("train/z_loss", "z_loss", "{:.3e}"),  # optimizer.z_loss * mean (log Z)^2; only with z-loss on
    "lambda": ("train/lambda", "lambda", "{:.1e}"),
    "lr": ("train/lr", "lr", "{:.1e}"),
    "grad_norm": ("train/grad_norm", "grad_norm", "{:.3f}"),
    "global_batch_size": ("train/global_batch_size", "batch", "{:.0f}"),  # samples of the step (ramp-up)
    "skipped_steps": ("train/skipped_steps", "skipped", "{:.0f}"),  # updates dropped by the guard so far
    "rollbacks": ("train/rollbacks", "rollbacks", "{:.0f}"),
    "tokens_per_s": ("perf/tokens_per_s", "tok/s", "{:.0f}"),
    "tflops": ("perf/tflops", "TFLOP/s", "{:.2f}"),
    "mfu": ("perf/mfu", "MFU", "{:.1%}"),
    "iter_time_s": ("perf/iter_time_s", "iter", "{:.2f}s"),
    "mem_gb": ("perf/mem_gb", "mem", "{:.1f}GB"),
}

# matplotlib's viridis at 0, 0.1, ..., 1 (perceptually uniform, brightness rises monotonically)
_VIRIDIS = np.array([
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
    (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
], dtype=np.float64)
_NAN_RGB = (128, 128, 128)


def memory_gb() -> float:
    """Peak device memory (GPU: torch.cuda.max_memory_allocated) or the process's resident memory (CPU), in GB."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 1e9
    except ImportError:  # peak RSS in KiB on Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def colormap(values: np.ndarray) -> np.ndarray:
    """[R, C] floats -> [R, C, 3] uint8 viridis, min-max scaled; non-finite cells grey."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if finite.any():
        lo, hi = values[finite].min(), values[finite].max()
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        scaled = np.zeros_like(values)
    scaled = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.floor(scaled).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (scaled - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    rgb[~finite] = _NAN_RGB
    return np.rint(rgb).astype(np.uint8)


def heatmap_image(matrix: np.ndarray, cell_px: int = 16) -> np.ndarray:
    """[L, H] matrix -> [L*cell_px, H*cell_px, 3] uint8 image; row i = layer i (top), column j = head j."""
    rgb = colormap(matrix)
    return np.repeat(np.repeat(rgb, cell_px, axis=0), cell_px, axis=1)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


class MetricsLogger:
    """Training metrics to stdout (one line per call) and TensorBoard; a no-op unless enabled.

    `log(step, metrics)` takes the keys of `TAGS` (others are written as `train/<key>`, or verbatim when they
    contain a '/'); `mfu` is a fraction, `penalty` is the unweighted F, `penalty_weighted` is lambda_t * F.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool = True, tensorboard: bool = True,
                 total_steps: Optional[int] = None, cell_px: int = 16, stream: Optional[TextIO] = None,
                 interval: int = 1, heatmap_interval: int = 0, trackers: Sequence[Tracker] = ()):
        self.enabled = bool(enabled)
        self.total_steps = total_steps
        self.interval, self.heatmap_interval = interval, heatmap_interval or interval
        self.trackers = list(trackers) if self.enabled else []
        self.cell_px = cell_px
        self.stream = stream
        self.writer = None
        if self.enabled and tensorboard:
            if log_dir is None:
                raise ValueError("MetricsLogger: tensorboard=True needs a log_dir")
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))

    @classmethod
    def for_run(cls, cfg: LoggingConfig, log_dir: str, enabled: bool, total_steps: int,
                trackers: Sequence[Tracker] = ()) -> "MetricsLogger":
        """The trainer's logger: `logging.interval` for the step lines, `logging.heatmap_interval` (else the
        interval) for the per-layer penalty and its heatmap; every scalar and image also to `trackers`."""
        return cls(log_dir, enabled=enabled, tensorboard=cfg.tensorboard, total_steps=total_steps,
                   interval=cfg.interval, heatmap_interval=cfg.heatmap_interval, trackers=trackers)

    def _scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard and every tracker: the same tags and values."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def _image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
        for tracker in self.trackers:
            tracker.image(step, tag, image)

    def log_step(self, step: int, metrics: Mapping[str, float], penalty_matrix, applied: bool, final: bool) -> None:
        """A training step, on this logger's cadence: the line and scalars every `interval` steps, at step 1, at
        the last step and at every step whose update was not applied; the penalty per layer and its [layers x
        heads] heatmap every `heatmap_interval` steps and at the last."""
        if step % self.interval == 0 or step == 1 or final or not applied:
            self.log(step, metrics)
        if step % self.heatmap_interval == 0 or final:
            self.log_penalty(step, penalty_matrix.sum(dim=1), penalty_matrix)

    def _print(self, line: str) -> None:
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        else:  # the run log: a timestamp and the rank in front of the line
            get_logger("metrics").info(line)

    def _step_text(self, step: int) -> str:
        return f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"

    def format_line(self, step: int, metrics: Mapping[str, float]) -> str:
        """The stdout line for `log`: known keys in `TAGS` order, then the others."""
        parts = [self._step_text(step)]
        for key, (_, label, fmt) in TAGS.items():
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {fmt.format(float(metrics[key]))}")
        for key, value in metrics.items():
            if key not in TAGS and value is not None:
                parts.append(f"{key} {float(value):.4g}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Print one line and write each metric as a scalar at `step`."""
        if not self.enabled:
            return
        self._print(self.format_line(step, metrics))
        self._scalars(step, {TAGS[key][0] if key in TAGS else (key if "/" in key else f"train/{key}"): float(value)
                             for key, value in metrics.items() if value is not None})

    def log_penalty(self, step: int, per_layer, per_head) -> None:
        """Per-layer penalty scalars `penalty/layer_XX` and the [layers x heads] image `penalty/heads_heatmap`."""
        if not self.enabled or (self.writer is None and not self.trackers):
            return
        layers = _as_numpy(per_layer).reshape(-1)
        heads = _as_numpy(per_head)
        if heads.ndim != 2:
            raise ValueError(f"per_head must be [layers, heads], got shape {heads.shape}")
        self._scalars(step, {f"penalty/layer_{i:02d}": float(value) for i, value in enumerate(layers)})
        self._image(step, "penalty/heads_heatmap", heatmap_image(heads, self.cell_px))

    def log_attention(self, step: int, stats) -> None:
        """Attention diagnostics ({stat: [layers, heads]} from `AttentionStats.reduce`): one stdout line, the
        whole-model scalars `attention/<stat>` (+ `attention/entropy_min`, the lowest head entropy), per layer
        `attention/<stat>/layer_XX` (mean over heads; max for max_logit) and the image
        `attention/entropy_heatmap` (rows = layers, columns = heads, darker = lower entropy: collapsing heads)."""
        if not self.enabled:
            return

        summary = attention_summary(stats)
        self._print(f"attention {self._step_text(step)} | collision {summary['attention/collision']:.4f} | "
                    f"entropy {summary['attention/entropy']:.3f} (lowest head {summary['attention/entropy_min']:.3f})"
                    f" | max_logit {summary['attention/max_logit']:.2f}")
        values = dict(summary)
        for stat, layers in per_layer(stats).items():
            values.update({f"attention/{stat}/layer_{i:02d}": float(v)
                           for i, v in enumerate(_as_numpy(layers).reshape(-1))})
        self._scalars(step, values)
        self._image(step, "attention/entropy_heatmap", heatmap_image(_as_numpy(stats["entropy"]), self.cell_px))

    def log_memory(self, step: int, predicted_gb: float, measured_gb: float, source: str, stage: int) -> None:
        """The planner's prediction next to the measured peak: one line and `memory/predicted_gb`,
        `memory/measured_gb`, `memory/measured_over_predicted`."""
        if not self.enabled:
            return
        ratio = measured_gb / predicted_gb
        self._print(f"memory {self._step_text(step)} | predicted {predicted_gb:.3f} GB (fpa-plan, stage {stage}) | "
                    f"measured {measured_gb:.3f} GB ({source}) | measured/predicted {ratio:.2f}")
        self._scalars(step, {"memory/predicted_gb": predicted_gb, "memory/measured_gb": measured_gb,
                             "memory/measured_over_predicted": ratio})

    def log_eval(self, step: int, val_loss: float, name: Optional[str] = None) -> None:
        """Validation loss and perplexity: `val/loss`, `val/ppl` (a named set: `val/<name>/loss`,
        `val/<name>/ppl`) and one stdout line."""
        if not self.enabled:
            return
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        label, tag = ("", "val") if name is None else (f"[{name}]", f"val/{name}")
        self._print(f"eval {self._step_text(step)} | val_loss{label} {val_loss:.4f} | val_ppl{label} {ppl:.2f}")
        self._scalars(step, {f"{tag}/loss": float(val_loss), f"{tag}/ppl": ppl})
        self.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def log_ranks(self, step: int, values: Mapping[str, float], final: bool = False, changed: bool = False) -> None:
        """Every rank's step time and data wait in a few `ranks/` scalars (training/slow_ranks.py): on the step
        lines' cadence, at the last step, and whenever a rank is named slow or recovers (`changed`)."""
        if self.enabled and (step % self.interval == 0 or step == 1 or final or changed):
            self._scalars(step, values)

    def log_rollback(self, step: int, to_step: int) -> None:
        """A rollback, marked in the curves: `train/rolled_back_to_step` at the step that rolled back."""
        if self.enabled:
            self._scalars(step, {"train/rolled_back_to_step": float(to_step)})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
