"""Asynchronous checkpoints (checkpoint.async_save) on two real gloo ranks (DP2, ZeRO-1) of a tiny GPT.

The async run writes its checkpoints slowly (FPA_FAULT=slow_save: the writer sleeps before each file) while
training goes on, so the save of step 4 waits for the one of step 2 and the end of training for the one of step
4; the files must equal, byte for byte, those of the synchronous run (the staged copy is the state of its step,
not a later one). Every worker SIGKILLed while the step-4 checkpoint is being written leaves it without
`complete`; resume `auto` takes step 2 and the resumed run ends where the uninterrupted one does. A file that
cannot be written fails the run, naming it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from fpa_megatron.checkpoint.integrity import checkpoint_state
from fpa_megatron.checkpoint.staging import HostStaging
from fpa_megatron.testing import run_distributed

CONFIG = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"interval": 2, "keep_last": 10},
    "logging": {"interval": 1, "tensorboard": False},
}
KEYS = ("step", "lm_loss", "grad_norm", "lr", "lambda")


def _train(root: str, name: str, overrides: list[str], fault: str = "") -> list[dict]:
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    os.environ["FPA_FAULT"] = fault
    try:
        cfg = config_from_dict(CONFIG, overrides + [f"logging.dir={root}", f"logging.run_name={name}"])
        return [{k: h[k] for k in KEYS} for h in train(cfg)]
    finally:
        del os.environ["FPA_FAULT"]


def async_and_sync(root: str) -> dict:
    import torch.distributed as dist

    from fpa_megatron.run_log import setup_logging

    handler = logging.FileHandler(Path(root) / f"log_rank{dist.get_rank()}.txt")
    setup_logging(dist.get_rank()).addHandler(handler)
    out = {"async": _train(root, "async", [], fault="slow_save@2,slow_save@4")}
    final = Path(root) / "async" / "checkpoints" / "iter_0000004"
    out["complete_on_return"] = (final / "complete").is_file()  # the end of training waited for the slow write
    out["sync"] = _train(root, "sync", ["checkpoint.async_save=false"])
    handler.close()
    return out


def killed_then_resumed(root: str, fault: str) -> list[dict]:
    return _train(root, "killed", [], fault=fault)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    return run_distributed(async_and_sync, 2, str(root), timeout_s=300), root


def _checkpoint_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix in (".pt", ".json")}


def test_async_checkpoints_equal_sync_ones_byte_for_byte(runs):
    results, root = runs
    assert results[0]["async"] == results[0]["sync"]  # saving in the background does not disturb training
    for tag in ("iter_0000002", "iter_0000004"):
        written, reference = (root / name / "checkpoints" / tag for name in ("async", "sync"))
        assert checkpoint_state(written)[1], checkpoint_state(written)
        got, want = _checkpoint_files(written), _checkpoint_files(reference)
        assert len(want) == 7 and got.keys() == want.keys()  # model states, 2 ZeRO partitions, 2 RNG, state, layout
        assert [name for name in want if got[name] != want[name]] == []
        assert not [f.name for f in written.iterdir() if f.name.startswith(".")]  # the ranks' markers are gone
    assert (root / "async" / "checkpoints" / "latest").read_text().strip() == "iter_0000004"


def test_the_next_save_and_the_end_of_training_wait_for_the_one_in_flight(runs):
    results, root = runs
    assert results[0]["complete_on_return"]
    log = (root / "log_rank0.txt").read_text()
    assert "checkpoint iter_0000004 waited" in log and "for iter_0000002, still being written" in log


def test_workers_killed_mid_write_leave_an_incomplete_checkpoint_that_resume_skips(runs, tmp_path):
    results, _ = runs
    with pytest.raises(RuntimeError, match=r"rank \d died with exit code -9 \(SIGKILL\)"):
        run_distributed(killed_then_resumed, 2, str(tmp_path), "kill_in_save@4", timeout_s=300)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    partial = ckpts / "iter_0000004"
    assert any(partial.glob("*.pt")) and not (partial / "complete").exists()  # written in part, never counted
    assert checkpoint_state(partial) == ("incomplete (no 'complete' marker: its save did not finish)", False)

    resumed = run_distributed(killed_then_resumed, 2, str(tmp_path), "", timeout_s=300)[0]
    assert resumed == results[0]["sync"][2:]  # steps 3-4 from iter 2, bitwise as uninterrupted
    final = _checkpoint_files(ckpts / "iter_0000004")
    reference = _checkpoint_files(runs[1] / "sync" / "checkpoints" / "iter_0000004")
    # weights, ZeRO partitions, trainer state, layout: byte for byte (not the RNG files: torch's CPU generator
    # of a resumed run differs from the uninterrupted run's, drawn outside the training steps, which are equal)
    assert [name for name in reference if final[name] != reference[name] and not name.startswith("rng_")] == []


def test_a_file_that_cannot_be_written_fails_the_run_naming_it(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        run_distributed(killed_then_resumed, 2, str(tmp_path), "fail_save@2:1", timeout_s=300)
    file = tmp_path / "killed" / "checkpoints" / "iter_0000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert f"rank 1: writing checkpoint file {file} failed: IsADirectoryError" in str(failed.value)
    assert not (file.parent / "complete").exists()


def test_staging_keeps_storage_sharing_and_reuses_its_buffers():
    """torch.save writes a storage once however many tensors view it: the staged copy must share the same way
    (else the file differs), must not follow later changes, and the next save reuses the host buffers."""
    import io

    flat = torch.arange(12.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 4), "p": torch.nn.Parameter(torch.ones(3)), "t": (flat, 1)}
    state["again"] = state["t"]

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    staging = HostStaging()
    before, other = saved(state), {"x": torch.zeros(12)}  # a second file of the same save, as large
    staged, staged_other = staging.copy(state), staging.copy(other)
    assert saved(staged) == before and staging.nbytes == 2 * 12 * 4 + 3 * 4
    flat.mul_(2)
    assert saved(staged) == before and saved(staged_other) == saved(other)  # neither overwrote the other
    staging.rewind()  # the next save
    again = staging.copy(state)
    assert again["a"].untyped_storage().data_ptr() == staged["a"].untyped_storage().data_ptr()
    assert saved(again) == saved(state) and isinstance(again["p"], torch.nn.Parameter)


def test_the_planner_states_the_host_staging_memory(runs, capsys):
    """fpa-plan's host staging term against the files rank 0 writes (the model states and its ZeRO partition:
    the bytes it stages), within the pickle's bookkeeping; none when saves are synchronous."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.model.memory import Layout, step_memory
    from fpa_megatron.planner.cli import main
    from fpa_megatron.preflight import check_config

    _, root = runs
    cfg = config_from_dict(CONFIG)
    predicted = step_memory(cfg, Layout(data=2), check_config(cfg, 2).padded_vocab_size)["host_checkpoint_staging"]
    ckpt = root / "async" / "checkpoints" / "iter_0000004"
    written = sum(f.stat().st_size for f in (ckpt / "mp_rank_00_model_states.pt",
                                             ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert 0.9 * written < predicted <= written
    assert main(["configs/demo_cpu.yaml", "--gpus", "1", "--gpu-memory", "80", "model.vocab_size=1000"]) == 0
    assert "host memory (not GPU) per rank for checkpoint.async_save staging: " in capsys.readouterr().out
    assert main(["configs/demo_cpu.yaml", "--gpus", "1", "--gpu-memory", "80", "model.vocab_size=1000",
                 "checkpoint.async_save=false"]) == 0
    assert "staging" not in capsys.readouterr().out
