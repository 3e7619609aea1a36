"""What a run logged, read back from its TensorBoard files: shared by the launcher drills."""

from __future__ import annotations

from pathlib import Path


def losses_per_attempt(run_dir: Path) -> list[dict[int, float]]:
    """train/lm_loss by step from each TensorBoard event file (one per attempt), oldest first."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    attempts = []
    for path in run_dir.glob("events.out.tfevents.*"):
        events = list(LegacyEventFileLoader(str(path)).Load())
        losses = {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == "train/lm_loss"}
        attempts.append((events[0].wall_time, losses))
    return [losses for _, losses in sorted(attempts, key=lambda a: a[0])]
