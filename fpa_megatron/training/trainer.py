"""`train(cfg)`: the whole pretraining run, top to bottom.

Set up the process groups, the GPT with the penalized attention, DeepSpeed ZeRO, the data, the lambda
schedule, the checkpointer, the guard and the logger; resume if there is a checkpoint; then one loop: set
lambda_t, forward/backward on Megatron's schedule, let the guard decide for all ranks (one all-reduce),
update or drop the update, log, evaluate, checkpoint.

`step` counts the global batches consumed (a skipped or rolled-back step consumes its batch); `updates` counts
the optimizer updates applied, which the LR and lambda schedules follow. A deliberate stop (SIGTERM/SIGUSR1,
divergence, a loss spike) raises `RunStopped` with its exit code (fpa_megatron/exit_codes.py).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from fpa_megatron import faults
from fpa_megatron.config import RunConfig, run_dir, save_config
from fpa_megatron.rules import ResolvedLayout
from fpa_megatron.preflight import check_config
from fpa_megatron.data.datasets import build_gpt_datasets, micro_batches
from fpa_megatron.exit_codes import Preempted
from fpa_megatron.flops import flops_per_token
from fpa_megatron.training.metrics import MetricsLogger, memory_gb
from fpa_megatron.run_log import get_logger, setup_logging, where
from fpa_megatron.attention.stats import attention_summary
from fpa_megatron.model.gpt import build_gpt_model, make_penalty
from fpa_megatron.parallel.state import init_distributed, init_model_parallel
from fpa_megatron.parallel.weights import load_global_state
from fpa_megatron.training.attention_diagnostics import AttentionDiagnostics
from fpa_megatron.checkpoint.checkpointer import Checkpointer
from fpa_megatron.checkpoint.lineage import checkpoint_root
from fpa_megatron.checkpoint.reader import initial_weights
from fpa_megatron.training.forward_backward import forward_backward
from fpa_megatron.training.guard import ROLLBACK, TrainingGuard
from fpa_megatron.schedules import LambdaSchedule
from fpa_megatron.training.optimizer import build_engine, discard_gradients, lr_at, optimizer_step
from fpa_megatron.training.preemption import StopSignals

log = get_logger("trainer")


def evaluate(model, engine, penalty, valid_ds, cfg: RunConfig, layout) -> float:
    """Mean LM loss over the first eval_iters global batches of the validation split (the same each time)."""
    batches = micro_batches(valid_ds, 0, cfg.train.micro_batch_size, parallel_state.get_data_parallel_rank(),
                            layout.data_parallel)
    saved = (penalty.lambda_value, penalty.active)
    penalty.set_step(0.0, False)  # validation reports the LM loss; no penalty needed
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(cfg.train.eval_iters):
            result = forward_backward(model, batches, penalty, num_microbatches=layout.num_microbatches,
                                      micro_batch_size=cfg.train.micro_batch_size,
                                      seq_length=cfg.model.seq_length, forward_only=True, engine=engine)
            losses.append(result.lm_loss)
    model.train()
    penalty.set_step(*saved)
    return sum(losses) / len(losses)


def roll_back(checkpointer: Checkpointer, engine, lambdas: LambdaSchedule, step: int,
              updates: int) -> tuple[Optional[Path], int]:
    """After a loss spike: reload model, optimizer, RNG and lambda from the run's newest checkpoint (`latest`).

    The data position stays where it is, so the batches between that checkpoint and the spike are not
    replayed. Returns the checkpoint (None if there is none yet: nothing changes) and the update count.
    """
    target = checkpointer.latest()
    if target is None:
        return None, updates
    state = checkpointer.load(target, engine)
    lambdas.load_state_dict(state["lambda_schedule"])
    if dist.get_rank() == 0:
        log.warning(f"step {step}: rolled back to {target} (step {state['step']}): model, optimizer and lambda "
                    f"restored; the batches of steps {state['step'] + 1}-{step} are not replayed, training "
                    f"continues with the batch of step {step + 1}")
    return target, state.get("updates", state["step"])


def train(cfg: RunConfig, layout: ResolvedLayout | None = None) -> list[dict]:
    """Run (or resume) the pretraining described by cfg; return the per-step metrics of this process.

    `layout` is what `check_config` returned, if the caller already checked the config.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if layout is None:
        layout = check_config(cfg, world_size)  # every config error surfaces before any process group exists
    init_distributed(cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed, cfg.parallel.timeout_minutes,
                        context=cfg.parallel.context, virtual_pipeline=cfg.parallel.virtual_pipeline)
    rank = dist.get_rank()
    setup_logging(rank)
    out_dir = run_dir(cfg)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    checkpointer = Checkpointer(checkpoint_root(cfg), cfg.checkpoint.interval, cfg.checkpoint.keep_last,
                                cfg.checkpoint.resume, cfg, interval_minutes=cfg.checkpoint.interval_minutes)
    import_weights = cfg.checkpoint.init_from and not checkpointer.has_resume_candidate()
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=cfg.train.seed,
                            vocab_size=layout.vocab_size, sequence_parallel=layout.sequence_parallel)
    if import_weights:  # weights only (before the engine copies them): step 0, a fresh optimizer, lambda_0
        load_global_state(model, initial_weights(cfg.checkpoint.init_from, layout.padded_vocab_size))
        log.info(f"initialized from {cfg.checkpoint.init_from} (weights only: step 0, a fresh optimizer)")
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, layout.num_microbatches)
    lambdas = LambdaSchedule(cfg.fpa.lambda0, cfg.fpa.gamma, cfg.fpa.min_lambda, cfg.fpa.enabled)
    steps, global_batch = cfg.train.steps, cfg.train.global_batch_size
    eval_batches = (cfg.train.eval_iters * global_batch) if cfg.train.eval_interval > 0 else 0
    train_ds, valid_ds, _ = build_gpt_datasets(
        cfg.data.prefixes, cfg.data.weights, cfg.data.split, cfg.model.seq_length, cfg.train.seed,
        (steps * global_batch, eval_batches, 0), cfg.data.tokenizer, cfg.data.cache_dir, mock=cfg.data.mock,
        mock_vocab_size=layout.vocab_size, eod_mask_loss=cfg.data.eod_mask_loss,
    )
    guard = TrainingGuard(cfg.train, model, rank)  # non-finite steps, loss spikes, the stop request

    step, consumed, updates = 0, 0, 0
    resume_from = checkpointer.find_resume(engine)  # verified on every rank; auto passes over damaged ones
    if resume_from is None and cfg.checkpoint.init_from and not import_weights:
        raise RuntimeError(f"every checkpoint of this run was damaged and moved to {checkpointer.root / 'abandoned'}"
                           f": rerun to start again from checkpoint.init_from={cfg.checkpoint.init_from}")
    if resume_from is not None:
        state = checkpointer.load(resume_from, engine)
        step, consumed = state["step"], state["consumed_samples"]
        updates = state.get("updates", step)
        lambdas.load_state_dict(state["lambda_schedule"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
        log.info(f"resumed from {resume_from} at step {step} ({consumed} samples consumed)")
    batches = micro_batches(train_ds, consumed, cfg.train.micro_batch_size, parallel_state.get_data_parallel_rank(),
                            layout.data_parallel)
    logger = MetricsLogger(str(out_dir), enabled=rank == 0, tensorboard=cfg.logging.tensorboard, total_steps=steps)
    diagnostics = AttentionDiagnostics(cfg.logging.attention_stats_interval, model, engine, penalty, valid_ds,
                                       train_ds, cfg.train.micro_batch_size, cfg.model.seq_length)
    flops_token = flops_per_token(cfg.model, layout.padded_vocab_size, cfg.model.seq_length)

    history = []
    first_step = step
    if step == 0 and cfg.train.eval_interval > 0:  # the starting point of the validation curve
        logger.log_eval(0, evaluate(model, engine, penalty, valid_ds, cfg, layout))
    attention = diagnostics.maybe_measure(step) if step == 0 else None  # ... and of the attention curves
    if attention is not None:
        logger.log_attention(step, attention)
    with StopSignals() as stop_signals, logger:  # SIGTERM/SIGUSR1: finish the step, save, exit 75
        drills = faults.install(rank, lambda: stop_signals.requested)  # FPA_FAULT; nothing unless it is set
        while step < steps:
            where.step = step + 1  # named by the failure line if this rank fails now
            t0 = time.perf_counter()
            drills.begin_step(step + 1)
            lam, active = lambdas.value(), lambdas.active()
            penalty.set_step(lam, active)
            result = forward_backward(model, batches, penalty, num_microbatches=layout.num_microbatches,
                                      micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.model.seq_length,
                                      engine=engine)
            lr = lr_at(updates, cfg.optimizer, steps)
            verdict = guard.check(step + 1, result.lm_loss, result.penalty, stop_signals.requested,
                                  checkpointer.time_due())
            if verdict.update:
                grad_norm, applied = optimizer_step(engine, lr)
            else:
                discard_gradients(engine)
                grad_norm, applied = math.nan, False
            step += 1
            consumed += global_batch  # the batch is consumed whatever happened to its update
            if applied:
                updates += 1
                lambdas.advance()
            rolled_back_to = None
            if verdict.action == ROLLBACK:  # a loss spike: back to the newest checkpoint, the data moves on
                rolled_back_to, updates = roll_back(checkpointer, engine, lambdas, step, updates)
            guard.conclude(step, verdict, applied, result.lm_loss, rolled_back_to)  # raises past its limits
            seconds = time.perf_counter() - t0

            tokens_per_s = result.tokens / seconds
            tflops = flops_token * tokens_per_s / world_size / 1e12  # per device
            metrics = {
                "lm_loss": result.lm_loss, "penalty": result.penalty, "penalty_weighted": lam * result.penalty,
                "lambda": lam, "lr": lr, "grad_norm": grad_norm, "skipped_steps": guard.skipped_steps,
                "rollbacks": guard.rollbacks or None, "tokens_per_s": tokens_per_s, "tflops": tflops,
                "mfu": tflops / cfg.logging.peak_tflops, "iter_time_s": seconds, "mem_gb": memory_gb(),
            }  # None: not logged
            history.append(dict(metrics, step=step, applied=applied))
            if step % cfg.logging.interval == 0 or step == 1 or step == steps or not applied:
                logger.log(step, metrics)
            every = cfg.logging.heatmap_interval or cfg.logging.interval
            if step % every == 0 or step == steps:  # per-layer scalars and the [layers x heads] heatmap
                logger.log_penalty(step, result.penalty_matrix.sum(dim=1), result.penalty_matrix)
            attention = diagnostics.maybe_measure(step, final=step == steps)  # one no-grad micro-batch every N steps
            if attention is not None:
                logger.log_attention(step, attention)
                history[-1].update(attention_summary(attention))
            if cfg.train.eval_interval > 0 and (step % cfg.train.eval_interval == 0 or step == steps):
                val_loss = evaluate(model, engine, penalty, valid_ds, cfg, layout)
                history[-1]["val_loss"] = val_loss
                logger.log_eval(step, val_loss)
            trainer_state = {"step": step, "consumed_samples": consumed, "updates": updates,
                             "lambda_schedule": lambdas.state_dict(), "guard": guard.state_dict()}
            exiting = cfg.train.exit_interval > 0 and step - first_step >= cfg.train.exit_interval
            if guard.sound:  # the state after a skipped step is never saved
                checkpointer.maybe_save(step, engine, trainer_state, final=step == steps,
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
        log.info(f"done: {step} steps ({updates} updates, {guard.skipped_steps} skipped), lm_loss {last['lm_loss']:.4f}"
                 + (f", val_loss {last['val_loss']:.4f} (ppl {math.exp(min(last['val_loss'], 50)):.1f})"
                    if "val_loss" in last else ""))
    return history
