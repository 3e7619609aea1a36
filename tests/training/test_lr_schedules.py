"""The learning-rate schedules: values at chosen steps against closed forms written here (Python floats: float64),
the rules' errors, and a WSD run whose resume switches the stable phase to the decay (the cooldown of a
checkpoint) on real gloo ranks."""

from __future__ import annotations

import math

import pytest

from fpa_megatron.config import OptimizerConfig, config_from_dict
from fpa_megatron.rules import check_values
from fpa_megatron.schedules import lr_at
from fpa_megatron.testing import run_distributed
from tests.config_errors import assert_config_error

LR, MIN_LR, WARMUP, STEPS = 1e-3, 1e-4, 10, 100


def opt(**kw) -> OptimizerConfig:
    return OptimizerConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant", "inverse_sqrt"])
def test_every_schedule_warms_up_linearly(schedule):
    cfg = opt(lr_schedule=schedule, decay_fraction=0.2 if schedule == "wsd" else None)
    for t in (0, 4, 9):
        assert lr_at(t, cfg, STEPS) == pytest.approx(LR * (t + 1) / WARMUP, rel=1e-15)


def test_cosine_is_the_default_and_unchanged():
    cfg = opt()
    assert cfg.lr_schedule == "cosine"
    for t in (10, 37, 55, 99):
        progress = (t - 10) / 90
        assert lr_at(t, cfg, STEPS) == pytest.approx(MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress)),
                                                     rel=1e-15)
    assert lr_at(100, cfg, STEPS) == MIN_LR
    assert lr_at(40, opt(decay_steps=40), STEPS) == MIN_LR  # decay_steps ends the cosine before train.steps


@pytest.mark.parametrize("style,shape", [
    ("linear", lambda p: 1 - p),
    ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
    ("1-sqrt", lambda p: 1 - math.sqrt(p)),
])
def test_wsd_stable_then_decay(style, shape):
    by_fraction = opt(lr_schedule="wsd", decay_style=style, decay_fraction=0.25)  # decay over steps 75..100
    by_start = opt(lr_schedule="wsd", decay_style=style, decay_start=75)
    for cfg in (by_fraction, by_start):
        for t in (10, 50, 74, 75):
            assert lr_at(t, cfg, STEPS) == LR
        for t in (76, 80, 87, 99):
            expected = MIN_LR + (LR - MIN_LR) * shape((t - 75) / 25)
            assert lr_at(t, cfg, STEPS) == pytest.approx(expected, rel=1e-14), (style, t)
        assert lr_at(100, cfg, STEPS) == MIN_LR
    # decay_steps ends the decay: the fraction is of it, and min_lr after it
    cfg = opt(lr_schedule="wsd", decay_style=style, decay_fraction=0.5, decay_steps=60)
    assert lr_at(29, cfg, STEPS) == LR
    assert lr_at(45, cfg, STEPS) == pytest.approx(MIN_LR + (LR - MIN_LR) * shape(15 / 30), rel=1e-14)
    assert lr_at(60, cfg, STEPS) == lr_at(90, cfg, STEPS) == MIN_LR
    # decay_start wins over decay_fraction (a cooldown at resume needs one override)
    both = opt(lr_schedule="wsd", decay_style=style, decay_fraction=0.0, decay_start=90)
    assert lr_at(89, both, STEPS) == LR
    assert lr_at(95, both, STEPS) == pytest.approx(MIN_LR + (LR - MIN_LR) * shape(5 / 10), rel=1e-14)


def test_wsd_without_decay_stays_stable():
    cfg = opt(lr_schedule="wsd", decay_fraction=0.0)
    assert [lr_at(t, cfg, STEPS) for t in (10, 60, 99)] == [LR, LR, LR]


def test_constant_and_inverse_sqrt():
    constant = opt(lr_schedule="constant")
    assert [lr_at(t, constant, STEPS) for t in (9, 10, 99, 5000)] == [LR, LR, LR, LR]
    inv = opt(lr_schedule="inverse_sqrt")
    for t in (9, 10, 39, 99, 999):
        assert lr_at(t, inv, STEPS) == pytest.approx(max(MIN_LR, LR * math.sqrt(10 / (t + 1))), rel=1e-15)
    assert lr_at(10**6, inv, STEPS) == MIN_LR  # floored at min_lr
    no_warmup = OptimizerConfig(lr=LR, min_lr=0.0, warmup_steps=0, lr_schedule="inverse_sqrt")
    assert [lr_at(t, no_warmup, STEPS) for t in (0, 3)] == pytest.approx([LR, LR / 2], rel=1e-15)


BASE = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},
    "data": {"mock": True},
    "train": {"steps": 8, "micro_batch_size": 2, "global_batch_size": 4},
}

BAD = {
    "unknown schedule": (["optimizer.lr_schedule=linear"], ["optimizer.lr_schedule='linear'", "'wsd'"]),
    "unknown style": (["optimizer.lr_schedule=wsd", "optimizer.decay_fraction=0.2", "optimizer.decay_style=exp"],
                      ["optimizer.decay_style='exp'", "'1-sqrt'"]),
    "wsd without its decay": (["optimizer.lr_schedule=wsd"], ["optimizer.lr_schedule='wsd'", "optimizer.decay_fraction",
                                                              "optimizer.decay_start"]),
    "fraction above one": (["optimizer.lr_schedule=wsd", "optimizer.decay_fraction=1.5"],
                           ["optimizer.decay_fraction=1.5"]),
    "fraction into warmup": (["optimizer.lr_schedule=wsd", "optimizer.decay_fraction=0.9",
                              "optimizer.warmup_steps=2"], ["optimizer.decay_fraction=0.9", "warmup_steps=2"]),
    "start after the end": (["optimizer.lr_schedule=wsd", "optimizer.decay_start=9"],
                            ["optimizer.decay_start=9", "train.steps=8"]),
    "start in warmup": (["optimizer.lr_schedule=wsd", "optimizer.decay_start=1", "optimizer.warmup_steps=2"],
                        ["optimizer.decay_start=1", "optimizer.warmup_steps=2"]),
    "start without wsd": (["optimizer.decay_start=4"], ["optimizer.decay_start=4", "lr_schedule='cosine'"]),
    "z_loss negative": (["optimizer.z_loss=-1"], ["optimizer.z_loss=-1"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_schedule_is_one_error_naming_the_key(name):
    overrides, fragments = BAD[name]
    assert_config_error(BASE, overrides, 1, fragments)


def test_old_configs_keep_their_schedule():
    cfg = config_from_dict(BASE)
    o = cfg.optimizer
    assert (o.lr_schedule, o.decay_start, o.decay_fraction, o.z_loss) == ("cosine", None, None, 0.0)
    check_values(cfg, 1)


# ------------------------------------------------------------------------------------------ cooldown at resume

RUN = {**BASE, "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "lr_schedule": "wsd",
                             "decay_fraction": 0.0},  # stable to the end: a run to be cooled down later
       "train": {**BASE["train"], "eval_interval": 0, "seed": 3},
       "checkpoint": {"save_at_end": False, "resume": "auto"}, "logging": {"interval": 1, "tensorboard": False}}


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.training.trainer import train

    return [{k: h[k] for k in ("step", "lr", "lm_loss")} for h in train(config_from_dict(values, overrides))]


def test_a_resume_switches_the_stable_phase_to_the_decay(tmp_path):
    """Steps 1-4 stable (saved at 4, exit); the resume sets decay_start=4 and cools down over steps 5-8: its
    learning rates are the closed form of the 1-sqrt decay from update 4 to 8."""
    values = {**RUN, "logging": {**RUN["logging"], "dir": str(tmp_path)}}
    common = [f"checkpoint.dir={tmp_path / 'ckpt'}"]
    stable = run_distributed(train_rank, 2, values, common + ["train.exit_interval=4"])[0]
    cooled = run_distributed(train_rank, 2, values, common + ["optimizer.decay_start=4",
                                                              "optimizer.decay_style=1-sqrt"])[0]
    assert [h["step"] for h in stable] == [1, 2, 3, 4] and [h["step"] for h in cooled] == [5, 6, 7, 8]
    assert [h["lr"] for h in stable] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2], rel=1e-15)
    expected = [1e-3 + (1e-2 - 1e-3) * (1 - math.sqrt((t - 4) / 4)) for t in (4, 5, 6, 7)]  # updates 4..7
    assert [h["lr"] for h in cooled] == pytest.approx(expected, rel=1e-14)
    assert all(math.isfinite(h["lm_loss"]) for h in stable + cooled)
