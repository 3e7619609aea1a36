"""Two "nodes" on one machine: two torchrun agents (launch/torchrun.sh --nnodes 2, one rank each) of a tiny GPT
(data parallel 2, ZeRO-1), with the c10d rendezvous on 127.0.0.1. A node is lost as torchrun would see it:
FPA_FAULT=kill_node SIGKILLs its agent and its worker as step 4 starts. Every run's losses are read back from
its TensorBoard files and compared with one node running both ranks.

- straight: two nodes = one node;
- a lost node that did not host the rendezvous store comes back 5 s later: the survivor's agent restarts the
  group (--max-restarts), both resume from the newest checkpoint and end equal to the uninterrupted run;
- the store hosted outside the agents (--external-store, python -m fpa_megatron.parallel.rendezvous_store):
  node 0, which would otherwise host it, is lost and comes back: the same;
- a node that never comes back: the survivor fails within parallel.timeout_minutes, naming the lost node;
- unless the job is elastic (--nnodes 1:2): then the survivor goes on alone, its newest checkpoint's ZeRO
  partitions rewritten for DP1, and ends with the two-node run's losses.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from fpa_megatron.testing import free_port
from tests.training.tensorboard_losses import losses_per_attempt
from tests.training.test_fault_drills import CONFIG as DRILL_CONFIG

ROOT = Path(__file__).resolve().parents[2]
# the fault drills' tiny GPT (DP2, ZeRO-1, checkpoints every 2 steps), without the attention probes
CONFIG = {**DRILL_CONFIG, "logging": {**DRILL_CONFIG["logging"], "attention_stats_interval": 0}}
STEPS = CONFIG["train"]["steps"]
LOST_AT = 4  # the node is lost as step 4 starts; the newest checkpoint is step 2
KILL_NODE = f"kill_node@{LOST_AT}:0,kill_node@{LOST_AT}:1"  # set on one agent only: fires on its rank, whichever


def _env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FPA_FAULT", "MASTER_PORT", "MASTER_ADDR", "MAX_RESTARTS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "NNODES", "NODE_RANK", "RDZV_ID", "EXTERNAL_STORE", "JOIN_TIMEOUT", "LAST_CALL")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    if fault:
        env["FPA_FAULT"] = fault
    return env


def _agent(config_file: str, log_dir: Path, port: int, log_file: Path, *launcher_args: str,
           fault: str | None = None, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    """One node: launch/torchrun.sh with one rank, output to log_file."""
    out = open(log_file, "ab")
    return subprocess.Popen(["bash", "launch/torchrun.sh", "--nnodes", "2", "--nproc-per-node", "1",
                             "--master-port", str(port), *launcher_args, config_file, f"logging.dir={log_dir}",
                             "logging.run_name=run", "data.cache_dir=" + str(log_dir / "cache"), *overrides],
                            cwd=ROOT, env=_env(fault), stdout=out, stderr=subprocess.STDOUT)


def _wait_listening(port: int, timeout_s: float = 120) -> None:
    """Until something accepts on 127.0.0.1:port (the agent or process that hosts the rendezvous store)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _finish(*procs: subprocess.Popen, timeout_s: float = 240) -> list[int]:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
    return codes


def _logs(*files: Path) -> str:
    return "\n".join(f.read_text(errors="replace") for f in files if f.exists())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("multinode_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


def one_node_losses(config_file: str, log_dir: Path, steps: int) -> dict[int, float]:
    """lm_loss per step of one node running both ranks (launch/torchrun.sh, 2 processes), run in log_dir/run."""
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--master-port", str(free_port()),
                           config_file, f"logging.dir={log_dir}", "logging.run_name=run",
                           "data.cache_dir=" + str(log_dir / "cache")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (losses,) = losses_per_attempt(log_dir / "run")
    assert sorted(losses) == list(range(1, steps + 1))
    return losses


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, config_file) -> dict[int, float]:
    """lm_loss per step of one node running both ranks (torchrun, 2 processes)."""
    return one_node_losses(config_file, tmp_path_factory.mktemp("one_node"), STEPS)


def test_two_nodes_equal_one_node(tmp_path, config_file, one_node):
    port = free_port()
    first = _agent(config_file, tmp_path, port, tmp_path / "node_a.log", "--rdzv-id", "straight")
    _wait_listening(port)  # node a hosts the rendezvous store
    second = _agent(config_file, tmp_path, port, tmp_path / "node_b.log", "--rdzv-id", "straight")
    codes = _finish(first, second)
    log = _logs(tmp_path / "node_a.log", tmp_path / "node_b.log")
    assert codes == [0, 0], log[-3000:]
    assert losses_per_attempt(tmp_path / "run") == [one_node]


def _lost_and_back(tmp_path: Path, config_file: str, *launcher_args: str, store_port: int | None = None,
                   lose_first: bool) -> tuple[list[int], str, list[dict[int, float]]]:
    """Start two nodes (the first hosts the store unless an external one runs), lose one as step 4 starts,
    start it again 5 s after it is gone (without the fault), wait for both."""
    port = store_port or free_port()
    logs = [tmp_path / "node_a.log", tmp_path / "node_b.log"]
    faults = [KILL_NODE, None] if lose_first else [None, KILL_NODE]
    args = ("--max-restarts", "2", *launcher_args)
    nodes = [_agent(config_file, tmp_path, port, logs[0], *args, fault=faults[0])]
    _wait_listening(port)
    nodes.append(_agent(config_file, tmp_path, port, logs[1], *args, fault=faults[1]))
    lost = 0 if lose_first else 1
    assert nodes[lost].wait(timeout=400) == -9, _logs(*logs)[-3000:]  # SIGKILL: the node is gone
    time.sleep(5)
    nodes[lost] = _agent(config_file, tmp_path, port, logs[lost], *args)  # the node returns
    codes = _finish(*nodes)
    torchrun_logs = sorted((tmp_path / "run" / "launcher").glob("*.log"))  # torchrun's own output (launch/torchrun.sh)
    return codes, _logs(*logs, *torchrun_logs), losses_per_attempt(tmp_path / "run")


def _assert_resumed_equal(codes, log, attempts, one_node):
    assert codes == [0, 0], log[-4000:]
    assert re.search(rf"rank \d kills its node \(agent pid \d+ and itself\) at step {LOST_AT}", log), log[-3000:]
    assert re.search(r"\[rank 0\] resumed from \S+iter_0000002 at step 2", log), log[-3000:]
    first, last = attempts[0], attempts[-1]
    assert first == {step: one_node[step] for step in range(1, LOST_AT)}  # up to the loss
    assert last == {step: one_node[step] for step in range(3, STEPS + 1)}  # every step after the checkpoint


def test_lost_node_that_did_not_host_the_store_returns_and_the_job_ends_equal(tmp_path, config_file, one_node):
    codes, log, attempts = _lost_and_back(tmp_path, config_file, lose_first=False)
    _assert_resumed_equal(codes, log, attempts, one_node)


def test_with_the_store_outside_the_agents_losing_node_zero_is_survived_too(tmp_path, config_file, one_node):
    """Without --external-store, losing the agent that hosts the store ends the job (every other agent fails
    with RendezvousConnectionError); hosted by its own process, the store outlives the lost node."""
    port = free_port()
    store = _external_store(port)
    try:
        codes, log, attempts = _lost_and_back(tmp_path, config_file, "--external-store", store_port=port,
                                              lose_first=True)
    finally:
        store.terminate()
        store.wait(timeout=30)
    _assert_resumed_equal(codes, log, attempts, one_node)
    assert "RendezvousConnectionError" not in log


def test_a_node_that_never_returns_fails_the_survivor_in_time_naming_it(tmp_path, config_file):
    timeout_minutes = 0.25
    port = free_port()
    logs = [tmp_path / "node_a.log", tmp_path / "node_b.log"]
    args = ("--max-restarts", "1")
    overrides = (f"parallel.timeout_minutes={timeout_minutes}",)
    survivor = _agent(config_file, tmp_path, port, logs[0], *args, overrides=overrides)
    _wait_listening(port)
    lost = _agent(config_file, tmp_path, port, logs[1], *args, fault=KILL_NODE, overrides=overrides)
    assert lost.wait(timeout=400) == -9
    gone = datetime.now()
    code = survivor.wait(timeout=400)
    ended = datetime.now()
    log = _logs(*logs)
    assert code != 0, log[-3000:]
    lost_rank = int(re.search(r"rank (\d) kills its node", log).group(1))
    survivor_rank = 1 - lost_rank
    assert re.search(rf"\[rank {survivor_rank}\] ERROR: rank {survivor_rank} \(host \S+\) failed at step {LOST_AT}: "
                     rf"the lost or stalled peer is on node \d \(host \S+, rank {lost_rank}\)", log), log[-3000:]
    # the restarted group waited for the node as long as a collective may wait, then the job failed
    assert ended - gone <= timedelta(minutes=timeout_minutes, seconds=90), (ended - gone, log[-3000:])


def _external_store(port: int) -> subprocess.Popen:
    store = subprocess.Popen([sys.executable, "-m", "fpa_megatron.parallel.rendezvous_store", "--port", str(port)],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "listening" in store.stdout.readline()
    return store


def test_an_elastic_job_goes_on_with_the_nodes_left(tmp_path, config_file, one_node):
    """--nnodes 1:2, node b lost for good as step 4 starts: node a's agent restarts the group alone (the
    rendezvous closes --last-call seconds after its one node joined), the step-2 checkpoint (DP2) is rewritten
    for DP1 (parallel.elastic, set by the launcher), and DP1 with 4 micro-batches per step continues as the
    two-node run did (fp32 rounding of the other reduction order). The store runs outside the agents so both
    nodes join the first rendezvous together."""
    port = free_port()
    logs = [tmp_path / "node_a.log", tmp_path / "node_b.log"]
    args = ("--nnodes", "1:2", "--max-restarts", "2", "--external-store", "--last-call", "10")
    store = _external_store(port)
    try:
        survivor = _agent(config_file, tmp_path, port, logs[0], *args)
        lost = _agent(config_file, tmp_path, port, logs[1], *args, fault=KILL_NODE)
        assert lost.wait(timeout=400) == -9, _logs(*logs)[-3000:]
        (code,) = _finish(survivor)
    finally:
        store.terminate()
        store.wait(timeout=30)
    log = _logs(*logs)
    assert code == 0, log[-4000:]
    assert ("parallel.elastic: checkpoint iter_0000002 was saved with TP1 x PP1 x DP2 (2 ranks); this run is "
            "TP1 x PP1 x DP1 (1 ranks)") in log, log[-3000:]
    assert "has no checksums" not in log  # rank 0 verified every recorded file of the DP2 checkpoint
    attempts = losses_per_attempt(tmp_path / "run")
    assert attempts[0] == {step: one_node[step] for step in range(1, LOST_AT)}  # two nodes, up to the loss
    last = attempts[-1]
    assert sorted(last) == list(range(3, STEPS + 1))
    assert [last[s] for s in sorted(last)] == pytest.approx([one_node[s] for s in sorted(last)], rel=1e-5, abs=0)
