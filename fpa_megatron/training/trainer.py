"""`train(cfg)`: the whole pretraining run, top to bottom.

Set up the process groups, the GPT with the penalized attention, DeepSpeed ZeRO, the data, the lambda
schedule, the checkpointer and the logger; resume if there is a checkpoint; then one loop: set lambda_t,
forward/backward on Megatron's schedule, optimizer step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from fpa_megatron.config import RunConfig, run_dir, save_config
from fpa_megatron.config_checks import ResolvedLayout, check_config
from fpa_megatron.data.datasets import build_gpt_datasets, micro_batches
from fpa_megatron.logging.flops import flops_per_token
from fpa_megatron.logging.metrics_logger import MetricsLogger, memory_gb
from fpa_megatron.model.attention_stats import attention_summary
from fpa_megatron.model.gpt import build_gpt_model, make_penalty
from fpa_megatron.parallel.state import init_distributed, init_model_parallel
from fpa_megatron.training.attention_diagnostics import AttentionDiagnostics
from fpa_megatron.training.checkpoint import Checkpointer, checkpoint_root
from fpa_megatron.training.forward_backward import forward_backward
from fpa_megatron.training.lambda_schedule import LambdaSchedule
from fpa_megatron.training.optimizer import build_engine, lr_at, optimizer_step


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


def train(cfg: RunConfig, layout: ResolvedLayout | None = None) -> list[dict]:
    """Run (or resume) the pretraining described by cfg; return the per-step metrics of this process.

    `layout` is what `check_config` returned, if the caller already checked the config.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if layout is None:
        layout = check_config(cfg, world_size)  # every config error surfaces before any process group exists
    init_distributed()
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    rank = dist.get_rank()
    out_dir = run_dir(cfg)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=cfg.train.seed)
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, layout.num_microbatches)
    lambdas = LambdaSchedule(cfg.fpa.lambda0, cfg.fpa.gamma, cfg.fpa.min_lambda, cfg.fpa.enabled)
    steps, global_batch = cfg.train.steps, cfg.train.global_batch_size
    eval_batches = (cfg.train.eval_iters * global_batch) if cfg.train.eval_interval > 0 else 0
    train_ds, valid_ds, _ = build_gpt_datasets(
        cfg.data.prefixes, cfg.data.weights, cfg.data.split, cfg.model.seq_length, cfg.train.seed,
        (steps * global_batch, eval_batches, 0), cfg.data.tokenizer, cfg.data.cache_dir, mock=cfg.data.mock,
        mock_vocab_size=layout.vocab_size, eod_mask_loss=cfg.data.eod_mask_loss,
    )
    checkpointer = Checkpointer(checkpoint_root(cfg), cfg.checkpoint.interval, cfg.checkpoint.keep_last,
                                cfg.checkpoint.resume, cfg)

    step, consumed = 0, 0
    resume_from = checkpointer.find_resume()
    if resume_from is not None:
        state = checkpointer.load(resume_from, engine)
        step, consumed = state["step"], state["consumed_samples"]
        lambdas.load_state_dict(state["lambda_schedule"])
        if rank == 0:
            print(f"resumed from {resume_from} at step {step} ({consumed} samples consumed)", flush=True)
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
    while step < steps:
        t0 = time.perf_counter()
        lam, active = lambdas.value(), lambdas.active()
        penalty.set_step(lam, active)
        result = forward_backward(model, batches, penalty, num_microbatches=layout.num_microbatches,
                                  micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.model.seq_length,
                                  engine=engine)
        lr = lr_at(step, cfg.optimizer, steps)
        grad_norm = optimizer_step(engine, lr)
        lambdas.advance()
        step += 1
        consumed += global_batch
        seconds = time.perf_counter() - t0

        tokens_per_s = result.tokens / seconds
        tflops = flops_token * tokens_per_s / world_size / 1e12  # per device
        metrics = {
            "lm_loss": result.lm_loss, "penalty": result.penalty, "penalty_weighted": lam * result.penalty,
            "lambda": lam, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tflops": tflops,
            "mfu": tflops / cfg.logging.peak_tflops, "iter_time_s": seconds, "mem_gb": memory_gb(),
        }
        history.append(dict(metrics, step=step))
        if step % cfg.logging.interval == 0 or step == 1 or step == steps:
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
        trainer_state = {"step": step, "consumed_samples": consumed, "lambda_schedule": lambdas.state_dict()}
        exiting = cfg.train.exit_interval > 0 and step - first_step >= cfg.train.exit_interval
        checkpointer.maybe_save(step, engine, trainer_state, final=step == steps, exiting=exiting)
        if exiting:
            if rank == 0:
                print(f"exit_interval reached: stopping at step {step}; rerun to resume", flush=True)
            break
    logger.close()
    if rank == 0 and history:
        last = history[-1]
        print(f"done: {step} steps, lm_loss {last['lm_loss']:.4f}"
              + (f", val_loss {last['val_loss']:.4f} (ppl {math.exp(min(last['val_loss'], 50)):.1f})"
                 if "val_loss" in last else ""), flush=True)
    return history
