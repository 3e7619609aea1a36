"""A real, private SLURM cluster of two nodes on this machine, for tests: the session fixture `slurm_cluster`.

It starts, from apt's slurm-wlm and munge (Debian 12: slurm 22.05), as root:
  - munged as user munge, with a fresh key and its own socket (slurm.conf's AuthInfo points at it),
  - slurmctld and two slurmd (`-N n1`, `-N n2`, 2 CPUs each, both at 127.0.0.1 on ports of their own),
all in the foreground as children of the test process, with a slurm.conf, state and spool directories and
logs in a temp directory of their own (free ports picked at start, a cluster name of its own: two sessions
of tests can run side by side, and nothing of the machine's own SLURM or munge is used). It waits until
`sinfo` shows both nodes idle (a few seconds), yields a `SlurmCluster` whose `env` has SLURM_CONF set for the
client commands (sbatch, squeue, scontrol, scancel, srun), and at the end stops every daemon it started,
by pid. The only change outside the temp directory: `127.0.0.1 n1 n2` is added to /etc/hosts if missing.
Its timeouts are sized for tests (CRED_EXPIRE_S, SLURMD_TIMEOUT_S, KILL_WAIT_S below); `kill_node(name)` loses
a node as a machine would and `start_node(name)` brings it back.

Use it from a test module:

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_something(slurm_cluster):
        job = slurm_cluster.sbatch(["--array=0-3", "script.sbatch"], cwd=repo)
        assert slurm_cluster.wait(job) == "COMPLETED"

Without SLURM (or munge, or root) the tests that use it are skipped with the reason, except under CI=true
where they fail: CI must run them (scripts/test.sh installs slurm-wlm and munge when it runs as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
START_TIMEOUT_S = 30.0
# A requeued job may start again cred_expire + 1 s after it ended (SLURM's default: 120 s); a lost node is set
# DOWN (its jobs requeued) after SlurmdTimeout (default 300 s); a cancelled job's processes get SIGTERM and
# KillWait seconds to save before SIGKILL (SLURM's default, 30 s: a tiny save on a loaded machine needs it).
CRED_EXPIRE_S = 5
SLURMD_TIMEOUT_S = 10
KILL_WAIT_S = 30

SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait={kill_wait}
SlurmctldTimeout=30
SlurmdTimeout={slurmd_timeout}
MessageTimeout=10
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=8000"


@dataclass
class SlurmCluster:
    """A running private cluster: `env` for client commands (SLURM_CONF set), its directory and logs."""

    root: str
    env: dict
    conf: str = ""
    nodes: tuple = NODES
    processes: dict = field(default_factory=dict)  # name -> Popen of each daemon

    def run(self, args: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(args, env=kw.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=kw.pop("timeout", 60), **kw)

    def sbatch(self, args: list, env: dict = None, cwd: str = None) -> str:
        """Submit with `sbatch --parsable ARGS`; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env or self.env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_states(self, job: str) -> dict:
        """{job id (array tasks as <id>_<index>): state} from scontrol (jobs stay listed MinJobAge = 600 s)."""
        res = self.run(["scontrol", "-o", "show", "job", job], check=False)
        states = {}
        for line in res.stdout.splitlines():
            ident = re.search(r"\bJobId=(\d+)", line)
            array = re.search(r"\bArrayJobId=(\d+) ArrayTaskId=(\S+)", line)
            state = re.search(r"\bJobState=(\S+)", line)
            if ident and state:
                key = f"{array.group(1)}_{array.group(2)}" if array else ident.group(1)
                states[key] = state.group(1)
        return states

    def wait(self, job: str, timeout: float = 120.0) -> dict:
        """Wait until every job (or array task) of `job` has ended; returns their final states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job)
            if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
                              for s in states.values()):
                return states
            time.sleep(0.2)
        raise AssertionError(f"job {job} still running after {timeout} s: {self.job_states(job)}")

    def start_node(self, name: str, wait: bool = True) -> None:
        """Start (or start again) the slurmd of node `name`; with `wait`, until sinfo shows it idle."""
        out = open(os.path.join(self.root, "log", "daemons.out"), "ab")
        self.processes[f"slurmd-{name}"] = subprocess.Popen(["slurmd", "-D", "-f", self.conf, "-N", name],
                                                            env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            _wait_for(f"node {name} idle in sinfo", lambda: self.node_states().get(name) == "idle", self.processes)

    def kill_node(self, name: str) -> list[int]:
        """Lose node `name` as a machine would: SIGKILL to its slurmd, to every job task running on it (the
        processes whose environment says SLURMD_NODENAME=name) and to their slurmstepd. Returns the pids."""
        daemon = self.processes[f"slurmd-{name}"]
        daemon.kill()
        daemon.wait()
        victims = set()
        for pid in _pids():
            if _environ(pid).get("SLURMD_NODENAME") == name:
                victims.add(pid)
                parent = _parent(pid)
                if parent and _comm(parent) == "slurmstepd":
                    victims.add(parent)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(victims)

    def node_states(self) -> dict:
        """{node: state} from sinfo ('idle', 'allocated', 'down*', ...)."""
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        return dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)

    def log(self, name: str) -> str:
        """A daemon's log: 'slurmctld', 'slurmd-n1', 'slurmd-n2', 'munged'."""
        path = os.path.join(self.root, "log", name + ".log")
        with open(path, errors="replace") as f:
            return f.read()


def _missing_reason() -> str:
    missing = [d for d in DAEMONS if not shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge "
                "(scripts/test.sh does it when run as root)")
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root (slurmd starts jobs as their user)"
    return ""


def skip_or_fail(reason: str) -> None:
    """Skip, or under CI=true fail: CI must run the SLURM tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().decode(errors="replace").split("\0")
    except OSError:  # gone, or not ours to read
        return {}
    return dict(item.split("=", 1) for item in items if "=" in item)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ensure_hosts(names: tuple) -> None:
    """`127.0.0.1 n1 n2` in /etc/hosts, if a name is missing."""
    with open("/etc/hosts") as f:
        known = {w for line in f for w in line.split("#")[0].split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}\n")


def _start_munged(root: str) -> tuple[subprocess.Popen, str]:
    """munged as user munge with a fresh key and a socket in root/munge; returns (process, socket)."""
    d = os.path.join(root, "munge")
    os.makedirs(d, mode=0o755)
    key = os.path.join(d, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    for path in (d, key):
        shutil.chown(path, "munge", "munge")
    sock = os.path.join(d, "munge.socket")
    log = open(os.path.join(root, "log", "munged.log"), "ab")
    proc = subprocess.Popen(["munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
                             f"--log-file={os.path.join(d, 'munged-own.log')}", f"--pid-file={d}/munged.pid",
                             f"--seed-file={d}/munged.seed"], user="munge", group="munge",
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, sock


def _wait_for(what: str, condition, processes: dict, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        dead = [n for n, p in processes.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"SLURM test cluster: {', '.join(dead)} exited while waiting for {what} "
                               "(logs in the cluster's log/ directory, printed above)")
        time.sleep(0.1)
    raise RuntimeError(f"SLURM test cluster: no {what} after {timeout} s")


def start_cluster(root: str) -> SlurmCluster:
    """Start munged, slurmctld and the slurmd of NODES under `root`; returns once both nodes are idle."""
    _ensure_hosts(NODES)
    for sub in ("state", "spool", "log"):
        os.makedirs(os.path.join(root, sub))
    processes: dict = {}
    cluster = SlurmCluster(root=root, env={}, processes=processes)
    try:
        _start(cluster, root, processes)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _start(cluster: SlurmCluster, root: str, processes: dict) -> None:
    munged, munge_socket = _start_munged(root)
    processes["munged"] = munged
    _wait_for("munge socket", lambda: os.path.exists(munge_socket), processes)
    host = socket.gethostname()
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(
            cluster=f"fpa{os.getpid()}", host=host, ctld_port=ctld_port, munge_socket=munge_socket, root=root,
            cred_expire=CRED_EXPIRE_S, slurmd_timeout=SLURMD_TIMEOUT_S, kill_wait=KILL_WAIT_S,
            node_list=",".join(NODES),
            nodes="\n".join(NODE_LINE.format(name=n, host=host, port=p, cpus=CPUS_PER_NODE)
                            for n, p in zip(NODES, node_ports))))
    env = dict(os.environ, SLURM_CONF=conf)
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_")) and v != "SLURM_CONF"]:
        del env[var]  # a test run inside a SLURM job must not hand that job's settings to this cluster
    cluster.env, cluster.conf = env, conf
    out = open(os.path.join(root, "log", "daemons.out"), "ab")
    processes["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], env=env, stdout=out,
                                              stderr=subprocess.STDOUT)
    for n in NODES:
        cluster.start_node(n, wait=False)
    _wait_for("2 idle nodes in sinfo", lambda: all(cluster.node_states().get(n) == "idle" for n in NODES),
              processes)


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel what still runs, then stop each daemon by its pid (SIGTERM, then SIGKILL after 10 s)."""
    if cluster.processes.get("slurmctld") and cluster.processes["slurmctld"].poll() is None:
        cluster.run(["scancel", "--full", "--user", "root"], check=False, timeout=10)
    for name in [n for n in cluster.processes if n.startswith("slurmd")] + ["slurmctld", "munged"]:
        proc = cluster.processes.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node SLURM cluster (see the module docstring); skipped without SLURM unless CI=true."""
    reason = _missing_reason()
    if reason:
        skip_or_fail(reason)
    # not under pytest's tmp dirs: munged (user munge) must be able to traverse to its socket
    root = tempfile.mkdtemp(prefix="fpa-slurm-")
    os.chmod(root, 0o755)
    cluster = None
    try:
        cluster = start_cluster(root)
        yield cluster
    finally:
        if cluster is not None:
            stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)
