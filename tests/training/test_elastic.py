"""parallel.elastic: a run resumed on another number of data-parallel replicas (a job that lost or regained
nodes) rewrites the newest checkpoint's ZeRO partitions for its world size and continues as the uninterrupted
run did: DP2 (ZeRO-1) -> DP1 with twice the micro-batches, then back to DP2, against one straight DP2 run
(losses, penalty, grad norm, lr, lambda per step). Without it, either change is refused naming both layouts,
before any process group exists."""

from __future__ import annotations

import shutil

import pytest

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, train_rank

STEPS = 6
VALUES = {**BASE, "train": {**BASE["train"], "steps": STEPS},
          "checkpoint": {"interval": 2, "keep_last": 10, "save_at_end": False, "resume": "auto"}}


def _train(tmp_path, world: int, name: str, *overrides: str):
    values = {**VALUES, "logging": {**VALUES["logging"], "dir": str(tmp_path)}}
    return run_distributed(train_rank, world, values, [f"logging.run_name={name}", *overrides])[0]


def _checkpoints_until(root, step: int, into):
    """A copy of the checkpoint root as it was when `step` was the newest checkpoint (later ones left out)."""
    from fpa_megatron.checkpoint.format import TAG_PREFIX, write_atomic
    from fpa_megatron.checkpoint.lineage import write_history
    from fpa_megatron.checkpoint.lineage import read_history

    kept = [p.name for p in sorted(root.glob(TAG_PREFIX + "*")) if int(p.name[len(TAG_PREFIX):]) <= step]
    into.mkdir(parents=True)
    for tag in kept:
        shutil.copytree(root / tag, into / tag)
    history = read_history(root)
    history["lineage"] = [t for t in history["lineage"] if t in kept]
    write_history(into, history)
    write_atomic(into / "latest", kept[-1] + "\n")
    return into


def _assert_steps_equal(got: list[dict], want: list[dict], steps: range):
    by_step = {h["step"]: h for h in want}
    assert [h["step"] for h in got] == list(steps)
    for h in got:
        for key in ("lm_loss", "penalty", "grad_norm", "lr", "lambda"):
            assert h[key] == pytest.approx(by_step[h["step"]][key], rel=1e-5, abs=0), (h["step"], key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted DP2 run (checkpoints every 2 steps) and its run directory."""
    root = tmp_path_factory.mktemp("elastic_straight")
    return _train(root, 2, "dp2", "optimizer.zero_stage=1"), root / "dp2"


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory, straight):
    """Its step-2 checkpoint resumed on one rank (DP1: 4 micro-batches a step instead of 2 per rank)."""
    _, run_dir = straight
    root = tmp_path_factory.mktemp("elastic_shrunk")
    ckpts = _checkpoints_until(run_dir / "checkpoints", 2, root / "ckpts")
    return _train(root, 1, "dp1", "parallel.elastic=true", f"checkpoint.dir={ckpts}"), ckpts


def test_shrinking_to_one_replica_continues_as_the_uninterrupted_run(straight, shrunk):
    history, ckpts = shrunk
    _assert_steps_equal(history, straight[0], range(3, STEPS + 1))
    from fpa_megatron.checkpoint.layout import read_layout

    assert read_layout(ckpts / "iter_0000002").data == 2  # the original is kept as it was
    assert read_layout(ckpts / "iter_0000004").data == 1  # what the shrunk run saved
    assert not any((ckpts / "elastic").iterdir())  # the rewritten copy is gone once loaded


def test_growing_back_to_two_replicas_continues_too(tmp_path, straight, shrunk):
    _, ckpts = shrunk
    again = _checkpoints_until(ckpts, 4, tmp_path / "ckpts")  # iter_4 was saved by the DP1 run
    history = _train(tmp_path, 2, "dp2again", "optimizer.zero_stage=1", "parallel.elastic=true",
                     f"checkpoint.dir={again}")
    _assert_steps_equal(history, straight[0], range(5, STEPS + 1))


def test_without_elastic_a_larger_world_is_refused_before_any_process_group(tmp_path, shrunk):
    """A DP1 checkpoint resumed on 2 ranks: the config check names both layouts and parallel.elastic."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.checkpoint.layout import CheckpointLayoutError

    _, ckpts = shrunk
    cfg = config_from_dict(VALUES, [f"checkpoint.dir={ckpts}", "logging.dir=" + str(tmp_path)])
    with pytest.raises(CheckpointLayoutError) as err:
        check_config(cfg, 2)
    message = str(err.value)
    assert "saved with TP1 x PP1 x DP1 (1 ranks)" in message and "this run is TP1 x PP1 x DP2 (2 ranks)" in message
    assert "parallel.elastic=true" in message
    elastic = check_config(config_from_dict(VALUES, [f"checkpoint.dir={ckpts}", "parallel.elastic=true"]), 2)
    assert (elastic.data_parallel, elastic.num_microbatches) == (2, 2)  # the global batch of 8 is kept
