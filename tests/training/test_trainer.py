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
    (4, ["parallel.pipeline=2", "optimizer.zero_stage=1"]),  # tied embeddings across stages, ZeRO-1 over DP2
], ids=["tp2", "pp2", "tp2pp2", "dp2-zero1", "dp2-zero2", "pp2dp2-zero1"])
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


RESUME_LAYOUTS = {"tp2dp2-zero1": (4, ["parallel.tensor=2", "optimizer.zero_stage=1"]),
                  "pp2": (2, ["parallel.pipeline=2"])}
RESUME_COMMON = ["train.steps=8", "checkpoint.interval=0"]


def _assert_same_steps(got: list, ref: list) -> None:
    """Bitwise equal metrics, every one of them finite (NaN == NaN must not pass)."""
    assert [h["step"] for h in got] == [h["step"] for h in ref]
    for mine, want in zip(got, ref):
        for key in KEYS:
            assert math.isfinite(want[key]), (key, want)
            assert mine[key] == want[key], (key, mine, want)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The uninterrupted 8-step run of a layout (made on first use), saving every 2 steps and keeping 2:
    the reference of the resume tests, and real checkpoints for the checkpoint tests."""
    made = {}

    def get(name: str):
        if name not in made:
            world, overrides = RESUME_LAYOUTS[name]
            root = tmp_path_factory.mktemp(f"straight-{name}")
            history = _run(root, world, overrides + RESUME_COMMON + [
                "checkpoint.interval=2", "checkpoint.keep_last=2", f"checkpoint.dir={root / 'every2'}"])
            made[name] = (history, root / "every2")
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(RESUME_LAYOUTS))
def test_resume_continues_bitwise(tmp_path, straight_runs, name):
    world, overrides = RESUME_LAYOUTS[name]
    # The straight run also saves every 2 steps (keeping 2): saving must not disturb training.
    straight, every2 = straight_runs(name)
    kept = sorted(p.name for p in every2.iterdir() if p.is_dir())
    assert kept == ["iter_0000006", "iter_0000008"]
    assert (every2 / "latest").read_text().strip() == "iter_0000008"
    assert all((every2 / k / "complete").exists() for k in kept)
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto"]
    first = _run(tmp_path / "resumed", world, overrides + RESUME_COMMON + ckpt + ["train.exit_interval=4"])
    second = _run(tmp_path / "resumed", world, overrides + RESUME_COMMON + ckpt)
    assert [h["step"] for h in first] == [1, 2, 3, 4] and [h["step"] for h in second] == [5, 6, 7, 8]
    _assert_same_steps(first + second, straight)


def test_bf16_with_llama_options_trains(tmp_path, single):
    """bf16 under DP2/ZeRO-1 with SwiGLU, RMSNorm, full recomputation and the blockwise attention."""
    got = _run(tmp_path, 2, ["model.dtype=bf16", "model.activation=swiglu", "model.normalization=RMSNorm",
                             "model.recompute=full", "model.attention_impl=blockwise", "train.steps=4"])
    losses = [h["lm_loss"] for h in got]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert abs(got[0]["penalty"] - single[0]["penalty"]) <= 1e-2 * single[0]["penalty"]  # same init, bf16 noise


# ------------------------------------------------------------------------------------------ checkpoints


def train_rank_recording_io(values: dict, overrides: list[str]):
    """train_rank, also recording (clock, rank, what, path) of every os.fsync and os.replace of this rank.

    The calls go through unchanged; CLOCK_MONOTONIC is one clock for all processes of the machine."""
    import os
    import time

    import torch.distributed as dist

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        events.append((time.monotonic_ns(), dist.get_rank(), "fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        events.append((time.monotonic_ns(), dist.get_rank(), "replace", os.path.realpath(dst)))

    os.fsync, os.replace = fsync, replace
    try:
        return train_rank(values, overrides), events
    finally:
        os.fsync, os.replace = real_fsync, real_replace


def test_resume_from_an_older_checkpoint_starts_a_new_lineage(tmp_path, straight_runs):
    """The rollback case: resume from iter 6 while iter 8 exists. Steps 7, 8 are redone exactly; iter 8 of
    the abandoned future is kept aside (never resumed by auto); the resume source survives keep_last=1."""
    import json
    import shutil

    from fpa_megatron.checkpoint.lineage import resolve_resume

    world, overrides = RESUME_LAYOUTS["pp2"]
    straight, every2 = straight_runs("pp2")
    root = tmp_path / "ckpt"
    shutil.copytree(every2, root)
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    results = run_distributed(train_rank_recording_io, world, values, overrides + RESUME_COMMON + [
        "logging.run_name=rollback", f"checkpoint.dir={root}", f"checkpoint.resume={root / 'iter_0000006'}",
        "checkpoint.interval=1", "checkpoint.keep_last=1"])
    got = results[0][0]
    _assert_same_steps(got, straight[6:])  # steps 7 and 8 from iter 6 equal the uninterrupted run's

    # iter 7 pruned (keep_last=1); iter 6 kept (this run resumed from it); the new iter 8 is latest
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["abandoned", "iter_0000006", "iter_0000008"]
    assert (root / "latest").read_text().strip() == "iter_0000008"
    history = json.loads((root / "history.json").read_text())
    assert history["lineage"] == ["iter_0000006", "iter_0000008"]
    assert [(a["tag"], a["moved_to"]) for a in history["abandoned"]] == [("iter_0000008", "abandoned/iter_0000008")]
    assert (root / "abandoned" / "iter_0000008" / "complete").is_file()  # the abandoned future is kept whole
    assert resolve_resume(root, "auto")[0] == root / "iter_0000008"
    (root / "latest").unlink()  # without latest, auto falls back along the lineage, never to abandoned/
    found, note = resolve_resume(root, "auto")
    assert found == root / "iter_0000008" and "missing" in note

    # fsync before the marker: every file of the new iter 8 and its directory are fsynced before
    # `complete` is renamed into place; each rank fsyncs its own files; `latest` moves after the marker
    events = sorted(e for _, rank_events in results for e in rank_events)
    ckpt = (root / "iter_0000008").resolve()
    marker_at = next(t for t, _, what, path in events if what == "replace" and path == str(ckpt / "complete"))
    synced_before = {(rank, path) for t, rank, what, path in events if what == "fsync" and t < marker_at}
    files = [p for p in ckpt.iterdir() if p.name != "complete"]
    assert len(files) >= 7  # 2 model states, 2 ZeRO partitions, 2 RNG states, trainer state, layout, config
    for file in files:
        assert any(path == str(file) for _, path in synced_before), file.name
    for file in files:
        if file.name == "rng_rank_1.pt" or "mp_rank_01" in file.name:
            assert (1, str(file)) in synced_before, file.name  # rank 1's own files, by rank 1
    assert (0, str(ckpt)) in synced_before and (0, str(root.resolve())) in synced_before
    latest_at = [t for t, _, what, path in events if what == "replace" and path == str((root / "latest").resolve())]
    assert latest_at and max(latest_at) > marker_at


def test_our_checkpoint_files_load_with_weights_only(straight_runs):
    import json

    import torch

    _, every2 = straight_runs("pp2")
    ckpt = every2 / "iter_0000008"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and state["consumed_samples"] == 8 * BASE["train"]["global_batch_size"]
    assert state["lambda_schedule"]["step"] == 8 and state["lambda_schedule"]["lambda0"] == 0.2
    for rank in range(2):
        rng = torch.load(ckpt / f"rng_rank_{rank}.pt", weights_only=True)
        assert rng["torch"].dtype == torch.uint8 and rng["tracker"]
    assert json.loads((ckpt / "layout.json").read_text()) == dict(world_size=2, tensor=1, pipeline=2, data=1,
                                                                  zero_stage=1, virtual_pipeline=1,
                                                                  context=1, step=8)


def test_layout_change_is_refused_before_any_weight_is_read(straight_runs, monkeypatch):
    """A checkpoint saved as TP1 x PP2 on 2 ranks, resumed as DP2: check_config names both layouts and
    fpa-reshard; train() raises it before any process group exists (so before any weight is read)."""
    import torch

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.checkpoint.layout import CheckpointLayoutError
    from fpa_megatron.training.trainer import train

    _, every2 = straight_runs("pp2")
    cfg = config_from_dict(BASE, ["checkpoint.resume=auto", f"checkpoint.dir={every2}"])
    check_config(config_from_dict(BASE, ["parallel.pipeline=2", "checkpoint.resume=auto",
                                         f"checkpoint.dir={every2}"]), 2)  # the saved layout resumes
    with pytest.raises(CheckpointLayoutError) as err:
        check_config(cfg, 2)
    message = str(err.value)
    assert "checkpoint iter_0000008" in message and "saved with TP1 x PP2 x DP1 (2 ranks)" in message
    assert "this run is TP1 x PP1 x DP2 (2 ranks)" in message
    assert (f"fpa-reshard --checkpoint {every2 / 'iter_0000008'} --tensor 1 --pipeline 1 --world-size 2 "
            "--out NEW_DIR") in message
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CheckpointLayoutError):
        train(cfg)
    assert not torch.distributed.is_initialized()
