"""A stalled rank: before the collective timeout fails the run, every rank writes its Python stacks to the run
directory (the hung one's shows where it hangs), and the failure line says where they are."""

from __future__ import annotations

import pytest

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE

TIMEOUT_MINUTES = 0.1  # 6 s: the stacks come at 90 % of it


def stalled_rank(values: dict, fault: str):
    import os

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.run_log import failure_line
    from fpa_megatron.training.trainer import train

    os.environ["FPA_FAULT"] = fault  # rank 1 hangs as step 3 starts (tests and drills only)
    try:
        train(config_from_dict(values))
    except Exception as err:  # noqa: BLE001 - rank 0 times out waiting for rank 1: hand its failure line back
        raise RuntimeError(f"FAILURE LINE {failure_line(err, TIMEOUT_MINUTES)}") from None


@pytest.mark.parametrize("fault", ["stall_rank@3:1", "stall_rank@3:1,sigterm@3:0"],
                         ids=["stall", "stall-then-stop-signal"])  # a stop request cannot finish the step either
def test_a_stalled_step_leaves_every_ranks_stacks_and_the_failure_line_names_them(tmp_path, fault):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path), "run_name": "stall"},
              "parallel": {"timeout_minutes": TIMEOUT_MINUTES}}
    with pytest.raises(RuntimeError, match="FAILURE LINE") as failed:
        run_distributed(stalled_rank, 2, values, fault, timeout_s=120)
    line = str(failed.value).rsplit("FAILURE LINE ", 1)[1].splitlines()[0]  # the message, not the source line
    stacks = tmp_path / "stall" / "stacks"
    assert line.startswith("rank 0 ") and "failed at step 3: a collective did not complete" in line, line
    assert line.endswith(f"every rank's Python stacks at the stall: {stacks}/"), line
    hung, waiting = (stacks / "rank1.txt").read_text(), (stacks / "rank0.txt").read_text()
    assert hung.startswith("Timeout (0:00:05") and "faults.py" in hung and "begin_step" in hung, hung
    assert waiting.startswith("Timeout (0:00:05") and "in all_reduce" in waiting, waiting  # waiting in a collective


def test_a_run_without_a_stall_leaves_no_stacks(tmp_path):
    from tests.training.test_trainer import train_rank

    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    run_distributed(train_rank, 2, values, ["logging.run_name=calm", "train.steps=2"])
    assert (tmp_path / "calm").is_dir() and not (tmp_path / "calm" / "stacks").exists()


def stopped_then_lost(values: dict):
    """A run that rank 1's SIGTERM stops cleanly after step 2; then one whose rank 0 gets SIGTERM as step 3
    starts while rank 1 dies (as a launcher kills a rank that does not stop): rank 0's failure line comes back."""
    import os

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.exit_codes import Preempted
    from fpa_megatron.run_log import failure_line
    from fpa_megatron.training.trainer import train

    os.environ["FPA_FAULT"] = "sigterm@2:1"
    try:
        train(config_from_dict(values, ["logging.run_name=stopped"]))
    except Preempted:
        pass
    os.environ["FPA_FAULT"] = "sigterm@3:0,kill_rank@3:1"
    try:
        train(config_from_dict(values, ["logging.run_name=lost"]))
    except Exception as err:  # noqa: BLE001 - rank 0 loses rank 1 in the step's collective
        raise RuntimeError(f"FAILURE LINE {failure_line(err, TIMEOUT_MINUTES)}") from None


def test_stacks_at_a_stop_signal_stay_only_when_the_stop_did_not_go_through(tmp_path):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}, "parallel": {"timeout_minutes": 0.5}}
    with pytest.raises(RuntimeError, match="FAILURE LINE") as failed:
        run_distributed(stopped_then_lost, 2, values, timeout_s=120)
    assert (tmp_path / "stopped").is_dir() and not (tmp_path / "stopped" / "stacks").exists()  # saved and left
    line = str(failed.value).rsplit("FAILURE LINE ", 1)[1].splitlines()[0]
    stacks = tmp_path / "lost" / "stacks"
    assert line.startswith("rank 0 ") and "failed at step 3" in line, line
    assert line.endswith(f"the Python stacks at the stop signal: {stacks}/"), line
    written = {p.name: p.stat().st_size > 0 for p in stacks.iterdir()}
    # rank 0 stopped at no stall; rank 1 got no signal, and its killed process left its (empty) files behind
    assert written == {"rank0.stop_signal.txt": True, "rank1.txt": False, "rank1.stop_signal.txt": False}, written
    at_signal = (stacks / "rank0.stop_signal.txt").read_text()
    assert "(most recent call first)" in at_signal and "in _sigterm" in at_signal, at_signal  # where it was
