"""A slow rank is named: two real gloo ranks (data parallel 2) of a tiny GPT, once as they are and once with
FPA_FAULT=slow_rank@2+:1 (rank 1 sleeps as each step from step 2 starts). The slow run's log names rank 1 with
its host and coordinates, once, and TensorBoard's `ranks/` scalars read back say the same; the calm run names
nobody."""

from __future__ import annotations

import socket

import pytest

from fpa_megatron.testing import run_distributed
from fpa_megatron.training.slow_ranks import ratios_to_the_others
from tests.training.test_trainer import BASE

STEPS, SLOW_FROM, IN_A_ROW = 6, 2, 3  # named at step SLOW_FROM + IN_A_ROW - 1 = 4


def two_runs(root: str) -> dict:
    """The calm run, then the slow one; each rank's log lines of each run in <root>/<run>_rank<R>.txt."""
    import logging
    import os
    from pathlib import Path

    import torch.distributed as dist

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.run_log import setup_logging
    from fpa_megatron.training.trainer import train

    rank, out = dist.get_rank(), {}
    values = {**BASE, "logging": {**BASE["logging"], "dir": root, "tensorboard": True},
              "train": {**BASE["train"], "steps": STEPS, "slow_rank": {"steps": IN_A_ROW}}}
    for name, fault in (("calm", None), ("slow", f"slow_rank@{SLOW_FROM}+:1")):
        handler = logging.FileHandler(Path(root) / f"{name}_rank{rank}.txt")
        setup_logging(rank).addHandler(handler)
        if fault:
            os.environ["FPA_FAULT"] = fault
        try:
            history = train(config_from_dict(values, [f"logging.run_name={name}"]))
        finally:
            os.environ.pop("FPA_FAULT", None)
            setup_logging(rank).removeHandler(handler)
            handler.close()
        out[name] = [(h["step"], h["slow_ranks"]) for h in history]
        out[f"{name}_losses"] = [h["lm_loss"] for h in history]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow_rank")
    return run_distributed(two_runs, 2, str(root), timeout_s=300), root


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag.startswith("ranks/")}


def test_the_slow_rank_names_itself_with_host_and_coordinates(runs):
    results, root = runs
    slow, calm = (root / "slow_rank1.txt").read_text(), (root / "slow_rank0.txt").read_text()
    named = [line for line in slow.splitlines() if "slow rank:" in line]
    assert len(named) == 1, slow  # once, when the streak reaches train.slow_rank.steps
    assert (f"step {SLOW_FROM + IN_A_ROW - 1}: slow rank: rank 1 (host {socket.gethostname()}, TP 0, CP 0, PP 0, "
            f"DP 1): its step took ") in named[0], named[0]
    assert f"{IN_A_ROW} steps in a row (train.slow_rank.factor=2)" in named[0], named[0]
    assert "slow rank" not in calm
    # every rank judged the same times: both histories count the slow rank from the step it was named
    expected = [(step, int(step >= SLOW_FROM + IN_A_ROW - 1)) for step in range(1, STEPS + 1)]
    assert results[0]["slow"] == results[1]["slow"] == expected
    # the times ride in the guard's all-reduce and change nothing else: the same losses, bit for bit
    assert results[0]["slow_losses"] == results[0]["calm_losses"]


def test_tensorboard_has_the_slowest_rank_and_its_ratio(runs):
    _, root = runs
    scalars = _scalars(root / "slow")
    steps = list(range(1, STEPS + 1))
    assert set(scalars) == {"ranks/slowest_step_time_ratio", "ranks/slowest_rank", "ranks/slow_ranks",
                            "ranks/step_time_s_median", "ranks/data_wait_s_max", "ranks/data_wait_s_median"}
    assert all(sorted(by_step) == steps for by_step in scalars.values())  # logging.interval = 1
    ratio, slowest = scalars["ranks/slowest_step_time_ratio"], scalars["ranks/slowest_rank"]
    for step in range(SLOW_FROM, STEPS + 1):  # the sleep: >= 1 s and 2x the step before
        assert slowest[step] == 1 and ratio[step] > 2, (step, ratio[step])  # train.slow_rank.factor
    assert scalars["ranks/slow_ranks"] == {step: float(step >= SLOW_FROM + IN_A_ROW - 1) for step in steps}
    assert all(0 <= wait < 1 for wait in scalars["ranks/data_wait_s_max"].values())  # mock data: no wait


def test_a_run_without_the_fault_names_nobody(runs):
    results, root = runs
    for rank in (0, 1):
        assert "slow rank" not in (root / f"calm_rank{rank}.txt").read_text()
        assert [count for _, count in results[rank]["calm"]] == [0] * STEPS
    assert set(_scalars(root / "calm")["ranks/slow_ranks"].values()) == {0.0}


def test_each_rank_is_compared_with_the_median_of_the_others():
    assert ratios_to_the_others([1.0, 3.0]) == [1 / 3, 3.0]  # two ranks: the other one's time
    assert ratios_to_the_others([1.0, 1.0, 2.0, 8.0]) == [1 / 2, 1 / 2, 2.0, 8.0]
    assert ratios_to_the_others([0.0, 0.0, 5.0]) == [0.0, 0.0, 1.0]  # no time to compare with: not slow
