"""Process groups: Megatron's tensor/pipeline/data-parallel groups, the CPU bridge and the seeds."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from fpa_megatron.config import ParallelConfig
from fpa_megatron.run_log import record_job_nodes
from fpa_megatron.parallel import cpu_bridge


def compute_device() -> torch.device:
    """Where this rank computes: its GPU with CUDA (set from LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DEFAULT_TIMEOUT_MINUTES = ParallelConfig.timeout_minutes


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Join the torchrun world (env://): NCCL with CUDA, gloo without; collectives give up after timeout_minutes."""
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    _record_job_nodes()


def _record_job_nodes() -> None:
    """Every rank's node (torchrun's GROUP_RANK) and host, once: a failure line then names the other nodes."""
    me = (int(os.environ.get("GROUP_RANK", "0")), socket.gethostname())
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, me)
    nodes: dict[int, tuple[str, list[int]]] = {}
    for rank, (node, host) in enumerate(everyone):
        nodes.setdefault(node, (host, []))[1].append(rank)
    record_job_nodes(me[0], nodes)


def init_model_parallel(tensor: int, pipeline: int, seed: int,
                        timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, *, context: int = 1,
                        virtual_pipeline: int = 1) -> None:
    """Megatron's groups (TP innermost, then CP, DP, PP) and the per-TP-rank seeds.

    The same `seed` on every rank: weights drawn in full then split (use_cpu_initialization) are then
    identical for every layout; dropout inside tensor-parallel regions forks a per-TP-rank stream. Every
    group gets the same collective timeout as the default group (parallel.timeout_minutes).
    """
    cpu_bridge.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        context_parallel_size=context,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


class MegatronMPU:
    """What `deepspeed.initialize(mpu=...)` asks of a model-parallel unit, answered by Megatron's groups.

    DeepSpeed names checkpoint files by the model-parallel rank, so that rank is unique across TP x PP. Its
    data-parallel group is Megatron's data-parallel-with-context group (DP x CP): the CP ranks of one replica
    hold the same weights and partial gradients of the same sequences, so DeepSpeed averages gradients and
    partitions ZeRO states over DP x CP (the loss and penalty are scaled by C to make that average a sum).
    """

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(parallel_state.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size(parallel_state.get_model_parallel_group())

    def get_model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def get_tensor_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()
