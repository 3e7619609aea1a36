"""Checkpoint rules that need no training run: weights_only loading of our files, `latest` as the source
of truth for `resume: auto` and its fallback along the lineage. The saves themselves (fsync order,
pruning after a rollback, the layout error) are tested on real ranks in test_trainer.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fpa_megatron.checkpoint.format import load_trusted
from fpa_megatron.checkpoint.lineage import resolve_latest, resolve_resume


class RunsCodeWhenUnpickled:
    """Unpickling this calls a function (os.getpid, harmless): what a tampered checkpoint file could do."""

    def __reduce__(self):
        return (os.getpid, ())


def test_our_files_refuse_pickled_objects(tmp_path):
    plain = {"torch": torch.get_rng_state(), "tracker": {"model-parallel-rng": torch.arange(4, dtype=torch.uint8)},
             "step": 7, "lr": 1e-3, "enabled": True, "name": "x", "list": [1, 2.5, "a"]}
    torch.save(plain, tmp_path / "plain.pt")
    back = load_trusted(tmp_path / "plain.pt")
    assert back.keys() == plain.keys() and torch.equal(back["torch"], plain["torch"])
    assert back["list"] == plain["list"] and back["step"] == 7 and back["enabled"] is True

    torch.save({**plain, "payload": RunsCodeWhenUnpickled()}, tmp_path / "rng_rank_0.pt")
    # a valid file: a plain torch.load calls os.getpid while unpickling it...
    assert torch.load(tmp_path / "rng_rank_0.pt", weights_only=False)["payload"] == os.getpid()
    with pytest.raises(RuntimeError) as err:  # ...which weights_only refuses to do
        load_trusted(tmp_path / "rng_rank_0.pt")
    assert str(tmp_path / "rng_rank_0.pt") in str(err.value) and "weights_only=True" in str(err.value)
    with pytest.raises(FileNotFoundError, match="rng_rank_1.pt is missing"):
        load_trusted(tmp_path / "rng_rank_1.pt")


def _complete(root, step: int, complete: bool = True):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    if complete:
        (path / "complete").write_text(f"{step}\n")
    return path


def test_latest_decides_and_the_fallback_follows_the_lineage(tmp_path):
    for step in (2, 4, 6):
        _complete(tmp_path, step)
    _complete(tmp_path, 8, complete=False)  # a killed save
    # iter 6 is complete but not on the lineage (e.g. killed between its marker and history.json)
    (tmp_path / "history.json").write_text(json.dumps({"lineage": ["iter_0000002", "iter_0000004"]}))
    (tmp_path / "latest").write_text("iter_0000002\n")
    assert resolve_latest(tmp_path) == (tmp_path / "iter_0000002", None)  # latest decides, not the step

    (tmp_path / "latest").write_text("iter_0000008\n")  # names an incomplete directory
    found, note = resolve_latest(tmp_path)
    assert found == tmp_path / "iter_0000004"  # the newest of the lineage, not the highest step (6)
    assert "'iter_0000008', which is not a complete checkpoint" in note and "iter_0000004" in note

    (tmp_path / "latest").unlink()
    found, note = resolve_latest(tmp_path)
    assert found == tmp_path / "iter_0000004" and "is missing" in note

    (tmp_path / "history.json").unlink()  # a root written before history.json existed: the highest step
    assert resolve_latest(tmp_path)[0] == tmp_path / "iter_0000006"

    assert resolve_latest(tmp_path / "nothing") == (None, None)
    assert resolve_resume(tmp_path, "none") == (None, None)
    assert resolve_resume(tmp_path, str(tmp_path / "iter_0000004"))[0] == tmp_path / "iter_0000004"
