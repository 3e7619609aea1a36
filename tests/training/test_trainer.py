"""End-to-end `train(cfg)` on real gloo ranks: every layout follows the single-process run; resume is exact."""

from __future__ import annotations

import math

import pytest

from fpa_megatron.testing import run_distributed

BASE = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},  # one padded vocab for TP 1 and 2
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"save_at_end": False, "resume": "none"},
    "logging": {"interval": 1, "tensorboard": False},
}
KEYS = ("lm_loss", "penalty", "lambda", "lr", "grad_norm")


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    history = train(config_from_dict(values, overrides))
    return [{k: h[k] for k in KEYS + ("step",)} for h in history]


def _run(tmp_path, world: int, overrides: list[str]):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    return run_distributed(train_rank, world, values, overrides + [f"logging.run_name=w{world}"])[0]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The single-process reference; it also writes TensorBoard events and validates at step 5."""
    root = tmp_path_factory.mktemp("single")
    history = _run(root, 1, ["logging.tensorboard=true", "train.eval_interval=5", "train.eval_iters=2"])
    return history, root / "w1"


@pytest.fixture(scope="module")
def single(single_run):
    return single_run[0]


def test_tensorboard_has_every_scalar_and_the_heatmap(single_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history, log_dir = single_run
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/lm_loss", "train/penalty", "train/penalty_weighted", "train/lambda", "train/lr",
                "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "perf/mfu", "perf/iter_time_s",
                "perf/mem_gb", "val/loss", "val/ppl", "penalty/layer_00", "penalty/layer_01"}
    assert expected <= scalars, expected - scalars
    logged = [e.value for e in events.Scalars("train/lm_loss")]
    assert logged == pytest.approx([h["lm_loss"] for h in history], rel=1e-6)  # logging.interval = 1
    assert [e.value for e in events.Scalars("train/lambda")] == pytest.approx([0.2 * 0.9**t for t in range(5)])
    val = events.Scalars("val/loss")[-1].value
    assert events.Scalars("val/ppl")[-1].value == pytest.approx(math.exp(val), rel=1e-5)
    images = events.Images("penalty/heads_heatmap")
    assert len(images) == 5
    assert images[-1].width == 4 * 16 and images[-1].height == 2 * 16  # heads x layers cells of 16 px
    assert (log_dir / "config.yaml").exists()


@pytest.mark.parametrize("world,overrides", [
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.pipeline=2"]),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    (2, ["optimizer.zero_stage=1"]),
    (2, ["optimizer.zero_stage=2"]),
], ids=["tp2", "pp2", "tp2pp2", "dp2-zero1", "dp2-zero2"])
def test_first_steps_match_single_process(tmp_path, single, world, overrides):
    got = _run(tmp_path, world, overrides)
    assert [h["step"] for h in got] == [1, 2, 3, 4, 5]
    for mine, ref in zip(got, single):
        for key in ("lm_loss", "penalty"):
            assert abs(mine[key] - ref[key]) <= 1e-4 * abs(ref[key]), (key, mine, ref)
        assert mine["lambda"] == ref["lambda"] and mine["lr"] == ref["lr"]
        assert abs(mine["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"]
    # the run learns something and the schedules move
    assert single[-1]["lm_loss"] < single[0]["lm_loss"]
    assert [h["lambda"] for h in single] == pytest.approx([0.2 * 0.9**t for t in range(5)], rel=1e-12)


@pytest.mark.parametrize("world,overrides", [
    (4, ["parallel.tensor=2", "optimizer.zero_stage=1"]),
    (2, ["parallel.pipeline=2"]),
], ids=["tp2dp2-zero1", "pp2"])
def test_resume_continues_bitwise(tmp_path, world, overrides):
    common = overrides + ["train.steps=8", "checkpoint.interval=0"]
    # The straight run also saves every 2 steps (keeping 2): saving must not disturb training.
    straight = _run(tmp_path / "straight", world, common + [
        "checkpoint.interval=2", "checkpoint.keep_last=2", f"checkpoint.dir={tmp_path / 'every2'}"])
    kept = sorted(p.name for p in (tmp_path / "every2").iterdir() if p.is_dir())
    assert kept == ["iter_0000006", "iter_0000008"]
    assert (tmp_path / "every2" / "latest").read_text().strip() == "iter_0000008"
    assert all((tmp_path / "every2" / k / "complete").exists() for k in kept)
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto"]
    first = _run(tmp_path / "resumed", world, common + ckpt + ["train.exit_interval=4"])
    second = _run(tmp_path / "resumed", world, common + ckpt)
    assert [h["step"] for h in first] == [1, 2, 3, 4] and [h["step"] for h in second] == [5, 6, 7, 8]
    for mine, ref in zip(first + second, straight):
        for key in KEYS:
            assert mine[key] == ref[key] or (math.isnan(mine[key]) and math.isnan(ref[key])), (key, mine, ref)


def test_bf16_with_llama_options_trains(tmp_path, single):
    """bf16 under DP2/ZeRO-1 with SwiGLU, RMSNorm, full recomputation and the blockwise attention."""
    got = _run(tmp_path, 2, ["model.dtype=bf16", "model.activation=swiglu", "model.normalization=RMSNorm",
                             "model.recompute=full", "model.attention_impl=blockwise", "train.steps=4"])
    losses = [h["lm_loss"] for h in got]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert abs(got[0]["penalty"] - single[0]["penalty"]) <= 1e-2 * single[0]["penalty"]  # same init, bf16 noise
