"""Batch-size ramp-up (`train.rampup_batch_size`, Megatron-LM's `--rampup-batch-size`): the global batch of each
step follows the consumed samples, a resume in the middle of the ramp equals the straight run, and the config
check and the planner size the run by the final batch. Training runs on real gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch

from fpa_megatron.config import config_from_dict
from fpa_megatron.rules import check_values
from fpa_megatron.testing import run_distributed
from tests.config_errors import assert_config_error

RAMP = [2, 2, 12]  # start 2, +2 every 12 / ((8 - 2) / 2) = 4 samples, final train.global_batch_size = 8
BASE = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 8, "micro_batch_size": 1, "global_batch_size": 8, "eval_interval": 0, "seed": 3,
              "rampup_batch_size": RAMP},
    "checkpoint": {"save_at_end": False, "resume": "auto"},
    "logging": {"interval": 1, "tensorboard": False},
}
KEYS = ("step", "lm_loss", "penalty", "lambda", "lr", "grad_norm", "global_batch_size")


def megatron_batch_sizes(steps: int, final: int, start: int, increment: int, samples: int) -> list[int]:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, step after step, as it is written there."""
    per_increment = samples / ((final - start) / increment)
    consumed, sizes = 0, []
    for _ in range(steps):
        size = final if consumed > samples else start + int(consumed / per_increment) * increment
        sizes.append(size)
        consumed += size
    return sizes


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.training.trainer import train

    return [{k: h[k] for k in KEYS} for h in train(config_from_dict(values, overrides))]


LAYOUTS = {"dp2": (["parallel.pipeline=1"], 2), "pp2": (["parallel.pipeline=2"], 1)}  # overrides, DP


def _run(tmp_path, overrides: list[str]):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    return run_distributed(train_rank, 2, values, overrides)[0]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_resume_in_the_ramp_equals_the_straight_run(tmp_path, name):
    from fpa_megatron.checkpoint.format import TRAINER_STATE

    layout, data_parallel = LAYOUTS[name]
    straight = _run(tmp_path, layout + [f"checkpoint.dir={tmp_path / 'straight'}", "logging.run_name=straight"])
    sizes = megatron_batch_sizes(8, 8, *RAMP)
    assert sizes == [2, 2, 4, 6, 8, 8, 8, 8]
    assert [h["global_batch_size"] for h in straight] == sizes
    micro_batches = [h["global_batch_size"] // (1 * data_parallel) for h in straight]  # micro_batch_size x DP
    assert micro_batches == [size // data_parallel for size in (2, 2, 4, 6, 8, 8, 8, 8)]

    resumed = [f"checkpoint.dir={tmp_path / 'resumed'}", "logging.run_name=resumed"]
    first = _run(tmp_path, layout + resumed + ["train.exit_interval=3"])  # stops mid-ramp: next batch 6
    saved = torch.load(tmp_path / "resumed" / "iter_0000003" / TRAINER_STATE, weights_only=True)
    assert (saved["step"], saved["consumed_samples"]) == (3, 2 + 2 + 4)  # the data position moved by the ramp
    second = _run(tmp_path, layout + resumed)
    assert [h["step"] for h in first] == [1, 2, 3] and [h["step"] for h in second] == [4, 5, 6, 7, 8]
    for mine, want in zip(first + second, straight):
        for key in KEYS:
            assert math.isfinite(want[key]), (key, want)
            assert mine[key] == pytest.approx(want[key], rel=1e-6, abs=0), (key, mine, want)


@pytest.mark.parametrize("overrides,fragments", [
    (["train.rampup_batch_size=[3,5,12]"], ["train.rampup_batch_size=[3, 5, 12]", "global batch size 3",
                                            "= 2"]),  # not a whole number of micro-batches on DP2
    (["train.rampup_batch_size=[2,4,12]"], ["train.rampup_batch_size=[2, 4, 12]", "8 - 2", "increment=4"]),
    (["train.rampup_batch_size=[10,2,12]"], ["start=10", "train.global_batch_size=8"]),
    (["train.rampup_batch_size=[2,2]"], ["train.rampup_batch_size=[2, 2]", "three integers"]),
    (["train.rampup_batch_size=[2,2,0]"], ["train.rampup_batch_size=[2, 2, 0]", ">= 1"]),
])
def test_a_ramp_the_layout_cannot_run_is_a_config_error(overrides, fragments):
    assert_config_error(BASE, overrides, 2, fragments)


def test_the_config_check_and_the_planner_use_the_final_batch():
    from fpa_megatron.planner.search import own_layout

    cfg = config_from_dict(BASE)
    assert check_values(cfg, 2)[3] == 4  # 8 / (1 x DP2) micro-batches: the final size
    layout, _ = own_layout(cfg, 2)
    assert layout.num_microbatches == 4
