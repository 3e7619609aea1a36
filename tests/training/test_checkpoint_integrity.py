"""Damaged checkpoints on real gloo ranks: flipped bytes, a cut file, a missing file, an older marker without
checksums, a pickle that would run code. One uninterrupted 2-rank run (DP2, ZeRO-1, 8 steps, a checkpoint
every 2) is the reference and the source of every damaged copy; each case resumes a copy and must end with the
uninterrupted run's losses, having moved each damaged checkpoint to abandoned/ with the reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, KEYS, _assert_same_steps

WORLD = 2
COMMON = ["train.steps=8", "optimizer.zero_stage=1", "checkpoint.interval=2", "checkpoint.keep_last=8"]
MODEL_FILE = "mp_rank_00_model_states.pt"  # read by both DP ranks
RANK1_ZERO = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # read by rank 1 only


def train_rank_logging(values: dict, overrides: list[str]):
    """train(cfg) on this rank; returns (metrics per step, this rank's log messages)."""
    import logging

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.logging.run_log import LOGGER_NAME, setup_logging
    from fpa_megatron.training.trainer import train

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    setup_logging()
    logging.getLogger(LOGGER_NAME).addHandler(Collect())
    history = train(config_from_dict(values, overrides))
    return [{k: h[k] for k in KEYS + ("step",)} for h in history], messages


def _values(tmp_path) -> dict:
    return {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(losses of the uninterrupted run, its checkpoint root with iter 2, 4, 6, 8)."""
    root = tmp_path_factory.mktemp("straight")
    (history, _), _ = run_distributed(train_rank_logging, WORLD, _values(root), COMMON + [
        "checkpoint.resume=none", f"checkpoint.dir={root / 'ckpt'}", "logging.run_name=straight"])
    return history, root / "ckpt"


def _copy(straight, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(straight[1], root)
    return root


def flip_bytes_inside_a_tensor(file) -> None:
    """64 bytes of the largest tensor record of a torch zip file inverted (torch.load still reads it)."""
    import zipfile

    with zipfile.ZipFile(file) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(file, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()))  # the local header precedes the bytes
        f.seek(info.file_size // 2, os.SEEK_CUR)
        chunk = bytearray(f.read(64))
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    torch.load(file, weights_only=True)  # still loads: only the checksum can tell


def _resume(tmp_path, root, *extra):
    results = run_distributed(train_rank_logging, WORLD, _values(tmp_path), COMMON + [
        f"checkpoint.dir={root}", "logging.run_name=resumed", *extra])
    return results[0][0], [m for _, messages in results for m in messages]


def test_flipped_and_cut_files_fall_back_twice_to_the_newest_intact(tmp_path, straight):
    from fpa_megatron.training.integrity import main as fpa_ckpt

    root = _copy(straight, tmp_path)
    flip_bytes_inside_a_tensor(root / "iter_0000008" / MODEL_FILE)
    cut = root / "iter_0000006" / RANK1_ZERO  # only rank 1 reads it: the ranks must agree
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    history, messages = _resume(tmp_path, root, "checkpoint.resume=auto")

    assert [h["step"] for h in history] == [5, 6, 7, 8]
    _assert_same_steps(history, straight[0][4:])  # resumed from iter 4, as if nothing had happened
    record = json.loads((root / "history.json").read_text())["abandoned"]
    reasons = {a["tag"]: a["because"] for a in record}
    assert f"{root / 'iter_0000008' / MODEL_FILE} does not match its checksum" in reasons["iter_0000008"]
    assert f"rank 1: {cut} is " in reasons["iter_0000006"] and "truncated" in reasons["iter_0000006"]
    assert (root / "abandoned" / "iter_0000008" / MODEL_FILE).is_file()  # kept, never deleted
    assert (root / "abandoned" / "iter_0000006" / RANK1_ZERO).is_file()
    assert any("iter_0000008 is damaged" in m and "moved to" in m for m in messages)
    # the run went on from iter 4 and saved 6 and 8 again; latest names the new 8
    assert (root / "latest").read_text().strip() == "iter_0000008"
    assert fpa_ckpt(["verify", str(root / "iter_0000008")]) == 0


def test_a_missing_file_falls_back_to_an_older_checkpoint_without_checksums(tmp_path, straight, capsys):
    from fpa_megatron.training.integrity import main as fpa_ckpt

    root = _copy(straight, tmp_path)
    (root / "iter_0000008" / "rng_rank_1.pt").unlink()
    (root / "iter_0000006" / "complete").write_text("6\n")  # the marker written before checksums existed

    assert fpa_ckpt(["verify", str(root)]) == 1  # latest (iter 8) is damaged
    report = capsys.readouterr().out
    assert f"iter_0000008: DAMAGED: {root / 'iter_0000008' / 'rng_rank_1.pt'} is missing  <- latest" in report
    assert "iter_0000006: no checksums" in report and "iter_0000004: intact (" in report
    assert fpa_ckpt(["verify", str(root / "iter_0000006")]) == 0

    history, messages = _resume(tmp_path, root, "checkpoint.resume=auto")
    _assert_same_steps(history, straight[0][6:])
    assert any(f"{root / 'iter_0000006'} has no checksums" in m for m in messages)
    assert (root / "abandoned" / "iter_0000008").is_dir()


def test_an_explicit_damaged_resume_is_an_error_naming_the_file(tmp_path, straight, capsys):
    from fpa_megatron.training.checkpoint_reader import CheckpointError, read_model_checkpoint
    from fpa_megatron.training.integrity import main as fpa_ckpt

    root = _copy(straight, tmp_path)
    target = root / "iter_0000006"
    flip_bytes_inside_a_tensor(target / MODEL_FILE)
    with pytest.raises(RuntimeError) as err:
        _resume(tmp_path, root, f"checkpoint.resume={target}")
    assert "CheckpointIntegrityError" in str(err.value)
    assert f"{target / MODEL_FILE} does not match its checksum" in str(err.value)
    assert (target / "complete").is_file() and not (root / "abandoned").exists()  # explicit: nothing moved

    with pytest.raises(CheckpointError, match=f"{target / MODEL_FILE} does not match its checksum"):
        read_model_checkpoint(target)  # what fpa-export, fpa-eval and fpa-generate read through
    assert fpa_ckpt(["verify", str(target)]) == 1
    assert "DAMAGED" in capsys.readouterr().out


class WritesAFileWhenUnpickled:
    """Unpickling this would create a directory: what a tampered checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_deepspeed_files_refuse_a_pickle_that_would_run_code(tmp_path, straight):
    from fpa_megatron.training.checkpoint import load_deepspeed_file, mark_complete
    from fpa_megatron.training.integrity import CheckpointIntegrityError
    from fpa_megatron.training.reshard import main as fpa_reshard

    root = _copy(straight, tmp_path)
    ckpt = root / "iter_0000008"
    zero = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = load_deepspeed_file(zero)  # DeepSpeed's own classes are allowed
    assert type(state["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"
    pwned = tmp_path / "pwned"
    torch.save({**state, "payload": WritesAFileWhenUnpickled(str(pwned))}, zero)
    mark_complete(ckpt, 8)  # checksums recomputed: whoever wrote the file could do that too
    with pytest.raises(CheckpointIntegrityError, match=f"{zero} is not loadable with torch.load"):
        load_deepspeed_file(zero)
    assert fpa_reshard(["--checkpoint", str(ckpt), "--tensor", "1", "--pipeline", "1",
                        "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(RuntimeError, match=r"optim_states.pt is not loadable with torch.load\(weights_only=True\)"):
        _resume(tmp_path, root, f"checkpoint.resume={ckpt}")
    assert not pwned.exists()


# ------------------------------------------------------------------------------------------ interval_minutes


def train_rank_with_a_frozen_clock(values: dict, overrides: list[str], frozen_rank: int):
    """train(cfg) where one rank's wall clock never moves; returns the checkpoints each rank saw written."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.checkpoint import Checkpointer
    from fpa_megatron.training.trainer import train

    if torch.distributed.get_rank() == frozen_rank:
        Checkpointer.clock = staticmethod(lambda: 0.0)
    cfg = config_from_dict(values, overrides)
    train(cfg)
    rank = torch.distributed.get_rank()
    return sorted(p.name for p in Path(cfg.checkpoint.dir).glob("iter_*")
                  if (p / "complete").is_file() and (p / f"rng_rank_{rank}.pt").is_file())


@pytest.mark.parametrize("frozen_rank,saved", [(1, ["iter_0000001", "iter_0000002", "iter_0000003"]), (0, [])],
                         ids=["rank0-clock-runs", "rank0-clock-frozen"])
def test_interval_minutes_saves_when_rank_0s_clock_says_so(tmp_path, frozen_rank, saved):
    """interval_minutes=1e-9: any time at all is past the interval. Rank 0's clock decides for every rank."""
    results = run_distributed(train_rank_with_a_frozen_clock, WORLD, _values(tmp_path), [
        "train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
        "checkpoint.interval_minutes=1e-9", "checkpoint.keep_last=8", f"checkpoint.dir={tmp_path / 'ckpt'}"], frozen_rank)
    assert results == [saved, saved]  # every rank wrote its files of the same checkpoints
