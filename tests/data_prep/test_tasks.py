"""`fpa-prep encode` as N tasks (--task-index / --num-tasks or the environment) then `fpa-prep merge`, in
process: the same files, byte for byte, as a one-machine encode; the merge names missing and duplicate
shards and parts of another encode. The same under a real SLURM job array: test_prep_slurm.py."""

from __future__ import annotations

import json
import os

import pytest

from data_prep.cli import main as prep_main
from data_prep.common import PrepError
from data_prep.encode import EncodeOptions, run_encode
from data_prep.merge import merge_encode_dir
from data_prep.tasks import Task, resolve_task
from tests.data_prep.helpers import file_bytes, make_corpus

SHARDS = 8


def run_task(inputs, model, out_dir, task, **kw):
    return run_encode(EncodeOptions(inputs=inputs, tokenizer=model, out_dir=str(out_dir), num_shards=SHARDS,
                                    workers=1, progress=False, task=task, **kw))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_docs):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), [d[:3000] for d in stdlib_docs[:150]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer_model):
    """A one-machine encode of the corpus, merged."""
    ref = tmp_path_factory.mktemp("ref")
    run_task(corpus, tokenizer_model, ref, None)
    merge_encode_dir(str(ref))
    return file_bytes(str(ref))


def test_task_from_options_then_generic_then_slurm_environment():
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(None, None, {}) is None
    assert resolve_task(None, None, slurm) == Task(2, 4, "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT")
    generic = {**slurm, "FPA_PREP_TASK_INDEX": "1", "FPA_PREP_NUM_TASKS": "3"}
    assert resolve_task(None, None, generic) == Task(1, 3, "FPA_PREP_TASK_INDEX and FPA_PREP_NUM_TASKS")
    assert resolve_task(0, 2, generic) == Task(0, 2, "--task-index and --num-tasks")
    # rerunning one task of an array: `sbatch --array=2` makes SLURM_ARRAY_TASK_COUNT 1; the count is given
    rerun = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1", "FPA_PREP_NUM_TASKS": "4"}
    assert resolve_task(None, None, rerun) == Task(2, 4, "SLURM_ARRAY_TASK_ID and FPA_PREP_NUM_TASKS")
    assert resolve_task(0, 1, slurm) is None  # one task: the whole encode
    assert Task(1, 3).shards(8) == [1, 4, 7]


@pytest.mark.parametrize("index, count, environ, message", [
    (None, None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1"},
     "SLURM_ARRAY_TASK_ID=2 is not a task index of SLURM_ARRAY_TASK_COUNT=1: it must be 0 .. 0 (submit"),
    (3, None, {}, "a task index (--task-index=3) needs a task count"),
    (None, 4, {}, "a task count (--num-tasks=4) needs a task index"),
    (None, None, {"FPA_PREP_TASK_INDEX": "x", "FPA_PREP_NUM_TASKS": "2"}, "FPA_PREP_TASK_INDEX='x': not an integer"),
    (0, 0, {}, "--num-tasks=0: the task count must be at least 1"),
    (-1, 2, {}, "--task-index=-1 is not a task index of --num-tasks=2: it must be 0 .. 1"),
])
def test_bad_task_is_one_clear_error(index, count, environ, message):
    with pytest.raises(PrepError) as err:
        resolve_task(index, count, environ)
    assert message in str(err.value)


def test_four_tasks_then_merge_equal_one_machine(tmp_path, corpus, tokenizer_model, reference):
    out = tmp_path / "out"
    for index in (3, 1, 0, 2):  # any order, any machine
        manifest, status = run_task(corpus, tokenizer_model, out, Task(index, 4))
        assert status == 0
        assert sorted(manifest["shards"][k]["index"] for k in range(SHARDS)
                      if manifest["shards"][k]["status"] == "done") == Task(index, 4).shards(SHARDS)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names and "rejects.jsonl" not in names
    assert [n for n in names if n.startswith("manifest.task-")] == [f"manifest.task-0000{i}-of-00004.json"
                                                                     for i in range(4)]
    assert not [n for n in names if n.startswith(".decompressed-")]
    assert prep_main(["merge", str(out)]) == 0
    got = file_bytes(str(out))
    parts = [n for n in got if n.startswith("manifest.task-")]
    assert len(parts) == 4
    for n in parts:
        del got[n]
    assert sorted(got) == sorted(reference)  # every file: shards, commit records, manifest, rejects, merged
    for name in reference:
        assert got[name] == reference[name], name
    assert reference["data.bin"] and reference["rejects.jsonl"]


def test_merge_names_missing_and_duplicate_shards(tmp_path, corpus, tokenizer_model, reference, capsys):
    out = tmp_path / "out"
    for index in (0, 1, 3):
        run_task(corpus, tokenizer_model, out, Task(index, 4))
    capsys.readouterr()
    assert prep_main(["merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fpa-prep merge: error: cannot merge {out}: 2 of 8 planned shard(s) missing: 2, 6; rerun "
                   "task 2 of 4 (no manifest part manifest.task-00002-of-00004.json): shard(s) 2, 6"]
    assert not (out / "manifest.json").exists() and not (out / "data.bin").exists()
    # a part of a run with another task count: task 0 of 3 resumes shards 0 and 3 (same plan) and does 6
    run_task(corpus, tokenizer_model, out, Task(0, 3))
    capsys.readouterr()
    assert prep_main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("shard(s) done by more than one task in " in err and "shard 0 by manifest.task-00000-of-00003.json, "
            "manifest.task-00000-of-00004.json; shard 3 by manifest.task-00000-of-00003.json, "
            "manifest.task-00003-of-00004.json" in err), err
    os.unlink(out / "manifest.task-00000-of-00003.json")
    run_task(corpus, tokenizer_model, out, Task(2, 4))  # shard 6 is done already: only 2 is encoded
    assert prep_main(["merge", str(out)]) == 0
    capsys.readouterr()
    assert (out / "data.bin").read_bytes() == reference["data.bin"]
    assert (out / "data.idx").read_bytes() == reference["data.idx"]


def test_merge_refuses_parts_of_another_encode_or_damaged_shards(tmp_path, corpus, tokenizer_model, capsys):
    out = tmp_path / "out"
    for index in range(2):
        run_task(corpus, tokenizer_model, out, Task(index, 2))
    # a task run with another tokenizer: its part records another tokenizer hash (and so another fingerprint)
    path = out / "manifest.task-00001-of-00002.json"
    part = json.loads(path.read_text())
    part["tokenizer"]["sha256"] = "0" * 64
    part["fingerprint"] = "f" * 64
    path.write_text(json.dumps(part))
    capsys.readouterr()
    assert prep_main(["merge", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fpa-prep merge: error: manifest.task-00001-of-00002.json and manifest.task-00000-of-00002.json in {out} "
        "are parts of different encodes (tokenizer differs): every task must run the same command; remove the "
        "stale part")
    os.unlink(path)
    run_task(corpus, tokenizer_model, out, Task(1, 2))
    os.truncate(out / "data_00003.bin", 10)  # a shard file cut short after its task finished
    capsys.readouterr()
    assert prep_main(["merge", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fpa-prep merge: error: shard 3 of manifest.task-00001-of-00002.json: its commit record or files in {out} "
        "are missing, damaged or from another run; rerun task 1 of 2")


def test_task_errors_before_any_work(tmp_path, corpus, tokenizer_model):
    with pytest.raises(PrepError, match=r"^9 tasks but only 8 shard\(s\) planned: pass --num-shards 9 or more"):
        run_task(corpus, tokenizer_model, tmp_path / "a", Task(0, 9))
    with pytest.raises(PrepError, match="--overwrite cannot be used by a task"):
        run_task(corpus, tokenizer_model, tmp_path / "b", Task(0, 2), overwrite=True)
    assert not os.path.exists(tmp_path / "b" / "manifest.task-00000-of-00002.json")
