"""launch/slurm.sbatch under a real SLURM (tests/slurm_cluster.py: slurmctld and two slurmd, n1 and n2, on this
machine): `sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=1` with GPUS_PER_NODE=1 trains the fault drills'
tiny GPT (DP2, ZeRO-1, gloo, 60 steps) with one rank on each node. Every run's losses are read back from its
TensorBoard files (one file per attempt) and compared, exactly, with one node running both ranks
(launch/torchrun.sh, 2 processes, the same config file).

- the two-node job = one node; a config error fails the job before any node starts, and is not requeued;
- the time-limit signal: SLURM signals the batch shell with SIGUSR1 (what `#SBATCH --signal=B:USR1@600` does
  ahead of the time limit; sent here by `scancel --signal=USR1 --batch`, the same delivery, as soon as step 2
  is logged, instead of waiting minutes for a short --time to run out): the workers stop with a checkpoint
  (exit 75), the script requeues the job, the requeued job resumes from that checkpoint and ends on the
  one-node trajectory;
- node n2 lost mid-run (its slurmd, slurmstepd and tasks SIGKILLed), MAX_RESTARTS=1: the survivor's rank names
  the lost peer and its torchrun restarts the group, waiting for the node; SLURM sets n2 DOWN (SlurmdTimeout),
  names it, and requeues the job (--requeue); once n2's slurmd is back the job runs again, resuming from the
  newest checkpoint on the one-node trajectory;
- scancel of that requeued job (SIGTERM to every process of the job): the workers save the step they reached;
  the job ends CANCELLED, not requeued. (One job for both: each is a SLURM job start less on 2 cores.)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from fpa_megatron.checkpoint.lineage import complete_checkpoints
from fpa_megatron.testing import free_port
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from tests.training.tensorboard_losses import losses_per_attempt
from tests.training.test_multinode import CONFIG as MULTINODE_CONFIG, _env, one_node_losses

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm.sbatch"
STEPS = 60  # ~0.1 s a step: time for a signal sent at step 2 to reach the workers (~2 s) well before the end
CONFIG = {**MULTINODE_CONFIG, "train": {**MULTINODE_CONFIG["train"], "steps": STEPS},
          "checkpoint": {**MULTINODE_CONFIG["checkpoint"], "interval": 0}}  # only the stop's and the end's
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("slurm_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, config_file) -> dict[int, float]:
    return one_node_losses(config_file, tmp_path_factory.mktemp("one_node"), STEPS)


def _submit(cluster, config_file: str, work: Path, extra: tuple = (), **env) -> str:
    """sbatch launch/slurm.sbatch on both nodes, one rank each; the run in work/run, the job's output in
    work/job-<id>.out (appended to by a requeued job)."""
    env = {**cluster.env, **_env(), "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), **env}
    return cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--chdir={ROOT}",
                           f"--output={work}/job-%j.out", str(SBATCH), config_file, f"logging.dir={work}",
                           "logging.run_name=run", f"data.cache_dir={work / 'cache'}", *extra], env=env, cwd=str(ROOT))


def _output(work: Path, job: str) -> str:
    path = work / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(what: str, condition, cluster, job: str, work: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        states = cluster.job_states(job)
        if time.monotonic() > deadline or set(states.values()) & set(ENDED):
            raise AssertionError(f"no {what}: job {job} {states}\n{_output(work, job)[-3000:]}")
        time.sleep(0.1)


def _wait_for_step(cluster, job: str, work: Path, step: int, after: str = "") -> None:
    """Until rank 0 logged step `step` (after the last line with `after`, if given)."""
    def logged() -> bool:
        text = _output(work, job)
        return f"] step {step}/{STEPS} " in (text.split(after)[-1] if after else text)

    _wait_for(f"step {step}", logged, cluster, job, work)


def _restarts(cluster, job: str) -> int:
    return int(re.search(r"\bRestarts=(\d+)", cluster.run(["scontrol", "-o", "show", "job", job]).stdout).group(1))


def _resumed_at(log: str) -> int:
    (step,) = {int(s) for s in re.findall(r"\[rank 0\] resumed from \S+iter_(\d+) at step \d+", log)}
    return step


def test_two_node_job_equals_one_node_torchrun(slurm_cluster, tmp_path, config_file, one_node):  # noqa: F811
    job = _submit(slurm_cluster, config_file, tmp_path)
    assert slurm_cluster.wait(job, timeout=300) == {job: "COMPLETED"}, _output(tmp_path, job)[-3000:]
    log = _output(tmp_path, job)
    assert f"fpa-megatron: job {job} on 2 nodes x 1 GPUs, rendezvous n1:" in log
    assert "NodeList=n[1-2]" in slurm_cluster.run(["scontrol", "-o", "show", "job", job]).stdout
    assert losses_per_attempt(tmp_path / "run") == [one_node]
    assert _restarts(slurm_cluster, job) == 0


def test_a_config_error_fails_before_any_node_starts_and_is_not_requeued(slurm_cluster, tmp_path,  # noqa: F811
                                                                         config_file):
    job = _submit(slurm_cluster, config_file, tmp_path, extra=["model.hidden_size=30"])
    assert slurm_cluster.wait(job) == {job: "FAILED"}
    first, error = _output(tmp_path, job).splitlines()  # nothing else: no store, no srun
    assert first.startswith(f"fpa-megatron: job {job} on 2 nodes x 1 GPUs, rendezvous n1:")
    assert error.startswith("fpa-train: config error: ") and "model.hidden_size=30" in error, error
    assert _restarts(slurm_cluster, job) == 0
    assert "ExitCode=2:0" in slurm_cluster.run(["scontrol", "-o", "show", "job", job]).stdout


def test_time_limit_signal_saves_requeues_and_the_job_resumes_equal(slurm_cluster, tmp_path,  # noqa: F811
                                                                     config_file, one_node):
    job = _submit(slurm_cluster, config_file, tmp_path)
    _wait_for_step(slurm_cluster, job, tmp_path, 2)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    assert slurm_cluster.wait(job, timeout=300) == {job: "COMPLETED"}, _output(tmp_path, job)[-3000:]
    log = _output(tmp_path, job)
    assert "fpa-megatron: SIGUSR1 ahead of the time limit: asking the workers to save and stop" in log, log[-3000:]
    # each node's launch/torchrun.sh ends with its line (the first rank of each node reports the code)
    assert log.count("torchrun.sh: SIGUSR1 reached torchrun, which passed it to the workers: they stopped with "
                     "exit code 75 (") == 2, log[-3000:]
    assert f"fpa-megatron: requeueing job {job}" in log
    assert _restarts(slurm_cluster, job) == 1
    stopped = _resumed_at(log)  # the requeued job resumed from the checkpoint saved at the signal
    first, second = losses_per_attempt(tmp_path / "run")
    assert 2 <= stopped < STEPS and sorted(first) == list(range(1, stopped + 1)), (stopped, sorted(first))
    assert first == {s: one_node[s] for s in first}
    assert second == {s: one_node[s] for s in range(stopped + 1, STEPS + 1)}


@pytest.fixture(scope="module")
def lost_node_then_scancel(slurm_cluster, tmp_path_factory, config_file) -> dict:  # noqa: F811
    """One job, MAX_RESTARTS=1, a checkpoint every 10 steps: node n2 is lost after step 12 (its slurmd, slurmstepd
    and tasks SIGKILLed); once SLURM has set n2 DOWN and requeued the job, n2's slurmd starts again; the requeued
    job resumes, and 2 steps after its resume it is cancelled (scancel)."""
    work = tmp_path_factory.mktemp("lost_node")
    job = _submit(slurm_cluster, config_file, work, extra=["checkpoint.interval=10"], MAX_RESTARTS="1")
    _wait_for_step(slurm_cluster, job, work, 12)
    try:
        killed = slurm_cluster.kill_node("n2")
        _wait_for("n2 down and the job requeued",
                  lambda: slurm_cluster.node_states().get("n2", "").startswith("down")
                  and slurm_cluster.job_states(job) == {job: "PENDING"},
                  slurm_cluster, job, work, timeout_s=120)
    finally:
        slurm_cluster.start_node("n2")  # the node is back (ReturnToService=2); the cluster whole for later tests
    _wait_for("a resume", lambda: "resumed from" in _output(work, job), slurm_cluster, job, work)
    resumed = _resumed_at(_output(work, job))
    _wait_for_step(slurm_cluster, job, work, resumed + 2, after="resumed from")
    slurm_cluster.run(["scancel", job])
    return {"job": job, "work": work, "killed": killed, "state": slurm_cluster.wait(job, timeout=120),
            "restarts": _restarts(slurm_cluster, job), "log": _output(work, job), "resumed": resumed,
            "ctld_log": slurm_cluster.log("slurmctld"),
            "attempts": [a for a in losses_per_attempt(work / "run") if a]}


def test_a_lost_node_is_requeued_by_slurm_and_the_job_resumes_on_the_trajectory_when_it_returns(
        lost_node_then_scancel, one_node):
    run = lost_node_then_scancel
    job, log, resumed, attempts = run["job"], run["log"], run["resumed"], run["attempts"]
    assert run["killed"], "no process of the job was running on n2"
    assert "srun: error: Node failure on n2" in log, log[-3000:]
    assert f"requeue job JobId={job} due to failure of node n2" in run["ctld_log"]
    # the survivor's torchrun restarted its group (MAX_RESTARTS=1) after its rank named the lost peer
    assert re.search(r"ERROR: rank \d \(host \S+\) failed at step \d+: the lost or stalled peer is on node \d",
                     log), log[-3000:]
    assert run["restarts"] == 1
    assert resumed >= 10 and len(attempts) == 2, (resumed, [sorted(a) for a in attempts])
    assert max(attempts[0]) >= 12 and attempts[0] == {s: one_node[s] for s in attempts[0]}
    stop = max(attempts[1])
    assert attempts[1] == {s: one_node[s] for s in range(resumed + 1, stop + 1)}


def test_scancel_saves_and_does_not_requeue(lost_node_then_scancel, one_node):
    """scancel (SIGTERM to every process of the job, SIGKILL KillWait seconds later): the workers finish the
    step, save it and stop; the job ends CANCELLED and is not requeued (the one restart is the lost node's)."""
    run = lost_node_then_scancel
    log, attempts = run["log"], run["attempts"]
    assert run["state"] == {run["job"]: "CANCELLED"}, log[-3000:]
    assert "requeueing" not in log and run["restarts"] == 1, log[-3000:]
    assert ("torchrun.sh: SIGTERM reached torchrun, which passed it to the workers: they stopped with exit code 75 ("
            in log), log[-3000:]
    stop = max(attempts[-1])
    assert run["resumed"] + 2 <= stop < STEPS
    checkpoints = complete_checkpoints(run["work"] / "run" / "checkpoints")
    assert checkpoints[-1].name == f"iter_{stop:07d}", (checkpoints, log[-3000:])
