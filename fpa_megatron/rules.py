"""The pure rules of a run config: every value in range, the layout arithmetic, the derived layout.

No file, device or process group is touched here, so the rules can check a layout that is not this machine's
(fpa-reshard's new layout, the planner's candidates). `check_values(cfg, world_size)` raises `ConfigError`
naming the key and the bad value at the first problem; `resolve_layout` returns what the trainer builds from.
The checks that read files or the machine (data, tokenizer, checkpoint to resume, CUDA) are preflight.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from fpa_megatron.config import ConfigError, RunConfig
from fpa_megatron.options import (ACTIVATIONS, ATTENTION_IMPLS, DECAY_STYLES, DTYPES, FPA_NORMALIZATIONS, FPA_TARGETS,
                                  LR_SCHEDULES, NORMALIZATIONS, POSITION_EMBEDDINGS, RECOMPUTE, SPIKE_POLICIES,
                                  WANDB_MODES, ZERO_STAGES)
from fpa_megatron.schedules import BatchSizeRamp, LambdaSchedule, decay_end

VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class ResolvedLayout:
    """Values derived from a valid config and the world size; what the trainer builds from."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    num_microbatches: int  # per optimizer step and data-parallel rank, at the final global batch size
    vocab_size: int  # model.vocab_size, or the tokenizer's vocabulary size
    padded_vocab_size: int  # vocab_size rounded up to a multiple of make_vocab_size_divisible_by * TP
    ffn_hidden_size: int
    max_position_embeddings: int
    num_query_groups: int
    kv_channels: int  # hidden_size / num_attention_heads
    tokenizer_vocab_size: Optional[int]  # None when no tokenizer is configured
    context_parallel: int = 1
    virtual_pipeline: int = 1
    sequence_parallel: bool = False


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron-LM's padding: the vocabulary rounded up to a multiple of divisible_by * tensor_parallel.

    Keeps the vocab-parallel embedding and output layer equally split and their GEMMs well shaped.
    """
    if vocab_size < 1 or tensor_parallel < 1 or divisible_by < 1:
        raise ConfigError(
            f"padded_vocab_size: vocab_size={vocab_size}, tensor_parallel={tensor_parallel} and "
            f"divisible_by={divisible_by} must all be >= 1"
        )
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


# ------------------------------------------------------------------------------------------ small helpers


def _fail(message: str) -> None:
    raise ConfigError(message)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        _fail(f"{key}={value!r} must be an integer >= {minimum}")


def _number_at_least(key: str, value: Any, minimum: float, strict: bool = False) -> None:
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        _fail(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def _probability(key: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        _fail(f"{key}={value!r} must be in [0, 1)")


# ------------------------------------------------------------------------------------------ the sections


def _check_enums(cfg: RunConfig) -> None:
    m = cfg.model
    _one_of("model.position_embedding", m.position_embedding, POSITION_EMBEDDINGS)
    _one_of("model.normalization", m.normalization, NORMALIZATIONS)
    _one_of("model.activation", m.activation, ACTIVATIONS)
    _one_of("model.recompute", m.recompute, RECOMPUTE)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.attention_impl", m.attention_impl, ATTENTION_IMPLS)
    _one_of("fpa.target", cfg.fpa.target, FPA_TARGETS)
    _one_of("fpa.normalize", cfg.fpa.normalize, FPA_NORMALIZATIONS)


def _check_model(cfg: RunConfig) -> None:
    m = cfg.model
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "attention_block_size",
                "make_vocab_size_divisible_by"):
        _int_at_least(f"model.{key}", getattr(m, key), 1)
    for key in ("num_query_groups", "ffn_hidden_size", "max_position_embeddings", "vocab_size"):
        if getattr(m, key) is not None:
            _int_at_least(f"model.{key}", getattr(m, key), 1)
    if not isinstance(m.qk_layernorm, bool):
        _fail(f"model.qk_layernorm={m.qk_layernorm!r} must be true or false")
    _probability("model.hidden_dropout", m.hidden_dropout)
    _probability("model.attention_dropout", m.attention_dropout)
    _number_at_least("model.init_std", m.init_std, 0.0, strict=True)
    _number_at_least("model.norm_epsilon", m.norm_epsilon, 0.0, strict=True)
    _number_at_least("model.rotary_base", m.rotary_base, 0.0, strict=True)
    if m.hidden_size % m.num_attention_heads:
        _fail(f"model.hidden_size={m.hidden_size} is not divisible by "
              f"model.num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        _fail(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
              f"model.num_query_groups={groups}")
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        _fail(f"model.position_embedding='rope' needs an even head dimension, but model.hidden_size="
              f"{m.hidden_size} / model.num_attention_heads={m.num_attention_heads} = "
              f"{m.hidden_size // m.num_attention_heads}")
    if m.position_embedding == "learned":
        max_positions = m.max_position_embeddings or m.seq_length
        if m.seq_length > max_positions:
            _fail(f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings={max_positions} "
                  f"(learned position embeddings)")
    _check_attention_impl(cfg)


def _check_parallel(cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    m, p = cfg.model, cfg.parallel
    _int_at_least("world_size", world_size, 1)
    _int_at_least("parallel.tensor", p.tensor, 1)
    _int_at_least("parallel.pipeline", p.pipeline, 1)
    if m.num_attention_heads % p.tensor:
        _fail(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_query_groups is not None and groups % p.tensor:
        _fail(f"model.num_query_groups={groups} is not divisible by parallel.tensor={p.tensor}")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % p.tensor:
        _fail(f"model.ffn_hidden_size={ffn} is not divisible by parallel.tensor={p.tensor}")
    if m.num_layers % p.pipeline:
        _fail(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}")
    _check_context_parallel(cfg)
    _check_sequence_parallel(cfg)
    _check_virtual_pipeline(cfg)
    model_parallel = p.tensor * p.context * p.pipeline
    if world_size % model_parallel:
        _fail(f"world_size={world_size} is not divisible by parallel.tensor * parallel.context * parallel.pipeline"
              f" = {p.tensor} * {p.context} * {p.pipeline} = {model_parallel}")
    return p.tensor, p.pipeline, world_size // model_parallel


def _check_context_parallel(cfg: RunConfig) -> None:
    """CP splits every sequence into 2C chunks (rank r keeps r and 2C-1-r), each cut again by TP under SP."""
    m, p = cfg.model, cfg.parallel
    _int_at_least("parallel.context", p.context, 1)
    if p.context == 1:
        return
    if p.sequence_parallel is True:  # SP then splits each CP rank's tokens over TP
        pieces, how = 2 * p.context * p.tensor, f"2 * parallel.context * parallel.tensor = 2 * {p.context} * {p.tensor}"
    else:
        pieces, how = 2 * p.context, f"2 * parallel.context = 2 * {p.context}"
    if m.seq_length % pieces:
        _fail(f"model.seq_length={m.seq_length} is not divisible by {how} = {pieces}: each sequence is cut into "
              f"2 * parallel.context={2 * p.context} load-balanced chunks")
    if m.attention_dropout > 0:
        _fail(f"model.attention_dropout={m.attention_dropout} is not supported with parallel.context={p.context}: "
              f"the attention across context-parallel ranks has no dropout; set model.attention_dropout=0")


def _check_sequence_parallel(cfg: RunConfig) -> None:
    p, seq = cfg.parallel, cfg.model.seq_length
    if not isinstance(p.sequence_parallel, bool):
        _fail(f"parallel.sequence_parallel={p.sequence_parallel!r} must be true or false")
    if not p.sequence_parallel:
        return
    if p.tensor == 1:
        _fail("parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the sequence over the "
              "tensor-parallel ranks; got parallel.tensor=1)")
    if seq % p.tensor:
        _fail(f"parallel.sequence_parallel=true: model.seq_length={seq} is not divisible by "
              f"parallel.tensor={p.tensor}")


def _check_virtual_pipeline(cfg: RunConfig) -> None:
    """V model chunks per stage: Megatron splits the layers evenly into pipeline * V chunks."""
    p, layers = cfg.parallel, cfg.model.num_layers
    _int_at_least("parallel.virtual_pipeline", p.virtual_pipeline, 1)
    if p.virtual_pipeline == 1:
        return
    if p.pipeline < 2:
        _fail(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1 (it splits each pipeline "
              f"stage into model chunks), got parallel.pipeline={p.pipeline}")
    if layers % (p.pipeline * p.virtual_pipeline):
        _fail(f"model.num_layers={layers} is not divisible by parallel.pipeline * parallel.virtual_pipeline = "
              f"{p.pipeline} * {p.virtual_pipeline} = {p.pipeline * p.virtual_pipeline} (layers per model chunk)")


def _check_interleaved_schedule(cfg: RunConfig, num_microbatches: int, what: str = "train.global_batch_size") -> None:
    """Megatron's interleaved schedule runs the micro-batches in groups of PP (`microbatch_group_size_per_vp_stage`
    defaults to PP): it refuses fewer than PP micro-batches and a last group smaller than PP."""
    p = cfg.parallel
    if p.virtual_pipeline > 1 and num_microbatches % p.pipeline:
        _fail(f"parallel.virtual_pipeline={p.virtual_pipeline}: the interleaved schedule needs the micro-batches per "
              f"step ({what} / (train.micro_batch_size * data_parallel) = {num_microbatches}) to be "
              f"a multiple of parallel.pipeline={p.pipeline}")


def _check_rampup(cfg: RunConfig, data_parallel: int) -> None:
    """train.rampup_batch_size = [start, increment, samples]: every batch size of the ramp a whole number of
    micro-batches on every DP rank (as Megatron-LM's consistency check), reaching the final size exactly."""
    t = cfg.train
    ramp = t.rampup_batch_size
    if ramp is None:
        return
    key = f"train.rampup_batch_size={ramp!r}"
    if not isinstance(ramp, (list, tuple)) or len(ramp) != 3 or not all(_is_int(v) for v in ramp):
        _fail(f"{key} must be three integers [start, increment, samples]")
    start, increment, samples = ramp
    if start < 1 or increment < 1 or samples < 1:
        _fail(f"{key}: start, increment and samples must all be >= 1")
    if start > t.global_batch_size:
        _fail(f"{key}: start={start} is larger than train.global_batch_size={t.global_batch_size}")
    if (t.global_batch_size - start) % increment:
        _fail(f"{key}: train.global_batch_size - start = {t.global_batch_size} - {start} is not a multiple of "
              f"increment={increment}")
    per_microbatch = t.micro_batch_size * data_parallel
    for size in BatchSizeRamp(t.global_batch_size, per_microbatch, ramp).sizes():
        if size % per_microbatch:
            _fail(f"{key}: the ramp's global batch size {size} is not divisible by train.micro_batch_size * "
                  f"data_parallel = {t.micro_batch_size} * {data_parallel} = {per_microbatch}")
        _check_interleaved_schedule(cfg, size // per_microbatch, f"the ramp's global batch size {size}")


def _check_batch(cfg: RunConfig, data_parallel: int) -> int:
    t = cfg.train
    _int_at_least("train.steps", t.steps, 1)
    _int_at_least("train.micro_batch_size", t.micro_batch_size, 1)
    _int_at_least("train.global_batch_size", t.global_batch_size, 1)
    _int_at_least("train.seed", t.seed, 0)
    _int_at_least("train.eval_interval", t.eval_interval, 0)
    if hasattr(t, "exit_interval"):
        _int_at_least("train.exit_interval", t.exit_interval, 0)
    if t.eval_interval > 0:
        _int_at_least("train.eval_iters", t.eval_iters, 1)
    per_microbatch = t.micro_batch_size * data_parallel
    if t.global_batch_size % per_microbatch:
        _fail(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size * "
              f"data_parallel = {t.micro_batch_size} * {data_parallel} = {per_microbatch}")
    return t.global_batch_size // per_microbatch


def _check_optimizer(cfg: RunConfig, pipeline: int) -> None:
    o = cfg.optimizer
    _number_at_least("optimizer.lr", o.lr, 0.0, strict=True)
    _number_at_least("optimizer.min_lr", o.min_lr, 0.0)
    if o.min_lr > o.lr:
        _fail(f"optimizer.min_lr={o.min_lr} is larger than optimizer.lr={o.lr}")
    _number_at_least("optimizer.weight_decay", o.weight_decay, 0.0)
    _probability("optimizer.beta1", o.beta1)
    _probability("optimizer.beta2", o.beta2)
    _number_at_least("optimizer.eps", o.eps, 0.0, strict=True)
    _int_at_least("optimizer.warmup_steps", o.warmup_steps, 0)
    if o.decay_steps is not None:
        _int_at_least("optimizer.decay_steps", o.decay_steps, 1)
    _check_lr_schedule(cfg)
    _number_at_least("optimizer.z_loss", o.z_loss, 0.0)
    _number_at_least("optimizer.grad_clip", o.grad_clip, 0.0)
    if o.zero_stage == 3:
        _fail("optimizer.zero_stage=3: ZeRO-3 is not supported with Megatron's tensor-parallel layers and "
              "pipeline schedules (it partitions the parameters those layers shard themselves); use 1 or 2")
    if o.zero_stage == 0:
        _fail("optimizer.zero_stage=0 is not supported: Megatron's schedules call backward themselves, which "
              "DeepSpeed only accepts with a ZeRO optimizer; use 1 (optimizer states sharded over DP) or 2")
    if o.zero_stage not in ZERO_STAGES:
        _fail(f"optimizer.zero_stage={o.zero_stage!r} is not one of 1, 2")
    if o.zero_stage == 2 and pipeline > 1:
        _fail(f"optimizer.zero_stage=2 is not supported with parallel.pipeline={pipeline}: ZeRO-2 reduces "
              f"gradients in hooks on every micro-batch, which breaks under the 1F1B pipeline schedule "
              f"(use zero_stage 1, or parallel.pipeline=1)")


def _check_lr_schedule(cfg: RunConfig) -> None:
    o = cfg.optimizer
    _one_of("optimizer.lr_schedule", o.lr_schedule, LR_SCHEDULES)
    _one_of("optimizer.decay_style", o.decay_style, DECAY_STYLES)
    if o.lr_schedule != "wsd":
        for key in ("decay_start", "decay_fraction"):
            if getattr(o, key) is not None:
                _fail(f"optimizer.{key}={getattr(o, key)!r} is only used by optimizer.lr_schedule='wsd' "
                      f"(got optimizer.lr_schedule={o.lr_schedule!r})")
        return
    end = decay_end(o, cfg.train.steps)
    end_key = f"optimizer.decay_steps={o.decay_steps}" if o.decay_steps else f"train.steps={cfg.train.steps}"
    if o.decay_start is not None:
        _int_at_least("optimizer.decay_start", o.decay_start, 0)
        if not o.warmup_steps <= o.decay_start <= end:
            _fail(f"optimizer.decay_start={o.decay_start} must lie between optimizer.warmup_steps={o.warmup_steps} "
                  f"and the end of the decay ({end_key})")
    elif o.decay_fraction is not None:
        if not _is_number(o.decay_fraction) or not 0.0 <= o.decay_fraction <= 1.0:
            _fail(f"optimizer.decay_fraction={o.decay_fraction!r} must be in [0, 1]")
        if end - int(round(o.decay_fraction * end)) < o.warmup_steps:
            _fail(f"optimizer.decay_fraction={o.decay_fraction}: the decay would begin at step "
                  f"{end - int(round(o.decay_fraction * end))}, inside optimizer.warmup_steps={o.warmup_steps}")
    else:
        _fail("optimizer.lr_schedule='wsd' needs optimizer.decay_fraction (the decay's share of the steps, e.g. 0.2;"
              " 0 = stable to the end) or optimizer.decay_start (the step where the decay begins)")


def _check_logging_and_checkpoint(cfg: RunConfig) -> None:
    lg, ck = cfg.logging, cfg.checkpoint
    _int_at_least("logging.interval", lg.interval, 1)
    _int_at_least("logging.heatmap_interval", lg.heatmap_interval, 0)
    _int_at_least("logging.attention_stats_interval", lg.attention_stats_interval, 0)
    _number_at_least("logging.peak_tflops", lg.peak_tflops, 0.0, strict=True)
    _int_at_least("checkpoint.interval", ck.interval, 0)
    _int_at_least("checkpoint.keep_last", ck.keep_last, 1)
    _number_at_least("checkpoint.interval_minutes", ck.interval_minutes, 0.0)
    _one_of("logging.wandb.mode", lg.wandb.mode, WANDB_MODES)


def _check_profiling(cfg: RunConfig, world_size: int) -> None:
    p = cfg.profiling
    _int_at_least("profiling.start_step", p.start_step, 0)
    _int_at_least("profiling.steps", p.steps, 1)
    if not isinstance(p.memory, bool):
        _fail(f"profiling.memory={p.memory!r} must be true or false")
    if not isinstance(p.ranks, list) or not p.ranks or not all(_is_int(r) and 0 <= r < world_size for r in p.ranks):
        _fail(f"profiling.ranks={p.ranks!r} must be a non-empty list of global ranks in [0, {world_size})")


def _check_guard_and_timeout(cfg: RunConfig) -> None:
    t, spike = cfg.train, cfg.train.spike
    _number_at_least("parallel.timeout_minutes", cfg.parallel.timeout_minutes, 0.0, strict=True)
    _int_at_least("train.max_consecutive_skips", t.max_consecutive_skips, 0)
    _one_of("train.spike.policy", spike.policy, SPIKE_POLICIES)
    _number_at_least("train.spike.factor", spike.factor, 1.0, strict=True)
    _number_at_least("train.spike.min_increase", spike.min_increase, 0.0)
    _number_at_least("train.spike.deviations", spike.deviations, 0.0)
    _int_at_least("train.spike.window", spike.window, 1)
    _int_at_least("train.spike.min_history", spike.min_history, 1)
    if spike.min_history > spike.window:
        _fail(f"train.spike.min_history={spike.min_history} is larger than train.spike.window={spike.window} "
              f"(the median is taken over at most `window` steps)")
    _int_at_least("train.spike.max_rollbacks", spike.max_rollbacks, 0)
    factor = t.slow_rank.factor
    if factor is not None and factor != 0 and not (_is_number(factor) and factor > 1):
        _fail(f"train.slow_rank.factor={factor!r} must be a number > 1 (0 or null: off)")
    _int_at_least("train.slow_rank.steps", t.slow_rank.steps, 0)


def _check_attention_impl(cfg: RunConfig) -> None:
    m = cfg.model
    if m.attention_impl != "eager" and m.attention_dropout > 0:
        # Only the eager path has dropout; the fast kernels (SDPA, blockwise, Triton) are used without it.
        _fail(f"model.attention_dropout={m.attention_dropout} is not supported by "
              f"model.attention_impl={m.attention_impl!r}: set model.attention_dropout=0 (the usual setting "
              f"for pretraining) or model.attention_impl=eager")


def _check_fpa(cfg: RunConfig) -> None:
    f = cfg.fpa
    try:  # the schedule's own validation: one rule for the config check and the run
        LambdaSchedule(f.lambda0, f.gamma, f.min_lambda, f.enabled)
    except ValueError as err:
        _fail(str(err))


def check_model(cfg: RunConfig) -> None:
    """The model section and the options, alone (the planner's check before it varies the layout)."""
    _check_enums(cfg)
    _check_model(cfg)


def check_values(cfg: RunConfig, world_size: int) -> tuple[int, int, int, int]:
    """Every value of cfg that needs no file: ConfigError at the first problem, else (tensor, pipeline,
    data_parallel, num_microbatches)."""
    check_model(cfg)
    tensor, pipeline, data_parallel = _check_parallel(cfg, world_size)
    num_microbatches = _check_batch(cfg, data_parallel)
    _check_interleaved_schedule(cfg, num_microbatches)
    _check_rampup(cfg, data_parallel)
    _check_optimizer(cfg, pipeline)
    _check_fpa(cfg)
    _check_guard_and_timeout(cfg)
    _check_logging_and_checkpoint(cfg)
    _check_profiling(cfg, world_size)
    return tensor, pipeline, data_parallel, num_microbatches


def resolve_layout(cfg: RunConfig, world_size: int, vocab_size: int,
                   tokenizer_vocab_size: Optional[int] = None) -> ResolvedLayout:
    """The derived layout of a valid cfg on world_size ranks (checked by `check_values` first)."""
    tensor, pipeline, data_parallel, num_microbatches = check_values(cfg, world_size)
    m = cfg.model
    return ResolvedLayout(
        world_size=world_size,
        tensor_parallel=tensor,
        pipeline_parallel=pipeline,
        data_parallel=data_parallel,
        num_microbatches=num_microbatches,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size(vocab_size, tensor, m.make_vocab_size_divisible_by),
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.hidden_size // m.num_attention_heads,
        tokenizer_vocab_size=tokenizer_vocab_size,
        context_parallel=cfg.parallel.context,
        virtual_pipeline=cfg.parallel.virtual_pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
