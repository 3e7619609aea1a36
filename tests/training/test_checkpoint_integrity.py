"""Damaged checkpoints on real gloo ranks: flipped bytes, a cut file, a missing file, an older marker without
checksums, a pickle that would run code. One uninterrupted 2-rank run (DP2, ZeRO-1, 8 steps, a checkpoint
every 2) is the reference and the source of every damaged copy; each case resumes a copy and must end with the
uninterrupted run's losses, having moved each damaged checkpoint to abandoned/ with the reason."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, KEYS, _assert_same_steps

WORLD = 2
COMMON = ["train.steps=8", "optimizer.zero_stage=1", "checkpoint.interval=2", "checkpoint.keep_last=8"]
MODEL_FILE = "mp_rank_00_model_states.pt"  # read by both DP ranks
RANK1_ZERO = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # read by rank 1 only


def train_cases(values: dict, cases: list[tuple[str, list[str], int]]):
    """On each rank: train(cfg) once per case (name, overrides, rank whose wall clock is frozen or -1), in the
    same processes (one spawn for every case). Returns {name: (metrics per step or the error, log messages)}."""
    import logging
    import time

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.run_log import LOGGER_NAME, setup_logging
    from fpa_megatron.checkpoint.checkpointer import Checkpointer
    from fpa_megatron.training.trainer import train

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    setup_logging()
    logging.getLogger(LOGGER_NAME).addHandler(Collect())
    out = {}
    for name, overrides, frozen_rank in cases:
        frozen = torch.distributed.get_rank() == frozen_rank
        Checkpointer.clock = staticmethod((lambda: 0.0) if frozen else time.monotonic)
        messages.clear()
        try:
            result = [{k: h[k] for k in KEYS + ("step",)} for h in train(config_from_dict(values, overrides))]
        except Exception as err:  # noqa: BLE001 - the expected refusals, reported to the test
            result = f"{type(err).__name__}: {err}"
        out[name] = (result, list(messages))
    return out


def _values(tmp_path) -> dict:
    return {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}


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


class WritesAFileWhenUnpickled:
    """Unpickling this would create a directory: what a tampered checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _fpa_ckpt(args, capsys) -> tuple[int, str]:
    from fpa_megatron.checkpoint.cli import ckpt_main as main

    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (DP2, checkpoints 2, 4, 6, 8), then, in one spawn, every damaged copy resumed.

    {"straight": losses, "roots": {case: checkpoint root}, "before": {case: (code, fpa-ckpt verify output)
    before the resume}, case: (losses or the error, log messages)}."""
    import contextlib
    import io

    from fpa_megatron.checkpoint.format import load_deepspeed_file, mark_complete
    from fpa_megatron.checkpoint.cli import ckpt_main as fpa_ckpt

    tmp = tmp_path_factory.mktemp("integrity")
    straight = run_distributed(train_cases, WORLD, _values(tmp), [("straight", COMMON + [
        "checkpoint.resume=none", f"checkpoint.dir={tmp / 'straight'}"], -1)])[0]["straight"][0]
    roots = {}
    for case in ("flipped_and_cut", "missing_and_old", "explicit", "pickle"):
        roots[case] = tmp / case
        shutil.copytree(tmp / "straight", roots[case])

    flip_bytes_inside_a_tensor(roots["flipped_and_cut"] / "iter_0000008" / MODEL_FILE)
    cut = roots["flipped_and_cut"] / "iter_0000006" / RANK1_ZERO  # only rank 1 reads it: the ranks must agree
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (roots["missing_and_old"] / "iter_0000008" / "rng_rank_1.pt").unlink()
    (roots["missing_and_old"] / "iter_0000006" / "complete").write_text("6\n")  # the marker before checksums
    flip_bytes_inside_a_tensor(roots["explicit"] / "iter_0000006" / MODEL_FILE)
    model_file = roots["pickle"] / "iter_0000008" / MODEL_FILE  # read by both ranks
    pwned = tmp / "pwned"
    torch.save({**load_deepspeed_file(model_file), "payload": WritesAFileWhenUnpickled(str(pwned))}, model_file)
    mark_complete(roots["pickle"] / "iter_0000008", 8)  # checksums recomputed: whoever wrote it could too

    before = {}  # what fpa-ckpt verify says of the damaged copies, before any resume moves them
    for case, target in [("missing_and_old", roots["missing_and_old"]),
                         ("missing_and_old/iter_0000006", roots["missing_and_old"] / "iter_0000006"),
                         ("explicit/iter_0000006", roots["explicit"] / "iter_0000006")]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            before[case] = (fpa_ckpt(["verify", str(target)]), printed.getvalue())

    cases = [(case, COMMON + [f"checkpoint.dir={roots[case]}", resume], -1) for case, resume in [
        ("flipped_and_cut", "checkpoint.resume=auto"), ("missing_and_old", "checkpoint.resume=auto"),
        ("explicit", f"checkpoint.resume={roots['explicit'] / 'iter_0000006'}"),
        ("pickle", f"checkpoint.resume={roots['pickle'] / 'iter_0000008'}")]]
    for frozen_rank in (1, 0):  # interval_minutes=1e-9: any time at all is past the interval
        roots[f"frozen{frozen_rank}"] = tmp / f"frozen{frozen_rank}"
        cases.append((f"frozen{frozen_rank}", [
            "train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
            "checkpoint.interval_minutes=1e-9", "checkpoint.keep_last=8",
            f"checkpoint.dir={roots[f'frozen{frozen_rank}']}"], frozen_rank))
    per_rank = run_distributed(train_cases, WORLD, _values(tmp), cases)
    out = {"straight": straight, "roots": roots, "before": before, "pwned": pwned, "per_rank": per_rank}
    for case in per_rank[0]:
        out[case] = (per_rank[0][case][0], [m for r in per_rank for m in r[case][1]])
    return out


def test_flipped_and_cut_files_fall_back_twice_to_the_newest_intact(runs, capsys):
    root = runs["roots"]["flipped_and_cut"]
    history, messages = runs["flipped_and_cut"]
    assert [h["step"] for h in history] == [5, 6, 7, 8]
    _assert_same_steps(history, runs["straight"][4:])  # resumed from iter 4, as if nothing had happened
    reasons = {a["tag"]: a["because"] for a in json.loads((root / "history.json").read_text())["abandoned"]}
    assert f"{root / 'iter_0000008' / MODEL_FILE} does not match its checksum" in reasons["iter_0000008"]
    cut = root / "iter_0000006" / RANK1_ZERO
    assert f"rank 1: {cut} is " in reasons["iter_0000006"] and "truncated" in reasons["iter_0000006"]
    assert (root / "abandoned" / "iter_0000008" / MODEL_FILE).is_file()  # kept, never deleted
    assert (root / "abandoned" / "iter_0000006" / RANK1_ZERO).is_file()
    assert any("iter_0000008 is damaged" in m and "moved to" in m for m in messages)
    # the run went on from iter 4 and saved 6 and 8 again; latest names the new, intact 8
    assert (root / "latest").read_text().strip() == "iter_0000008"
    assert _fpa_ckpt([root / "iter_0000008"], capsys)[0] == 0


def test_a_missing_file_falls_back_to_an_older_checkpoint_without_checksums(runs):
    root = runs["roots"]["missing_and_old"]
    code, report = runs["before"]["missing_and_old"]
    assert code == 1  # latest (iter 8) is damaged
    assert f"iter_0000008: DAMAGED: {root / 'iter_0000008' / 'rng_rank_1.pt'} is missing  <- latest" in report
    assert "iter_0000006: no checksums" in report and "iter_0000004: intact (" in report
    assert runs["before"]["missing_and_old/iter_0000006"][0] == 0  # older format: loads

    history, messages = runs["missing_and_old"]
    _assert_same_steps(history, runs["straight"][6:])
    assert any(f"{root / 'iter_0000006'} has no checksums" in m for m in messages)
    assert (root / "abandoned" / "iter_0000008").is_dir()


def test_an_explicit_damaged_resume_is_an_error_naming_the_file(runs):
    from fpa_megatron.checkpoint.reader import CheckpointError, read_model_checkpoint

    target = runs["roots"]["explicit"] / "iter_0000006"
    error, _ = runs["explicit"]
    assert error.startswith("CheckpointIntegrityError") and f"{target / MODEL_FILE} does not match its checksum" in error
    assert (target / "complete").is_file() and not (target.parent / "abandoned").exists()  # explicit: nothing moved
    with pytest.raises(CheckpointError, match=f"{target / MODEL_FILE} does not match its checksum"):
        read_model_checkpoint(target)  # what fpa-export, fpa-eval and fpa-generate read through
    code, report = runs["before"]["explicit/iter_0000006"]
    assert code == 1 and "DAMAGED" in report


def test_deepspeed_files_refuse_a_pickle_that_would_run_code(runs, tmp_path):
    from fpa_megatron.checkpoint.format import load_deepspeed_file
    from fpa_megatron.checkpoint.integrity import CheckpointIntegrityError
    from fpa_megatron.checkpoint.cli import reshard_main as fpa_reshard

    ckpt = runs["roots"]["pickle"] / "iter_0000008"
    error, _ = runs["pickle"]  # through DeepSpeed's own engine.load_checkpoint
    assert f"{ckpt / MODEL_FILE} is not loadable with torch.load(weights_only=True)" in error, error
    with pytest.raises(CheckpointIntegrityError, match=f"{ckpt / MODEL_FILE} is not loadable with torch.load"):
        load_deepspeed_file(ckpt / MODEL_FILE)
    assert fpa_reshard(["--checkpoint", str(ckpt), "--tensor", "1", "--pipeline", "1",
                        "--out", str(tmp_path / "out")]) == 2
    assert not runs["pwned"].exists()
    zero = load_deepspeed_file(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # DeepSpeed's classes: allowed
    assert type(zero["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"


@pytest.mark.parametrize("frozen_rank,saved", [(1, ["iter_0000001", "iter_0000002", "iter_0000003"]), (0, [])],
                         ids=["rank0-clock-runs", "rank0-clock-frozen"])
def test_interval_minutes_saves_when_rank_0s_clock_says_so(runs, frozen_rank, saved):
    """interval_minutes=1e-9 with one rank's clock frozen: rank 0's clock decides for every rank."""
    root = runs["roots"][f"frozen{frozen_rank}"]
    assert not isinstance(runs[f"frozen{frozen_rank}"][0], str), runs[f"frozen{frozen_rank}"][0]
    for rank in range(WORLD):  # every rank wrote its files of the same checkpoints
        assert sorted(p.name for p in root.glob("iter_*")
                      if (p / "complete").is_file() and (p / f"rng_rank_{rank}.pt").is_file()) == saved
