"""AdamW under DeepSpeed ZeRO over the data-parallel group, fed by Megatron's schedules (the LR schedule:
`fpa_megatron/schedules.py`).

Megatron's schedule runs backward itself, so the engine runs with `managed_gradient_accumulation: false`:
each `engine.step()` is the accumulation boundary (reduce over DP, clip, update) and the engine never
divides the loss (the schedule already divides by the number of micro-batches).

Gradient clipping uses DeepSpeed's global norm, which sums over DP partitions and the model-parallel
group (TP x PP) and counts a parameter when it is model-parallel or lives on model-parallel rank 0.
`mark_params_for_global_norm` makes that rule exact for Megatron's layout: every parameter counts on
tensor-parallel rank 0 of its own pipeline stage (TP shards on every TP rank), and the last stage's
copy of tied embeddings is skipped.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core import parallel_state

from fpa_megatron.config import OptimizerConfig
from fpa_megatron.model.gpt import model_chunks
from fpa_megatron.model.memory import reduce_bucket_elements
from fpa_megatron.parallel.state import MegatronMPU


def mark_params_for_global_norm(model) -> None:
    """Set DeepSpeed's attributes so each parameter enters the global grad norm exactly once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shared_copies = [chunk.output_layer.weight for chunk in model_chunks(model)  # every chunk of a virtual pipeline
                     if getattr(chunk, "share_embeddings_and_output_weights", False) and not chunk.pre_process
                     and chunk.post_process]
    for param in model.parameters():
        if any(param is copy for copy in shared_copies):
            param.ds_pipe_replicated = True
        elif not getattr(param, "tensor_model_parallel", False) and tp_rank == 0:
            param.model_parallel = True


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed (as Megatron-LM)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(cfg: OptimizerConfig, dtype: str, micro_batch_size: int, num_microbatches: int,
                     parameters: Optional[int] = None) -> dict:
    """`parameters` (this rank's): the gradient reduce bucket is sized to hold them, at most DeepSpeed's default;
    DeepSpeed allocates the whole bucket at the first step (fp32 under ZeRO-1), 2 GB whatever the model."""
    zero = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True}
    if parameters is not None:
        zero["reduce_bucket_size"] = reduce_bucket_elements(parameters)
    return {
        # One engine step per global batch: the schedule accumulates the micro-batches itself.
        "train_micro_batch_size_per_gpu": micro_batch_size * num_microbatches,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def skip_shared_memory_comm_build() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (about a minute of C++
    on a machine's first run) that only its inference all-reduce uses; this project's collectives go through
    gloo. Marking the op incompatible in DeepSpeed's table of compatible ops (a table DeepSpeed keeps editable
    for this) makes the backend skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model, cfg: OptimizerConfig, dtype: str, micro_batch_size: int, num_microbatches: int):
    """Wrap the model and a torch AdamW in a DeepSpeed engine with ZeRO over the data-parallel group."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        skip_shared_memory_comm_build()
    mark_params_for_global_norm(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        foreach=False,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, mpu=MegatronMPU(),
        config=deepspeed_config(cfg, dtype, micro_batch_size, num_microbatches,
                                parameters=sum(p.numel() for p in model.parameters())),
        dist_init_required=False,
    )
    return engine


def optimizer_step(engine, lr: float) -> tuple[float, bool]:
    """Reduce gradients over DP, clip by the global norm, update with learning rate `lr`.

    Returns the global gradient norm and whether the update was applied (DeepSpeed drops it by itself when
    the norm is not finite).
    """
    with torch.profiler.record_function("fpa/optimizer_step"):
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        engine.step()
        norm = engine.get_global_grad_norm()
        engine.zero_grad()
    return (float(norm) if norm is not None else float("nan")), engine.was_step_applied()


def reduced_gradients(engine, params: list) -> list:
    """The tensors that hold `params`' gradients of this step before `engine.step()`: `param.grad`, except
    under ZeRO-2, whose backward hooks already averaged them over DP into DeepSpeed's accumulated copies
    (only the parameters of this rank's partition have one; None for the others).

    Reads DeepSpeed's ZeRO-1/2 internals (`params_in_partition`, `all_grad_tensors`), as `discard_gradients`
    does: DeepSpeed has no public handle on a gradient between backward and step.
    """
    if engine is None or not engine.zero_optimization_partition_gradients():
        return [param.grad for param in params]
    optimizer = engine.optimizer
    accumulated = {}
    for group, in_partition in enumerate(optimizer.params_in_partition):
        if optimizer._use_compact_grad_partition_buffer(group):
            raise NotImplementedError("ZeRO-2 with an fp32 gradient-accumulation buffer for 16-bit weights: "
                                      "its compact gradient partitions are not handled here (use zero_stage 1)")
        tensors = optimizer.all_grad_tensors.get(group)
        if tensors is not None:
            accumulated.update({id(param): grad for param, grad in zip(in_partition, tensors)})
    return [accumulated.get(id(param)) for param in params]


def discard_gradients(engine) -> None:
    """Drop this step's gradients without an update: parameters and optimizer state stay bit-identical.

    DeepSpeed has no public call for this; it does exactly this in its own overflow branch of the ZeRO-1/2
    `step()` (clear the parameters' gradients, release the reduced partitions). Tested bitwise against a run
    that never saw the dropped batch, for ZeRO-1, ZeRO-2 and pipeline parallelism.
    """
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    optimizer._release_preflattened_grad_buffers()
    for group in optimizer.averaged_gradients:
        optimizer.averaged_gradients[group] = None
        optimizer.all_grad_tensors[group] = None
    engine.zero_grad()
