"""launch/torchrun.sh speaks in one line: what a user sees of a config error, a forwarded signal and a failed
worker, asserted whole. Real torchrun with 2 gloo workers of a tiny GPT on mock data (the fault drills' config);
the signal is sent to the launcher's pid, the failure is FPA_FAULT's (tests/training/test_fault_drills.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from fpa_megatron.testing import free_port
from tests.training.test_fault_drills import CONFIG

ROOT = Path(__file__).resolve().parents[1]
TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")  # the log lines' timestamp
LAUNCHER_LOG = re.compile(r"torchrun's log: (\S+/run/launcher/torchrun-\d{8}-\d{6}-\S+-\d+\.log)$")


def _launch(tmp_path: Path, *overrides: str, fault: str = "") -> subprocess.Popen:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if k not in ("FPA_FAULT", "MASTER_PORT", "MAX_RESTARTS")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", FPA_FAULT=fault)
    return subprocess.Popen(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--master-port", str(free_port()),
                             str(config), f"logging.dir={tmp_path}", "logging.run_name=run", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(text: str) -> list[str]:
    return [TIME.sub("", line) for line in text.splitlines()]


def _launcher_log(line: str, tmp_path: Path) -> str:
    """The launcher's last line names torchrun's log, in the run directory; returns that log's text."""
    found = LAUNCHER_LOG.search(line)
    assert found and Path(found.group(1)).parent == tmp_path / "run" / "launcher", line
    return Path(found.group(1)).read_text()


def test_config_error_is_its_one_line_and_torchrun_never_starts(tmp_path):
    """A dataset .bin cut in half: the launcher's check names the file and both sizes, exits 2, nothing after."""
    from data_prep.builtin_corpus import gather
    from data_prep.encode import EncodeOptions, run_encode
    from data_prep.merge import merge_encode_dir
    from data_prep.tokenizer import train_bytelevel_bpe
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    docs = [d["text"] for d in gather(1 << 15)]
    train_bytelevel_bpe(docs, str(tmp_path / "tok"), vocab_size=300, sample_size=2000, seed=1)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    _, status = run_encode(EncodeOptions(inputs=[str(tmp_path / "corpus.jsonl")],
                                         tokenizer=str(tmp_path / "tok" / "tokenizer.json"),
                                         out_dir=str(tmp_path / "data"), name="corpus", num_shards=1, workers=1,
                                         progress=False))
    assert status == 0
    merge_encode_dir(str(tmp_path / "data"))
    prefix = tmp_path / "data" / "corpus"
    data = [f"data.prefixes=[{prefix}]", f"data.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}",
            "data.mock=false", "model.vocab_size=null", "data.split=100,0,0"]
    check_config(config_from_dict(CONFIG, data + [f"logging.dir={tmp_path}"]), 2)  # whole: a valid config
    bin_file = Path(f"{prefix}.bin")
    bin_file.write_bytes(bin_file.read_bytes()[:bin_file.stat().st_size // 2])
    with pytest.raises(ConfigError) as expected:
        check_config(config_from_dict(CONFIG, data + [f"logging.dir={tmp_path}"]), 2)
    assert str(bin_file) in str(expected.value)

    proc = _launch(tmp_path, *data)
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode, out, err) == (2, "", f"fpa-train: config error: {expected.value}\n")
    assert not (tmp_path / "run" / "launcher").exists()  # torchrun never started


def test_forwarded_signal_is_one_line_with_the_workers_exit_code(tmp_path):
    """SIGUSR1 to the launcher (SLURM's warning ahead of the time limit): the workers save and stop; torchrun's
    SignalException tracebacks stay in its log."""
    proc = _launch(tmp_path, "train.steps=500")
    for line in proc.stdout:
        if "step 3/500" in line:
            os.kill(proc.pid, signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=300)
    lines = _lines(err)
    step = re.search(r"stopped after step (\d+)", err)
    assert proc.returncode == 75 and step, err
    received = "WARNING: SIGUSR1 received: finishing this step, then saving a checkpoint and exiting (code 75)"
    assert sorted(lines[:2]) == [f"[rank 0] {received}", f"[rank 1] {received}"]
    n = step.group(1)
    assert lines[2:-1] == [
        f"[rank 0] WARNING: SIGUSR1: stopped after step {n}, checkpoint saved at step {n}; rerun the same command "
        f"to resume (exit code 75: preempted: stopped with a checkpoint, rerun to resume)"]
    assert lines[-1].startswith("torchrun.sh: SIGUSR1 reached torchrun, which passed it to the workers: they "
                                "stopped with exit code 75 (preempted: stopped with a checkpoint, rerun to resume); "
                                "torchrun's log: ")
    assert "SignalException" in _launcher_log(lines[-1], tmp_path)  # torchrun's traceback: in the log only
    assert all(line.startswith("[rank 0] ") for line in _lines(out))  # stdout: rank 0's progress only


def test_worker_failure_is_one_line_with_the_exit_code_and_its_meaning(tmp_path):
    """Every step's loss NaN and no skip allowed: the workers exit 81 (diverged); torchrun's ChildFailedError
    block stays in its log."""
    proc = _launch(tmp_path, "train.max_consecutive_skips=0", fault="nan_loss@2+")
    out, err = proc.communicate(timeout=300)
    lines = _lines(err)
    forensics = tmp_path / "run" / "forensics" / "step_0000002.json"  # the skipped step's samples
    assert proc.returncode == 81, err
    assert lines[:-1] == [
        "[rank 0] WARNING: FPA_FAULT=nan_loss@2+: fault injection is on (tests and drills only)",
        f"[rank 0] WARNING: step 2: its 8 samples are in {forensics}; data.exclude_samples=[{forensics}] leaves "
        "them out of a rerun",
        "[rank 0] WARNING: step 2: update skipped on every rank (loss or gradients not finite on some rank, lm_loss "
        "nan); 1 skipped so far, 1 in a row (train.max_consecutive_skips=0)",
        "[rank 0] ERROR: step 2: 1 steps in a row were skipped (more than train.max_consecutive_skips=0); the run "
        "has diverged; nothing is saved after step 1 (exit code 81: diverged: too many consecutive skipped steps)"]
    assert re.match(r"torchrun\.sh: the workers failed: rank [01], the first, exited with code 81 \(diverged: too "
                    r"many consecutive skipped steps\); torchrun stopped the others; torchrun's log: ", lines[-1])
    assert "ChildFailedError" in _launcher_log(lines[-1], tmp_path)
    assert all(line.startswith("[rank 0] ") for line in _lines(out))


def test_killed_worker_is_one_line_naming_the_signal(tmp_path):
    """Rank 1 SIGKILLed at step 3 (no restarts): torchrun stops rank 0; the line names rank 1 and SIGKILL, and the
    launcher exits with torchrun's 1 (a signal is no exit code of its own)."""
    proc = _launch(tmp_path, fault="kill_rank@3:1")
    out, err = proc.communicate(timeout=300)
    lines = _lines(err)
    assert proc.returncode == 1, err
    # rank 0 may report its own failure (the collective it waited in broke) before torchrun stops it, or not
    survivor = [line for line in lines if line.startswith("[rank 0] ERROR: rank 0 (host ")]
    assert len(survivor) <= 1 and all(" failed at step 3: " in line for line in survivor)
    # the step-2 checkpoint is written in the background: if rank 1 died before it was durable, rank 0 says so
    abandoned = [line for line in lines if line.endswith("was still being written: abandoned")]
    assert abandoned in ([], ["[rank 0] WARNING: checkpoint iter_0000002 was still being written: abandoned"])
    assert [line for line in lines[:-1] if line not in survivor + abandoned] == [
        "[rank 0] WARNING: FPA_FAULT=kill_rank@3:1: fault injection is on (tests and drills only)",
        "[rank 1] WARNING: FPA_FAULT: rank 1 kills itself (SIGKILL) at step 3"]
    assert re.match(r"torchrun\.sh: the workers failed: rank 1, the first, exited with code -9 \(killed by "
                    r"SIGKILL\); torchrun stopped the others; torchrun's log: ", lines[-1])
    assert "ChildFailedError" in _launcher_log(lines[-1], tmp_path)
