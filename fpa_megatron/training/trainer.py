"""`train(cfg)`: the whole pretraining run, top to bottom.

`setup` builds the run: process groups, the GPT with the penalized attention, DeepSpeed ZeRO, the data, the
train state (resumed from the newest checkpoint if there is one) and the components that act on their own
cadence: the checkpointer, the metrics logger, the evaluator, the attention diagnostics, the slow-rank check.
`train` is the loop: set lambda_t, forward/backward on Megatron's schedule, let the guard decide for all ranks
(one all-reduce), update or drop the update, roll back after a loss spike, hand the step to the components, stop.

A deliberate stop (SIGTERM/SIGUSR1, divergence, a loss spike) raises `RunStopped` with its exit code
(fpa_megatron/exit_codes.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from fpa_megatron import faults
from fpa_megatron.checkpoint.checkpointer import Checkpointer
from fpa_megatron.checkpoint.reader import initial_weights
from fpa_megatron.config import RunConfig, run_dir, save_config
from fpa_megatron.data.datasets import micro_batches
from fpa_megatron.data.mixture import STATE_KEY as MIXTURE_KEY
from fpa_megatron.data.run_data import RunData
from fpa_megatron.exit_codes import Preempted
from fpa_megatron.flops import flops_per_token
from fpa_megatron.model.gpt import build_gpt_model, make_penalty
from fpa_megatron.model.penalized_attention import AttentionPenalty
from fpa_megatron.parallel.state import init_distributed, init_model_parallel
from fpa_megatron.parallel.weights import load_global_state
from fpa_megatron.preflight import check_config
from fpa_megatron.rules import ResolvedLayout
from fpa_megatron.run_log import get_logger, setup_logging, where
from fpa_megatron.schedules import BatchSizeRamp, LambdaSchedule, lr_at
from fpa_megatron.training.attention_diagnostics import AttentionDiagnostics
from fpa_megatron.training.evaluator import Evaluator
from fpa_megatron.training.forensics import SpikeForensics
from fpa_megatron.training.forward_backward import forward_backward
from fpa_megatron.training.guard import ROLLBACK, TrainingGuard
from fpa_megatron.training.memory_check import MemoryCheck
from fpa_megatron.training.metrics import MetricsLogger, memory_gb
from fpa_megatron.training.optimizer import build_engine, discard_gradients, optimizer_step
from fpa_megatron.training.preemption import StopSignals
from fpa_megatron.training.profiling import StepProfiler
from fpa_megatron.training.slow_ranks import SlowRanks
from fpa_megatron.training.state import TrainState
from fpa_megatron.training.trackers import trackers_for_run
from fpa_megatron.training.watchdog import StallWatchdog

log = get_logger("trainer")


@dataclass
class Run:
    """What `setup` built: the model and its engine, the data, the state and the components."""

    cfg: RunConfig
    layout: ResolvedLayout
    model: object
    engine: object
    penalty: AttentionPenalty
    batches: object  # this data-parallel rank's micro-batches, from the state's data position on
    state: TrainState
    checkpointer: Checkpointer
    logger: MetricsLogger
    evaluator: Evaluator
    diagnostics: AttentionDiagnostics
    profiler: StepProfiler
    watchdog: StallWatchdog
    memory: MemoryCheck
    forensics: SpikeForensics
    slow_ranks: SlowRanks
    flops_per_token: float


def setup(cfg: RunConfig, layout: ResolvedLayout) -> Run:
    """Process groups, model, engine, data and components; the state resumed from the newest checkpoint."""
    init_distributed(cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed, cfg.parallel.timeout_minutes,
                        context=cfg.parallel.context, virtual_pipeline=cfg.parallel.virtual_pipeline)
    rank = dist.get_rank()
    setup_logging(rank)
    out_dir = run_dir(cfg)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    checkpointer = Checkpointer(cfg)
    import_weights = cfg.checkpoint.init_from and not checkpointer.has_resume_candidate()
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=cfg.train.seed,
                            vocab_size=layout.vocab_size, sequence_parallel=layout.sequence_parallel,
                            z_loss=cfg.optimizer.z_loss, document_positions=cfg.data.document_mask)
    if import_weights:  # weights only (before the engine copies them): step 0, a fresh optimizer, lambda_0
        load_global_state(model, initial_weights(cfg.checkpoint.init_from, layout.padded_vocab_size))
        log.info(f"initialized from {cfg.checkpoint.init_from} (weights only: step 0, a fresh optimizer)")
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, layout.num_microbatches)
    steps, global_batch = cfg.train.steps, cfg.train.global_batch_size
    data = RunData.build(cfg, layout.vocab_size)
    state = TrainState(LambdaSchedule(cfg.fpa.lambda0, cfg.fpa.gamma, cfg.fpa.min_lambda, cfg.fpa.enabled),
                       TrainingGuard(cfg.train, model, rank),  # the guard: non-finite steps, spikes, stop requests
                       BatchSizeRamp(global_batch, cfg.train.micro_batch_size * layout.data_parallel,
                                     cfg.train.rampup_batch_size))

    resume_from = checkpointer.find_resume(engine)  # verified on every rank; auto passes over damaged ones
    if resume_from is None and cfg.checkpoint.init_from and not import_weights:
        raise RuntimeError(f"every checkpoint of this run was damaged and moved to {checkpointer.root / 'abandoned'}"
                           f": rerun to start again from checkpoint.init_from={cfg.checkpoint.init_from}")
    saved = checkpointer.load(resume_from, engine) if resume_from is not None else {}
    if saved:
        state.load_state_dict(saved)
        log.info(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed)")
    state.mixture = data.training_mixture(cfg, layout.vocab_size, saved.get(MIXTURE_KEY), state.consumed_samples)
    train_ds = data.train if state.mixture is None else state.mixture.dataset
    if len(train_ds) < steps * global_batch + len(data.order.excluded):
        raise RuntimeError(f"data.exclude_samples leaves out {len(data.order.excluded)} samples, but the training "
                           f"split holds {len(train_ds)} of the {steps * global_batch} train.steps needs: fewer steps")
    batches = micro_batches(train_ds, state.consumed_samples, cfg.train.micro_batch_size,
                            parallel_state.get_data_parallel_rank(), layout.data_parallel, order=data.order)
    trackers = trackers_for_run(cfg, str(out_dir), state.tracker_run_id, asdict(layout)) if rank == 0 else []
    if trackers:  # rank 0 saves the trainer state: the tracker's run goes on after a resume
        state.tracker_run_id = trackers[0].run_id
    logger = MetricsLogger.for_run(cfg.logging, str(out_dir), enabled=rank == 0, total_steps=steps, trackers=trackers)
    return Run(cfg, layout, model, engine, penalty, batches, state, checkpointer, logger,
               Evaluator(cfg, layout, model, engine, penalty, data.valid, logger, data.named),
               AttentionDiagnostics.for_run(cfg, logger, model, engine, penalty, data.valid, data.train),
               StepProfiler(cfg, rank), StallWatchdog(cfg, rank),
               MemoryCheck(cfg, layout, model, logger, state.step), SpikeForensics(cfg, data.order, train_ds, rank),
               SlowRanks.for_run(cfg.train.slow_rank, state.guard, logger, rank),
               flops_per_token(cfg.model, layout.padded_vocab_size, cfg.model.seq_length))


def roll_back(run: Run) -> Optional[str]:
    """After a loss spike: reload model, optimizer, RNG and the schedules from the run's newest checkpoint
    (`latest`). The data position stays where it is, so the batches between that checkpoint and the spike are
    not replayed. Returns the checkpoint (None if there is none yet: nothing changes)."""
    target = run.checkpointer.latest()
    if target is None:
        return None
    saved = run.checkpointer.load(target, run.engine)
    run.state.load_state_dict(saved, rollback=True)
    run.logger.log_rollback(run.state.step, saved["step"])
    if dist.get_rank() == 0:
        step = run.state.step
        log.warning(f"step {step}: rolled back to {target} (step {saved['step']}): model, optimizer and lambda "
                    f"restored; the batches of steps {saved['step'] + 1}-{step} are not replayed, training "
                    f"continues with the batch of step {step + 1}")
    return target


def train(cfg: RunConfig, layout: ResolvedLayout | None = None) -> list[dict]:
    """Run (or resume) the pretraining described by cfg; return the per-step metrics of this process.

    `layout` is what `check_config` returned, if the caller already checked the config.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if layout is None:
        layout = check_config(cfg, world_size)  # every config error surfaces before any process group exists
    run = setup(cfg, layout)
    state, guard, checkpointer, steps = run.state, run.state.guard, run.checkpointer, cfg.train.steps
    history: list[dict] = []
    measures = (run.diagnostics, run.evaluator, run.memory, run.slow_ranks)  # own cadence each; log; return values
    if state.step == 0:  # the starting point of the validation and attention curves
        for component in reversed(measures):
            component.after_step(0)
    # SIGTERM/SIGUSR1: finish the step, save, exit 75; a stalled step: every rank's stacks in the run dir;
    # every way out waits for the checkpoint being written in the background
    with StopSignals() as stop_signals, run.logger, run.profiler, run.watchdog, checkpointer:
        drills = faults.install(dist.get_rank(), lambda: stop_signals.requested)  # FPA_FAULT; nothing unless set
        while state.step < steps:
            where.step = state.step + 1  # named by the failure line if this rank fails now
            started = time.perf_counter()
            run.watchdog.at_step(state.step + 1)
            drills.begin_step(state.step + 1)
            run.profiler.at_step(state.step + 1)
            lam = state.lambdas.value()
            run.penalty.set_step(lam, state.lambdas.active())
            with run.memory.measure(state.step + 1):
                result = forward_backward(run.model, run.batches, run.penalty,
                                          num_microbatches=state.num_microbatches(),
                                          micro_batch_size=cfg.train.micro_batch_size,
                                          seq_length=cfg.model.seq_length, engine=run.engine)
            lr = lr_at(state.updates, cfg.optimizer, steps)
            verdict = guard.check(state.step + 1, result.lm_loss, result.penalty, stop_signals.requested,
                                  checkpointer.time_due(), step_seconds=result.finished_at - started,
                                  data_wait_seconds=result.data_wait_s)  # the times: for run.slow_ranks
            run.forensics.after_verdict(state.step + 1, verdict, result.lm_loss, state.consumed_samples,
                                        state.global_batch_size())  # a step not kept: its samples to the run dir
            if verdict.update:
                grad_norm, applied = optimizer_step(run.engine, lr)
            else:
                discard_gradients(run.engine)
                grad_norm, applied = math.nan, False
            state.advance(applied)
            rolled_back_to = roll_back(run) if verdict.action == ROLLBACK else None  # the data moves on
            guard.conclude(state.step, verdict, applied, result.lm_loss, rolled_back_to)  # raises past its limits

            final, step = state.step == steps, state.step
            metrics = step_metrics(run, result, lam, lr, grad_norm, time.perf_counter() - started, world_size)
            history.append(dict(metrics, step=step, applied=applied))
            run.logger.log_step(step, metrics, result.penalty_matrix, applied, final)
            for component in measures:
                history[-1].update(component.after_step(step, final))
            exiting = 0 < cfg.train.exit_interval <= state.steps_this_run()
            if guard.sound:  # the state after a skipped step is never saved
                checkpointer.maybe_save(step, run.engine, state.state_dict(), final=final,
                                        exiting=exiting or verdict.stop_requested, time_due=verdict.save_due)
            if verdict.stop_requested:
                saved = f"checkpoint saved at step {step}" if guard.sound else (
                    f"no checkpoint at step {step} (its update was skipped); resume from the newest one")
                raise Preempted(f"{stop_signals.received or 'a stop signal on another rank'}: stopped after step "
                                f"{step}, {saved}; rerun the same command to resume", step)
            if exiting:
                log.info(f"exit_interval reached: stopping at step {step}; rerun to resume")
                break
    if history:
        last = history[-1]
        log.info(f"done: {state.step} steps ({state.updates} updates, {guard.skipped_steps} skipped), "
                 f"lm_loss {last['lm_loss']:.4f}"
                 + (f", val_loss {last['val_loss']:.4f} (ppl {math.exp(min(last['val_loss'], 50)):.1f})"
                    if "val_loss" in last else ""))
    return history


def step_metrics(run: Run, result, lam: float, lr: float, grad_norm: float, seconds: float, world_size: int) -> dict:
    """The step's scalars (None: not logged)."""
    tokens_per_s = result.tokens / seconds
    tflops = run.flops_per_token * tokens_per_s / world_size / 1e12  # per device
    guard = run.state.guard
    ramp = run.cfg.train.rampup_batch_size is not None  # the step's global batch is logged while it can change
    return {"lm_loss": result.lm_loss, "penalty": result.penalty, "penalty_weighted": lam * result.penalty,
            "z_loss": result.z_loss, "lambda": lam, "lr": lr, "grad_norm": grad_norm,
            "global_batch_size": result.tokens // run.cfg.model.seq_length if ramp else None,
            "skipped_steps": guard.skipped_steps, "rollbacks": guard.rollbacks or None,
            "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / run.cfg.logging.peak_tflops,
            "iter_time_s": seconds, "mem_gb": memory_gb()}
