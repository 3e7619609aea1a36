"""Spike forensics: a rolled-back step writes the global sample indices (dataset, documents) of its batch to the
run directory; `data.exclude_samples` takes them out of a rerun, and every other sample keeps its place, so a
resume under the same exclusions continues exactly."""

from __future__ import annotations

import json

import pytest

from fpa_megatron.data.datasets import MicroBatchSampler
from fpa_megatron.data.mixture import SampleOrder
from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, KEYS

DRILL = ["train.steps=6", "train.spike.min_history=2", "train.spike.window=4", "train.spike.policy=rollback"]


def test_the_order_without_excluded_samples_and_its_resume():
    excluded = [3, 9, 10, 40]
    reference = [i for i in range(100) if i not in excluded]  # the order, written out
    order = SampleOrder(excluded)
    assert order.samples(0, 90) == reference[:90]
    for rank in (0, 1):
        straight = list(MicroBatchSampler(100, 0, 2, rank, 2, order))
        assert [i for batch in straight for i in batch] == [i for k, i in enumerate(reference[:96]) if (k // 2) % 2 == rank]
        assert list(MicroBatchSampler(100, 8, 2, rank, 2, order)) == straight[2:]  # a resume at position 8
    assert SampleOrder().samples(5, 3) == [5, 6, 7]


def drill_rank(values: dict, overrides: list[str], fault: str = ""):
    import os

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    os.environ["FPA_FAULT"] = fault  # tests and drills only
    return [{k: h[k] for k in KEYS + ("step",)} for h in train(config_from_dict(values, overrides))]


def test_a_rolled_back_steps_samples_are_written_and_left_out_of_the_rerun(tmp_path):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)},
              "checkpoint": {"interval": 2, "save_at_end": False, "resume": "auto"}}
    run_distributed(drill_rank, 2, values, DRILL + ["logging.run_name=spiked"], "spike@5")
    record = json.loads((tmp_path / "spiked" / "forensics" / "step_0000005.json").read_text())
    assert record["step"] == 5 and record["reason"] == "loss spike (rollback)"
    assert [s["sample"] for s in record["samples"]] == list(range(32, 40))  # 4 steps x 8 samples came before
    assert all(s["dataset"] == "mock" and s["documents"] for s in record["samples"])
    assert sorted(p.name for p in (tmp_path / "spiked" / "forensics").iterdir()) == ["step_0000005.json"]

    forensics = str(tmp_path / "spiked" / "forensics" / "step_0000005.json")
    clean = run_distributed(drill_rank, 2, values, DRILL + ["logging.run_name=clean"])[0]
    excluded = run_distributed(drill_rank, 2, values, DRILL + ["logging.run_name=excluded",
                                                              f"data.exclude_samples=[{forensics}]"])[0]
    assert [h["lm_loss"] for h in excluded[:4]] == [h["lm_loss"] for h in clean[:4]]  # samples 0-31 as before
    assert excluded[4]["lm_loss"] != clean[4]["lm_loss"]  # step 5 trains on 40-47, not on 32-39
    # a resume under the same exclusions: from the step-4 checkpoint, the straight run's steps 5 and 6
    resumed_values = {**values, "checkpoint": {**values["checkpoint"], "resume": str(tmp_path / "excluded" /
                                                                                    "checkpoints" / "iter_0000004")}}
    resumed = run_distributed(drill_rank, 2, resumed_values, DRILL + ["logging.run_name=resumed",
                                                                     f"data.exclude_samples=[{forensics}]"])[0]
    assert [h["step"] for h in resumed] == [5, 6]
    for mine, want in zip(resumed, excluded[4:]):
        for key in KEYS:
            assert mine[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (mine["step"], key)
