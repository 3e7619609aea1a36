"""The planner against reality: at the first step every rank's measured peak (live tensor bytes on CPU) next to
what `fpa-plan`'s memory model predicts for its pipeline stage, in the log and TensorBoard; a warning past 25 %."""

from __future__ import annotations

import pytest

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE

TOLERANCE = 0.15  # what the planner promises (tests/planner/test_memory_model.py)


def memory_rank(values: dict, overrides: list[str], warn_fraction=None):
    import logging

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.run_log import LOGGER_NAME
    from fpa_megatron.training import memory_check
    from fpa_megatron.training.trainer import train

    if warn_fraction is not None:
        memory_check.WARN_FRACTION = warn_fraction
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage()) if record.levelno >= logging.WARNING else None
    logging.getLogger(LOGGER_NAME).addHandler(handler)  # the run log (it does not propagate to the root)
    history = train(config_from_dict(values, overrides))
    memory = [{k: v for k, v in h.items() if k.startswith("memory_")} for h in history]
    return memory, [w for w in warnings if "fpa-plan predicts" in w]


@pytest.mark.parametrize("world,overrides", [(2, ["parallel.pipeline=2"]), (2, ["parallel.tensor=2"])],
                         ids=["pp2", "tp2"])
def test_the_first_step_holds_what_the_planner_predicts(tmp_path, world, overrides):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path), "tensorboard": True}}
    run = run_distributed(memory_rank, world, values, overrides + ["model.seq_length=256", "train.steps=2",
                                                                    "logging.run_name=mem"])
    for memory, warnings in run:
        first, second = memory
        ratio = first["memory_measured_gb"] / first["memory_predicted_gb"]
        assert abs(ratio - 1) <= TOLERANCE, (overrides, first)
        assert second == {} and warnings == []  # on CPU: the first step only; no warning within 25 %
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "mem"), size_guidance={"scalars": 0})  # rank 0's, read back
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("memory/measured_over_predicted")]
    assert [step for step, _ in logged] == [1]
    assert logged[0][1] == pytest.approx(run[0][0][0]["memory_measured_gb"] / run[0][0][0]["memory_predicted_gb"],
                                         rel=1e-5)


def test_a_measured_peak_far_from_the_plan_is_a_warning_naming_both(tmp_path):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    [(memory, warnings)] = run_distributed(memory_rank, 1, values, ["train.steps=1", "logging.run_name=warn"], 0.0)
    measured, predicted = memory[0]["memory_measured_gb"], memory[0]["memory_predicted_gb"]
    assert len(warnings) == 1, warnings
    assert (f"step 1: pipeline stage 0 measured {measured:.3f} GB (live tensor bytes)" in warnings[0]
            and f"the {predicted:.3f} GB fpa-plan predicts for this layout (TP1 PP1 DP1" in warnings[0]), warnings
