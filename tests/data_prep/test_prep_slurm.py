"""launch/prep.sbatch under a real SLURM (tests/slurm_cluster.py: slurmctld and two slurmd on this machine):
a job array of 4 `fpa-prep encode` tasks and the dependent merge job give the files of one `fpa-prep encode`,
byte for byte; a task killed mid-way (scancel) and rerun finishes without redoing its finished shards; the
merge job fails naming the shards of a task that never ran."""

from __future__ import annotations

import glob
import os
import sys
import time

import pytest

from data_prep.encode import EncodeOptions, run_encode
from data_prep.merge import merge_encode_dir
from data_prep.tasks import Task
from tests.data_prep.helpers import file_bytes, make_corpus
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREP = os.path.join(REPO, "launch", "prep.sbatch")
SHARDS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_docs):
    """Three input files (one .gz) of 1 MiB each, in documents of up to 2000 characters."""
    docs = [text[i : i + 2000] for text in stdlib_docs for i in range(0, len(text), 2000)]
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), docs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer_model):
    """One `fpa-prep encode` of the corpus on this machine, merged: every file's bytes."""
    ref = tmp_path_factory.mktemp("ref")
    run_encode(EncodeOptions(inputs=corpus, tokenizer=tokenizer_model, out_dir=str(ref), num_shards=SHARDS,
                             workers=2, progress=False))
    merge_encode_dir(str(ref))
    return file_bytes(str(ref))


def _env(cluster, **extra) -> dict:
    return {**cluster.env, "PYTHONPATH": REPO, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "CPUS_PER_TASK": "1", **extra}  # the test nodes have 2 CPUs each


def _encode_args(corpus, model, out_dir) -> list:
    args = []
    for path in corpus:
        args += ["-i", path]
    return args + ["--tokenizer", model, "--out-dir", str(out_dir), "--num-shards", str(SHARDS)]


def _job_log(work, pattern: str) -> str:
    paths = glob.glob(os.path.join(work, "logs", pattern))
    assert len(paths) == 1, (pattern, os.listdir(os.path.join(work, "logs")))
    with open(paths[0]) as f:
        return f.read()


def _without_parts(files: dict) -> dict:
    return {k: v for k, v in files.items() if not k.startswith("manifest.task-")}


def test_array_of_4_tasks_then_merge_equals_one_encode(slurm_cluster, tmp_path, corpus, tokenizer_model,  # noqa: F811
                                                       reference):
    out = tmp_path / "out"
    env = _env(slurm_cluster, NUM_TASKS="4")
    res = slurm_cluster.run([PREP, *_encode_args(corpus, tokenizer_model, out)], env=env, cwd=str(tmp_path))
    array_job, merge_job = res.stdout.split()
    states = slurm_cluster.wait(array_job)
    assert states == {f"{array_job}_{i}": "COMPLETED" for i in range(4)}, states
    assert slurm_cluster.wait(merge_job) == {merge_job: "COMPLETED"}, _job_log(tmp_path, f"*-{merge_job}.out")
    for i in range(4):
        log = _job_log(tmp_path, f"fpa-prep-{array_job}_{i}.out")
        assert f"encode: task {i} of 4 (from SLURM_ARRAY_TASK_ID and FPA_PREP_NUM_TASKS): shards " \
               f"{', '.join(map(str, Task(i, 4).shards(SHARDS)))} of {SHARDS}" in log, log
        assert f"encode task {i} of 4 complete (4 of its 4 shard(s))" in log
    nodes = slurm_cluster.run(["scontrol", "-o", "show", "job", array_job]).stdout
    assert "NodeList=n1" in nodes and "NodeList=n2" in nodes  # the tasks ran on both nodes
    got = _without_parts(file_bytes(str(out)))
    assert sorted(got) == sorted(reference)
    for name in reference:  # the merged .bin/.idx, every shard, manifest.json, rejects.jsonl
        assert got[name] == reference[name], name


def _committed(out_dir, shards) -> list:
    return [k for k in shards if os.path.exists(os.path.join(out_dir, ".state", f"shard_{k:05d}.json"))]


def test_killed_task_reruns_without_redoing_shards_and_a_missing_task_fails_the_merge(
        slurm_cluster, tmp_path, corpus, tokenizer_model, reference):  # noqa: F811
    out = str(tmp_path / "out")
    os.makedirs(tmp_path / "logs")
    env = _env(slurm_cluster, NUM_TASKS="2")  # task 1 of 2: half the corpus, 8 shards
    args = _encode_args(corpus, tokenizer_model, out)
    mine = Task(1, 2).shards(SHARDS)

    job = slurm_cluster.sbatch(["--array=1", "--cpus-per-task=1", PREP, *args], env=env, cwd=str(tmp_path))
    deadline = time.monotonic() + 120
    while not _committed(out, mine):
        assert time.monotonic() < deadline, slurm_cluster.job_states(job)
        time.sleep(0.01)
    slurm_cluster.run(["scancel", job])
    assert slurm_cluster.wait(job) == {f"{job}_1": "CANCELLED"}
    done = _committed(out, mine)
    assert 1 <= len(done) < len(mine), done  # killed mid-way
    kept = {}
    for k in done:
        for name in (f"data_{k:05d}.bin", f"data_{k:05d}.idx", f".state/shard_{k:05d}.json"):
            st = os.stat(os.path.join(out, name))
            kept[name] = (st.st_ino, st.st_mtime_ns)

    rerun = slurm_cluster.sbatch(["--array=1", "--cpus-per-task=1", PREP, *args], env=env, cwd=str(tmp_path))
    assert slurm_cluster.wait(rerun) == {f"{rerun}_1": "COMPLETED"}
    log = _job_log(tmp_path, f"fpa-prep-{rerun}_1.out")
    assert f"resuming: skipping shards {done}" in log, log
    for name, ident in kept.items():
        st = os.stat(os.path.join(out, name))
        assert (st.st_ino, st.st_mtime_ns) == ident, f"{name} was rewritten"

    # task 0 never ran: the merge job fails and names its shards
    merge = slurm_cluster.sbatch(["--output=logs/%x-%j.out", "--cpus-per-task=1", PREP, *args],
                                 env={**env, "PREP_STEP": "merge"}, cwd=str(tmp_path))
    assert slurm_cluster.wait(merge) == {merge: "FAILED"}
    missing = ", ".join(map(str, Task(0, 2).shards(SHARDS)))
    assert (f"fpa-prep merge: error: cannot merge {out}: 8 of 16 planned shard(s) missing: {missing}; rerun task "
            f"0 of 2 (no manifest part manifest.task-00000-of-00002.json): shard(s) {missing}"
            in _job_log(tmp_path, f"fpa-prep-{merge}.out"))

    first = slurm_cluster.sbatch(["--array=0", "--cpus-per-task=1", PREP, *args], env=env, cwd=str(tmp_path))
    assert slurm_cluster.wait(first) == {f"{first}_0": "COMPLETED"}
    merge = slurm_cluster.sbatch(["--output=logs/%x-%j.out", "--cpus-per-task=1", PREP, *args],
                                 env={**env, "PREP_STEP": "merge"}, cwd=str(tmp_path))
    assert slurm_cluster.wait(merge) == {merge: "COMPLETED"}
    got = _without_parts(file_bytes(out))
    assert sorted(got) == sorted(reference)
    for name in reference:
        assert got[name] == reference[name], name
