"""The guard's decisions, the FPA_FAULT parser, the stop signals, the failure line and the new config checks.

All in one process and without a process group (the guard's all-reduce is only skipped when there is none);
the same code on real gloo ranks is exercised by tests/training/test_fault_drills.py.
"""

from __future__ import annotations

import math
import os
import signal
import statistics

import pytest
import torch

from fpa_megatron import faults
from fpa_megatron.config import ConfigError, TrainConfig, config_from_dict
from fpa_megatron.preflight import check_config
from fpa_megatron.testing import run_distributed
from fpa_megatron.exit_codes import Diverged, LossSpikeStop
from fpa_megatron.run_log import failure_line, is_collective_timeout, where
from fpa_megatron.options import SPIKE_POLICIES
from fpa_megatron.training.guard import (ACTION_ON_SPIKE, ROLLBACK, SKIP, STOP, UPDATE, GradientProbe,
                                         SpikeDetector, TrainingGuard)
from fpa_megatron.training.preemption import StopSignals


def _train_cfg(**spike) -> TrainConfig:
    cfg = TrainConfig(max_consecutive_skips=2)
    cfg.spike.factor, cfg.spike.window, cfg.spike.min_history = 2.0, 4, 3
    for key, value in spike.items():
        setattr(cfg.spike, key, value)
    return cfg


def _backward(model: torch.nn.Module, scale: float) -> None:
    """One backward whose gradients are finite, or NaN / inf when scale is."""
    (model(torch.ones(1, 3)).sum() * scale).backward()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_spike_detector_waits_for_history_then_compares_to_the_median():
    detector = SpikeDetector(factor=2.0, window=3, min_history=2)  # the ratio test alone
    assert not detector.is_spike(1e9)  # no history yet
    for loss in (4.0, 100.0):
        detector.record(loss)
    assert detector.threshold() == pytest.approx(2.0 * 52.0)
    detector.record(5.0)  # history 4, 100, 5: median 5 (an outlier does not move it)
    assert detector.threshold() == 10.0 and detector.is_spike(10.5) and not detector.is_spike(10.0)
    detector.record(6.0)  # the window keeps the last 3: 100, 5, 6
    assert list(detector.history) == [100.0, 5.0, 6.0] and detector.threshold() == 12.0


def test_spike_threshold_is_the_strictest_of_ratio_floor_and_spread():
    """Each of the three tests binds in its own regime; the numbers are worked by hand."""
    losses = [0.10, 0.13, 0.02, 0.60, 0.15]  # median 0.13; |deviations| 0.03, 0, 0.11, 0.47, 0.02: MAD 0.03
    detector = SpikeDetector(factor=3.0, window=5, min_history=5, min_increase=1.0, deviations=6.0)
    for loss in losses:
        detector.record(loss)
    assert detector.spread() == pytest.approx(1.4826 * 0.03)
    assert detector.threshold() == pytest.approx(1.13)  # near zero loss the floor binds: 0.13 + 1.0 > 3 x 0.13
    assert not detector.is_spike(0.61) and not detector.is_spike(1.13) and detector.is_spike(1.14)
    ratio_only = SpikeDetector(factor=3.0, window=5, min_history=5)
    ratio_only.history.extend(losses)
    assert ratio_only.is_spike(0.61)  # the ratio alone: 0.61 > 3 x 0.13 (the false alarm of the mock-data run)

    steady = SpikeDetector(factor=3.0, window=4, min_history=4, min_increase=1.0, deviations=6.0)
    steady.history.extend([3.0, 3.1, 2.9, 3.0])  # LM losses: the ratio binds (9.0 > 4.0 and > 3.0 + 6 x 0.074)
    assert steady.threshold() == pytest.approx(9.0)

    noisy = SpikeDetector(factor=1.5, window=4, min_history=4, min_increase=1.0, deviations=6.0)
    noisy.history.extend([2.0, 4.0, 3.0, 5.0])  # median 3.5, MAD 1.0: the spread binds (3.5 + 6 x 1.4826)
    assert noisy.threshold() == pytest.approx(3.5 + 6 * 1.4826)
    assert not noisy.is_spike(12.0) and noisy.is_spike(12.5)


def _mock_run(root: str, spike: list[str]) -> list[dict]:
    from fpa_megatron.training.trainer import train

    cfg = config_from_dict(MOCK_RUN, spike + [f"logging.dir={root}"])
    return [{k: h[k] for k in ("step", "lm_loss", "applied") if k in h} for h in train(cfg)]


MOCK_RUN = {  # the fault drills' tiny GPT on mock data, long enough to reach losses near zero
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 300, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3,
              "spike": {"policy": "skip", "min_history": 20, "window": 50}},
    "checkpoint": {"interval": 0, "save_at_end": False},
    "logging": {"interval": 50, "tensorboard": False, "run_name": "mock"},
}


def test_no_false_alarm_on_a_mock_data_run_near_zero_loss(tmp_path):
    """A mock-data run falls to losses of 0.001-0.6. The ratio alone (3 x the median of the last 50 losses,
    computed here on the run's own losses) calls some of its noisy steps spikes; the guard, with its defaults
    and train.spike.policy=skip, skips none of them."""
    (history,) = run_distributed(_mock_run, 1, str(tmp_path), [], timeout_s=600)
    losses = [h["lm_loss"] for h in history]
    assert min(losses[-50:]) < 0.01 and max(losses[-100:]) > 0.1  # near zero, and noisy
    ratio_alarms = [i + 1 for i in range(20, len(losses))
                    if losses[i] > 3.0 * statistics.median(losses[max(0, i - 50):i])]
    assert len(ratio_alarms) >= 3, ratio_alarms  # what the ratio alone fired on
    # policy=skip: a step the guard called a spike would not have been applied
    assert [h["step"] for h in history if not h["applied"]] == []


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_gradient_probe_sees_a_non_finite_gradient(model, scale):
    probe = GradientProbe(model)
    _backward(model, 1.0)
    assert probe.nonfinite().item() == 0.0
    _backward(model, scale)  # the hooks see each incoming gradient, before any accumulation
    _backward(model, 1.0)
    assert probe.nonfinite().item() == 1.0
    probe.reset()
    _backward(model, 1.0)
    assert probe.nonfinite().item() == 0.0
    probe.remove()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(model):
    guard = TrainingGuard(_train_cfg(), model, rank=0)
    _backward(model, 1.0)
    verdict = guard.check(1, 5.0, 1.0, stop_requested=False)
    assert verdict.action == UPDATE and not verdict.nonfinite
    guard.conclude(1, verdict, applied=True, lm_loss=5.0)
    assert guard.sound and guard.skipped_steps == 0

    _backward(model, math.nan)  # gradients NaN, loss finite
    verdict = guard.check(2, 5.0, 1.0, stop_requested=False)
    assert verdict.action == SKIP and verdict.nonfinite
    guard.conclude(2, verdict, applied=False, lm_loss=5.0)
    assert (guard.skipped_steps, guard.consecutive_skips, guard.sound) == (1, 1, False)

    verdict = guard.check(3, math.nan, 1.0, stop_requested=False)  # the loss itself (the probe was reset)
    assert verdict.action == SKIP
    guard.conclude(3, verdict, applied=False, lm_loss=math.nan)
    assert guard.consecutive_skips == 2  # = max_consecutive_skips: still going

    verdict = guard.check(4, 5.0, math.inf, stop_requested=False)  # the penalty
    assert verdict.action == SKIP
    with pytest.raises(Diverged) as stop:
        guard.conclude(4, verdict, applied=False, lm_loss=5.0)
    assert stop.value.exit_code == 81 and "train.max_consecutive_skips=2" in str(stop.value)
    assert "nothing is saved after step 1" in str(stop.value)


def test_deepspeed_dropping_an_update_counts_as_a_skip(model):
    """An update the guard allowed but DeepSpeed dropped (its global norm overflowed) is counted too."""
    guard = TrainingGuard(_train_cfg(), model, rank=0)
    verdict = guard.check(1, 5.0, 1.0, stop_requested=False)
    guard.conclude(1, verdict, applied=False, lm_loss=5.0)
    assert guard.skipped_steps == 1 and not guard.sound
    guard.conclude(2, guard.check(2, 5.0, 1.0, False), applied=True, lm_loss=5.0)
    assert guard.consecutive_skips == 0 and guard.sound


@pytest.mark.parametrize("policy,action", [("warn", UPDATE), ("skip", SKIP), ("rollback", ROLLBACK),
                                           ("stop", STOP)])
def test_spike_policies(model, policy, action):
    assert set(ACTION_ON_SPIKE) == set(SPIKE_POLICIES)
    guard = TrainingGuard(_train_cfg(policy=policy), model, rank=0)
    for step, loss in enumerate([5.0, 4.0, 4.5], start=1):
        guard.conclude(step, guard.check(step, loss, 1.0, False), applied=True, lm_loss=loss)
    assert guard.check(4, 9.0, 1.0, False).action == UPDATE  # 9 = 2 x median 4.5: not above
    verdict = guard.check(4, 9.1, 1.0, False)
    assert verdict.spike and verdict.action == action
    if policy == "stop":
        with pytest.raises(LossSpikeStop) as stop:
            guard.conclude(4, verdict, applied=False, lm_loss=9.1)
        assert stop.value.exit_code == 82
        return
    guard.conclude(4, verdict, applied=policy == "warn", lm_loss=9.1)
    assert guard.skipped_steps == (1 if policy in ("skip", "rollback") else 0)  # rollback without checkpoint


def test_rollbacks_to_the_same_checkpoint_are_limited(model):
    guard = TrainingGuard(_train_cfg(policy="rollback", max_rollbacks=2), model, rank=0)
    for step, loss in enumerate([5.0, 5.0, 5.0], start=1):
        guard.conclude(step, guard.check(step, loss, 1.0, False), applied=True, lm_loss=loss)
    spike = guard.check(4, 50.0, 1.0, False)
    guard.conclude(4, spike, applied=False, lm_loss=50.0, rolled_back_to="ckpt/iter_0000002")
    guard.conclude(5, spike, applied=False, lm_loss=50.0, rolled_back_to="ckpt/iter_0000002")
    guard.conclude(6, spike, applied=False, lm_loss=50.0, rolled_back_to="ckpt/iter_0000004")  # a newer one
    guard.conclude(7, spike, applied=False, lm_loss=50.0, rolled_back_to="ckpt/iter_0000004")
    assert guard.rollbacks == 4 and guard.skipped_steps == 0 and guard.sound
    with pytest.raises(LossSpikeStop, match="3 rollbacks to ckpt/iter_0000004"):
        guard.conclude(8, spike, applied=False, lm_loss=50.0, rolled_back_to="ckpt/iter_0000004")


def test_stop_request_and_state_round_trip(model):
    guard = TrainingGuard(_train_cfg(), model, rank=0)
    assert guard.check(1, 5.0, 1.0, stop_requested=True).stop_requested
    guard.conclude(1, guard.check(1, 5.0, 1.0, False), applied=True, lm_loss=5.0)
    guard.conclude(2, guard.check(2, math.nan, 1.0, False), applied=False, lm_loss=math.nan)
    restored = TrainingGuard(_train_cfg(), torch.nn.Linear(3, 2), rank=0)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() == {
        "skipped_steps": 1, "consecutive_skips": 1, "rollbacks": 0, "loss_history": [5.0]}


def test_stop_signals_only_record_the_request():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.requested and stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_fault_spec_parsing():
    assert faults.parse("") == []
    assert faults.parse("nan_loss@3, nan_loss@5+:1 ,kill_rank@4:1,sigterm@2:launcher,stall_rank@7,"
                        "slow_rank@12+:1") == [
        faults.Fault("nan_loss", 3), faults.Fault("nan_loss", 5, onward=True, target=1),
        faults.Fault("kill_rank", 4, target=1), faults.Fault("sigterm", 2, target="launcher"),
        faults.Fault("stall_rank", 7), faults.Fault("slow_rank", 12, onward=True, target=1)]
    for bad, fragment in [("nan@3", "cannot read 'nan@3'"), ("kill_rank@x", "cannot read"),
                          ("kill_rank@0", "steps count from 1"), ("spike@3:launcher", "only sigterm")]:
        with pytest.raises(ValueError, match=fragment):
            faults.parse(bad)


def test_which_rank_and_step_a_fault_hits():
    nan_from_3 = faults.Fault("nan_loss", 3, onward=True)
    assert [nan_from_3.fires(step, rank) for step, rank in [(2, 0), (3, 0), (9, 1)]] == [False, True, True]
    kill = faults.Fault("kill_rank", 4)  # default target: rank 0
    assert kill.fires(4, 0) and not kill.fires(4, 1) and not kill.fires(5, 0)
    assert faults.Fault("sigterm", 2, target="launcher").fires(2, 0)  # rank 0 signals the launcher
    assert faults.parse("kill_in_save@4,fail_save@2:1") == [faults.Fault("kill_in_save", 4),
                                                            faults.Fault("fail_save", 2, target=1)]
    assert faults.Fault("kill_in_save", 4).fires(4, 0) and faults.Fault("kill_in_save", 4).fires(4, 1)  # every rank


def test_loss_faults_hit_training_steps_of_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv("FPA_FAULT", "nan_loss@2,spike@3:1")
    injector = faults.install(rank=1)
    try:
        assert faults.loss_factor() == 1.0
        injector.begin_step(2)
        assert math.isnan(faults.loss_factor())
        with torch.no_grad():  # evaluation
            assert faults.loss_factor() == 1.0
        injector.begin_step(3)
        assert faults.loss_factor() == faults.SPIKE_FACTOR
        injector.begin_step(4)
        assert faults.loss_factor() == 1.0
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        faults.install(rank=1).begin_step(2)
        assert faults.loss_factor() == 1.0  # a restarted group runs clean
    finally:
        faults._active = None


def test_failure_line_names_rank_host_step_and_the_timeout_key():
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation")
    assert is_collective_timeout(timeout) and not is_collective_timeout(RuntimeError("Connection reset by peer"))
    saved = (where.rank, where.host, where.step)
    try:
        where.rank, where.host, where.step = 3, "node07", 812
        line = failure_line(timeout, timeout_minutes=0.1)
        assert line.startswith("rank 3 (host node07) failed at step 812: a collective did not complete within "
                               "parallel.timeout_minutes=0.1 (6 s)")
        where.step = None
        assert failure_line(ValueError("bad"), 0.1) == "rank 3 (host node07) failed during setup: ValueError: bad"
    finally:
        where.rank, where.host, where.step = saved


@pytest.mark.parametrize("override,fragment", [
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes=0"),
    ("train.max_consecutive_skips=-1", "train.max_consecutive_skips=-1"),
    ("train.spike.policy=ignore", "train.spike.policy='ignore'"),
    ("train.spike.factor=1", "train.spike.factor=1"),
    ("train.spike.window=0", "train.spike.window=0"),
    ("train.spike.min_increase=-0.5", "train.spike.min_increase=-0.5 must be a number >= 0.0"),
    ("train.spike.deviations=abc", "train.spike.deviations: expected a number, got 'abc'"),
    ("train.spike.min_history=200", "train.spike.min_history=200 is larger than train.spike.window=100"),
    ("train.spike.max_rollbacks=-1", "train.spike.max_rollbacks=-1"),
    ("train.slow_rank.factor=0.5", "train.slow_rank.factor=0.5 must be a number > 1 (0 or null: off)"),
    ("train.slow_rank.factor=1", "train.slow_rank.factor=1.0 must be a number > 1"),
    ("train.slow_rank.steps=-1", "train.slow_rank.steps=-1 must be an integer >= 0"),
    ("train.slow_rank.steps=1.5", "train.slow_rank.steps"),
])
def test_guard_and_timeout_settings_are_checked(override, fragment):
    values = {"model": {"vocab_size": 128}, "data": {"mock": True}}
    check_config(config_from_dict(values, ["parallel.timeout_minutes=0.1"]), 1)  # a float is fine
    for off in ("train.slow_rank.factor=0", "train.slow_rank.factor=null", "train.slow_rank.steps=0"):
        check_config(config_from_dict(values, [off]), 1)  # the slow-rank check turned off
    with pytest.raises(ConfigError) as err:
        check_config(config_from_dict(values, [override]), 1)
    assert fragment in str(err.value)
