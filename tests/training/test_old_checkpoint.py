"""A checkpoint written by an earlier version of the code (committed under tests/fixtures) still loads and
resumes on the exact trajectory: module moves must not change what a checkpoint file holds or needs.

The fixture is iter_0000002 of a 2-rank DP2 ZeRO-1 run (4 steps, a checkpoint every 2) written at commit
6379141, with that run's straight metrics for steps 1-4 beside it (straight_run.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fpa_megatron.testing import run_distributed

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoint_dp2_zero1_6379141"
KEYS = ("step", "lm_loss", "penalty", "lambda", "lr", "grad_norm")
VALUES = {  # the config the fixture was written with (its own config.yaml says the same)
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 128},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"interval": 2, "save_at_end": False, "resume": "auto", "keep_last": 5},
    "logging": {"interval": 1, "tensorboard": False, "run_name": "old"},
}


def train_rank(values: dict):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return [{k: h[k] for k in KEYS} for h in train(config_from_dict(values))]


def test_a_checkpoint_of_the_earlier_code_resumes_on_its_trajectory(tmp_path):
    checkpoints = tmp_path / "old" / "checkpoints"
    shutil.copytree(FIXTURE, checkpoints, ignore=shutil.ignore_patterns("straight_run.json"))
    straight = json.loads((FIXTURE / "straight_run.json").read_text())["straight_run"]
    history = run_distributed(train_rank, 2, {**VALUES, "logging": {**VALUES["logging"], "dir": str(tmp_path)}})[0]
    assert [h["step"] for h in history] == [3, 4]  # resumed at step 2, not started over
    for got, want in zip(history, straight[2:]):
        for key in KEYS[1:]:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)
    assert (checkpoints / "iter_0000004" / "complete").exists()
