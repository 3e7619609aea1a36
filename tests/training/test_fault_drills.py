"""Fault drills on real processes (FPA_FAULT): what a run that lasts for days must survive.

Two gloo ranks (data parallel 2, ZeRO-1) of a tiny GPT. One spawned pair of ranks (module fixture) runs the
uninterrupted reference, the in-process drills (NaN at one step, a spike with rollback, NaN from a step on,
a SIGTERM to one rank) and the checks of the pieces underneath (dropping a step's gradients under ZeRO-1,
ZeRO-2 and PP2; one rank's NaN gradient skips the step on both; every group's timeout). Then the launcher
drills run launch/torchrun.sh: SIGTERM to torchrun, then (on the rerun) a rank killed under --max-restarts 1,
and a stalled rank. The reference and the torchrun runs use the same config file, so their losses must be
identical.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml

from fpa_megatron.testing import free_port, run_distributed
from tests.training.tensorboard_losses import losses_per_attempt

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 256},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 6, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"interval": 2, "keep_last": 10},
    "logging": {"interval": 1, "tensorboard": True},
}
STEPS = CONFIG["train"]["steps"]
SPIKE_DRILL = ["train.eval_interval=1", "train.eval_iters=1", "train.spike.min_history=2", "train.spike.window=4",
               "train.spike.policy=rollback"]


# ------------------------------------------------------------------------------------------ in the ranks


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside a nested state dict, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in _tensors(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _dropped_step_leaves_no_trace(zero_stage: int, pipeline: int) -> dict:
    """Steps on batches 1, 2 (NaN on rank 1 only: dropped), 3 against steps on batches 1, 3.

    Returns what each rank saw: the guard's verdict, whether parameters and optimizer state were bit-identical
    right after the drop, and whether the final parameters equal those of the run that never saw batch 2.
    """
    import torch.distributed as dist

    from fpa_megatron import faults
    from fpa_megatron.config import FPAConfig, ModelConfig, OptimizerConfig, TrainConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.training.guard import TrainingGuard
    from fpa_megatron.training.optimizer import build_engine, discard_gradients, optimizer_step

    init_model_parallel(1, pipeline, seed=1)
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16)
    rank, dp = dist.get_rank(), dist.get_rank() if pipeline == 1 else 0

    def batches(seed):
        g = torch.Generator().manual_seed(seed * 10 + dp)
        t = torch.randint(0, 128, (4, 17), generator=g)
        return iter([dict(tokens=t[i:i + 2, :-1], labels=t[i:i + 2, 1:], loss_mask=torch.ones(2, 16),
                          position_ids=torch.arange(16).expand(2, 16)) for i in (0, 2)])

    finals, out = {}, {}
    for variant in ("dropped", "never_seen"):
        penalty = make_penalty(model_cfg, FPAConfig())
        model = build_gpt_model(model_cfg, 128, penalty, seed=1)
        engine = build_engine(model, OptimizerConfig(zero_stage=zero_stage, lr=1e-2), "fp32", 2, 2)
        guard = TrainingGuard(TrainConfig(), model, rank)
        penalty.set_step(0.1, True)

        def run(seed):
            return forward_backward(model, batches(seed), penalty, num_microbatches=2, micro_batch_size=2,
                                    seq_length=16, engine=engine)

        run(1)
        optimizer_step(engine, 1e-2)
        if variant == "dropped":
            before = _tensors(model.state_dict()) + _tensors(engine.optimizer.state_dict())
            injector = faults.FaultInjector([faults.Fault("nan_loss", 2, target=1)], rank)
            faults._active = injector
            injector.begin_step(2)
            result = run(2)
            faults._active = None
            verdict = guard.check(2, 5.0, result.penalty, stop_requested=False)  # the loss is finite on purpose
            out["action"] = verdict.action
            discard_gradients(engine)
            out["bit_identical_after_drop"] = _same(
                before, _tensors(model.state_dict()) + _tensors(engine.optimizer.state_dict()))
        run(3)
        out[f"{variant}_norm"], _ = optimizer_step(engine, 1e-2)
        finals[variant] = [p.detach().clone() for p in model.parameters()]
    out["final_equal"] = _same(finals["dropped"], finals["never_seen"])
    return out


def _group_timeouts(timeout_minutes: float) -> dict:
    """Timeouts of every process group Megatron makes, and how many groups DeepSpeed adds (it must add none)."""
    from torch.distributed import distributed_c10d as c10d

    from fpa_megatron.config import FPAConfig, ModelConfig, OptimizerConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.optimizer import build_engine

    earlier = set(c10d._world.pg_map)  # WORLD (run_distributed's) and the groups of earlier layouts
    init_model_parallel(1, 2, seed=1, timeout_minutes=timeout_minutes)
    groups = [pg for pg in c10d._world.pg_map if pg not in earlier]
    before = len(c10d._world.pg_map)
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16)
    model = build_gpt_model(model_cfg, 128, make_penalty(model_cfg, FPAConfig()), seed=1)
    build_engine(model, OptimizerConfig(), "fp32", 2, 2)
    # torch keeps no public accessor for a group's timeout: read the gloo backend's options
    timeouts = {pg.group_desc: pg._get_backend(torch.device("cpu")).options._timeout for pg in groups}
    return {"timeouts": timeouts, "added_by_deepspeed": len(c10d._world.pg_map) - before}


def _train(root: str, name: str, overrides: list[str]) -> list[dict]:
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    cfg = config_from_dict(CONFIG, overrides + [f"logging.dir={root}", f"logging.run_name={name}"])
    keys = ("step", "lm_loss", "lr", "lambda", "skipped_steps", "applied", "val_loss")
    return [{k: h[k] for k in keys if k in h} for h in train(cfg)]


def _cli(config_file: str, root: str, name: str, fault: str, overrides: list[str]) -> int:
    from fpa_megatron import cli

    os.environ["FPA_FAULT"] = fault
    try:
        return cli.main(["--config", config_file, f"logging.dir={root}", f"logging.run_name={name}", *overrides])
    finally:
        del os.environ["FPA_FAULT"]


def drill_ranks(root: str, config_file: str) -> dict:
    """Everything the in-process tests need, on each of 2 ranks."""
    import torch.distributed as dist

    from fpa_megatron.run_log import setup_logging

    rank = dist.get_rank()
    handler = logging.FileHandler(Path(root) / f"log_rank{rank}.txt")
    setup_logging(rank).addHandler(handler)
    out = {"components": {name: _dropped_step_leaves_no_trace(zero, pp)
                          for name, zero, pp in (("zero1", 1, 1), ("zero2", 2, 1), ("pp2", 1, 2))}}
    out["components"]["groups"] = _group_timeouts(0.5)
    out["reference"] = _train(root, "reference", [])
    os.environ["FPA_FAULT"] = "nan_loss@3:1,spike@5"  # step 3: NaN on rank 1 only; step 5: loss x 100
    out["drill"] = _train(root, "drill", SPIKE_DRILL)
    del os.environ["FPA_FAULT"]
    out["diverged_exit"] = _cli(config_file, root, "diverged", "nan_loss@3+",
                                ["train.max_consecutive_skips=2", "checkpoint.interval=1"])
    out["sigterm_exit"] = _cli(config_file, root, "sigterm", "sigterm@2:1", [])
    handler.close()
    return out


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def drills(tmp_path_factory, config_file):
    root = tmp_path_factory.mktemp("drills")
    results = run_distributed(drill_ranks, 2, str(root), config_file, timeout_s=600)
    return results, root


@pytest.fixture(scope="module")
def reference(drills) -> dict[int, float]:
    """lm_loss per step of the uninterrupted run, as TensorBoard stores it (float32)."""
    results, _ = drills
    return {h["step"]: float(torch.tensor(h["lm_loss"], dtype=torch.float32)) for h in results[0]["reference"]}


def _log(root: Path, rank: int) -> str:
    return (root / f"log_rank{rank}.txt").read_text()


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*") if (p / "complete").exists())


def _trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True)


# ------------------------------------------------------------------------------------------ in-process drills


@pytest.mark.parametrize("layout", ["zero1", "zero2", "pp2"])
def test_a_dropped_step_leaves_parameters_and_optimizer_state_untouched(drills, layout):
    """Rank 1's NaN gradient (its loss is reported finite) makes both ranks drop the step; nothing moves, and
    the next step ends where a run that never saw the batch ends."""
    results, _ = drills
    for rank_result in results:
        got = rank_result["components"][layout]
        assert got["action"] == "skip"
        assert got["bit_identical_after_drop"] and got["final_equal"]
        assert got["dropped_norm"] == got["never_seen_norm"] and math.isfinite(got["dropped_norm"])


def test_every_process_group_uses_parallel_timeout_minutes(drills):
    results, _ = drills
    for rank_result in results:
        groups = rank_result["components"]["groups"]
        timeouts = dict(groups["timeouts"])
        # Megatron 0.16 creates this MoE-only group without its timeout argument; no run here uses it
        assert timeouts.pop("EXPERT_DATA_PARALLEL_GROUP_GLOO") == timedelta(minutes=30)
        assert {"DATA_PARALLEL_GROUP", "TENSOR_MODEL_PARALLEL_GROUP", "PIPELINE_MODEL_PARALLEL_GROUP",
                "MODEL_PARALLEL_GROUP", "EMBEDDING_GROUP", "DATA_PARALLEL_GROUP_GLOO"} <= set(timeouts)
        assert set(timeouts.values()) == {timedelta(minutes=0.5)}
        assert groups["added_by_deepspeed"] == 0


def test_nan_at_one_step_is_skipped_on_every_rank(drills):
    results, root = drills
    ref = results[0]["reference"]
    for rank_result in results:
        drill = rank_result["drill"]
        assert [h["applied"] for h in drill][:4] == [True, True, False, True]
        assert [h["skipped_steps"] for h in drill] == [0, 0, 1, 1, 1, 1]
        assert [h["lm_loss"] for h in drill[:2]] == [h["lm_loss"] for h in ref[:2]]
        assert math.isnan(drill[2]["lm_loss"])
        # the parameters after step 3 are those after step 2, bit for bit (same validation batch, same loss)
        assert drill[2]["val_loss"] == drill[1]["val_loss"] != drill[3]["val_loss"]
        # neither the LR nor lambda moved on: step 4 runs with step 3's values (the reference's 3rd step)
        assert drill[3]["lr"] == drill[2]["lr"] == ref[2]["lr"]
        assert drill[3]["lambda"] == drill[2]["lambda"] == ref[2]["lambda"]
    assert "step 3: update skipped on every rank (loss or gradients not finite" in _log(root, 0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "drill"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")] == [
        (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]


def test_spike_with_rollback_reloads_and_skips_the_window(drills):
    results, root = drills
    for rank_result in results:
        drill = rank_result["drill"]
        assert drill[4]["lm_loss"] > 50 * drill[3]["lm_loss"] and not drill[4]["applied"]
        # step 5 rolled back to the checkpoint of step 4: the model is the one after step 4 again
        assert drill[4]["val_loss"] == drill[3]["val_loss"]
        assert drill[5]["applied"] and math.isfinite(drill[5]["lm_loss"]) and drill[5]["lm_loss"] < 10
        assert drill[5]["lr"] == drill[4]["lr"] and drill[5]["lambda"] == drill[4]["lambda"]
    log = _log(root, 0)
    assert "step 5: loss spike: lm_loss" in log and "train.spike.policy=rollback" in log
    assert re.search(r"step 5: rolled back to \S+iter_0000004 \(step 4\): model, optimizer and lambda restored; "
                     r"the batches of steps 5-5 are not replayed, training continues with the batch of step 6", log)
    assert "rolled back" not in _log(root, 1)  # said once, by rank 0
    final = _trainer_state(root / "drill" / "checkpoints" / "iter_0000006")
    # 6 batches consumed (the data moved on past the spike), 4 updates: steps 1, 2, 4 and 6
    assert (final["step"], final["consumed_samples"], final["updates"]) == (6, 6 * 8, 4)
    assert final["guard"]["rollbacks"] == 1 and final["lambda_schedule"]["step"] == 4


def test_nan_from_a_step_on_stops_with_exit_code_81_and_saves_nothing_after(drills):
    results, root = drills
    assert [r["diverged_exit"] for r in results] == [81, 81]
    assert _checkpoints(root / "diverged") == ["iter_0000001", "iter_0000002"]  # saved every step until the NaN
    assert (root / "diverged" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert "3 steps in a row were skipped (more than train.max_consecutive_skips=2)" in _log(root, 0)


def test_sigterm_to_one_rank_stops_both_after_the_step_with_a_checkpoint(drills):
    results, root = drills
    assert [r["sigterm_exit"] for r in results] == [75, 75]
    assert _checkpoints(root / "sigterm") == ["iter_0000002"]
    assert _trainer_state(root / "sigterm" / "checkpoints" / "iter_0000002")["step"] == 2
    assert "SIGTERM received" in _log(root, 1) and "SIGTERM received" not in _log(root, 0)
    assert "stopped after step 2, checkpoint saved at step 2" in _log(root, 0)


# ------------------------------------------------------------------------------------------ under torchrun


def _torchrun(config_file: str, log_dir: Path, *launcher_args: str, fault: str | None = None,
              overrides: tuple[str, ...] = ()) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FPA_FAULT", "MASTER_PORT", "MAX_RESTARTS")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    if fault:
        env["FPA_FAULT"] = fault
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--master-port", str(free_port()),
                           *launcher_args, config_file, f"logging.dir={log_dir}", "logging.run_name=run", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _timestamp(log: str, fragment: str) -> datetime:
    line = next(line for line in log.splitlines() if fragment in line)
    return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def preempted_then_lost_rank(tmp_path_factory, config_file) -> dict:
    """One run through two faults, as a long job meets them. SIGTERM reaches torchrun at step 3 (as from SLURM
    or a cluster): it forwards it to both workers, which finish step 3, save and exit 75, and it does not
    restart them despite --max-restarts. The same command again resumes, loses rank 1 (SIGKILL) as step 5
    starts, and torchrun restarts the group, which resumes from the newest checkpoint (step 4) and finishes."""
    log_dir = tmp_path_factory.mktemp("launcher")
    run = {"dir": log_dir / "run"}
    run["first_code"], run["first_log"] = _torchrun(config_file, log_dir, "--max-restarts", "1",
                                                    fault="sigterm@3:launcher")
    run["checkpoints_after_first"] = _checkpoints(run["dir"])
    run["latest_after_first"] = (run["dir"] / "checkpoints" / "latest").read_text().strip()
    run["second_code"], run["second_log"] = _torchrun(config_file, log_dir, "--max-restarts", "1",
                                                      fault="kill_rank@5:1", overrides=("checkpoint.async_save=false",))
    # (synchronous saves: rank 1 dies as step 5 starts, when a background save of step 4 could still be in flight)
    run["attempts"] = losses_per_attempt(run["dir"])
    return run


def test_sigterm_through_torchrun_saves_that_step_and_the_rerun_matches(preempted_then_lost_rank, reference):
    run = preempted_then_lost_rank
    log = run["first_log"]
    assert run["first_code"] == 75, log[-3000:]  # the workers' code, as launch/torchrun.sh reports it
    assert re.search(r"^torchrun\.sh: SIGTERM reached torchrun, which passed it to the workers: they stopped with "
                     r"exit code 75 \(preempted: stopped with a checkpoint, rerun to resume\); torchrun's log: \S+$",
                     log, re.M)
    assert "Traceback" not in log  # torchrun's SignalException: in its log file only
    assert "[rank 0] WARNING: SIGTERM received" in log and "[rank 1] WARNING: SIGTERM received" in log
    assert ("SIGTERM: stopped after step 3, checkpoint saved at step 3; rerun the same command to resume "
            "(exit code 75") in log
    assert "resumed from" not in log  # not restarted
    assert run["checkpoints_after_first"] == ["iter_0000002", "iter_0000003"]
    assert run["latest_after_first"] == "iter_0000003"
    assert re.search(r"\[rank 0\] resumed from \S+iter_0000003 at step 3", run["second_log"])
    first, rerun = run["attempts"][:2]
    assert first == {step: reference[step] for step in (1, 2, 3)}
    assert rerun == {4: reference[4]}  # then rank 1 was killed (next test)


def test_killed_rank_under_max_restarts_resumes_and_matches_the_uninterrupted_run(preempted_then_lost_rank,
                                                                                  reference):
    run = preempted_then_lost_rank
    log = run["second_log"]
    assert run["second_code"] == 0, log[-3000:]
    assert "rank 1 kills itself (SIGKILL) at step 5" in log
    assert re.search(r"rank 0 \(host \S+\) failed at step 5: ", log)  # the survivor says where it stopped
    assert re.search(r"\[rank 0\] resumed from \S+iter_0000004 at step 4", log)  # torchrun's restart
    assert len(run["attempts"]) == 3
    assert run["attempts"][2] == {step: reference[step] for step in range(5, STEPS + 1)}  # every loss after it


def test_stalled_rank_makes_the_others_fail_with_the_timeout_error(tmp_path, config_file):
    timeout_minutes = 0.1
    code, log = _torchrun(config_file, tmp_path, "--shutdown-timeout", "5", fault="stall_rank@3:1",
                          overrides=(f"parallel.timeout_minutes={timeout_minutes}",))
    assert code != 0
    failure = (f"[rank 0] ERROR: rank 0 (host {socket.gethostname()}) failed at step 3: a collective did not "
               f"complete within parallel.timeout_minutes={timeout_minutes} (6 s): another rank stalled or died")
    assert failure in log, log[-3000:]
    waited = _timestamp(log, failure) - _timestamp(log, "rank 1 stalls at step 3")
    assert waited <= timedelta(minutes=timeout_minutes, seconds=60)
    assert code == 83  # rank 0 exited COLLECTIVE_TIMEOUT, as launch/torchrun.sh reports it in one line:
    assert re.search(r"^torchrun\.sh: the workers failed: rank 0, the first, exited with code 83 \(a collective "
                     r"timed out \(parallel\.timeout_minutes\)\); torchrun stopped the others; torchrun's log: "
                     r"\S+$", log, re.M)
    assert "Traceback" not in log and "ChildFailedError" not in log
