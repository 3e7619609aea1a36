"""The one bridge where Megatron-core assumes CUDA: lets GPTModel and its pipeline schedules run on CPU/gloo.

Active only when CUDA is absent (`install()` is a no-op otherwise). It bridges exactly these spots of
megatron-core 0.16.x (tests/parallel/test_cpu_bridge.py checks that they are still where we expect):

1. `torch.cuda.current_device()`: used for the p2p receive buffers (pipeline_parallel/p2p_communication.py)
   and the attention score buffer (`parallel_state.get_global_memory_buffer()`). Without CUDA it returns
   the CPU device instead of raising.
2. `torch.cuda.synchronize()`: called after batched p2p; a no-op on CPU.
3. `pipeline_parallel/schedules.py` allocates `total_num_tokens` with `device="cuda"`: its module-level
   `torch` is swapped for a thin proxy whose factory functions map "cuda" to "cpu".
4. `LanguageModule.setup_embeddings_and_output_layer` moves the tied word embeddings with `.cuda()` before
   summing them between the first and last pipeline stage: `Tensor.cuda()` returns the tensor itself.
5. The tensor-parallel RNG tracker keeps CUDA generator states; `CpuRNGStatesTracker` keeps CPU ones
   (forking it swaps `torch.get_rng_state()`), so dropout under tensor parallelism stays reproducible.
6. Activation recomputation (`tensor_parallel.checkpoint`) saves and restores the CUDA RNG state through
   `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`: they read and write the CPU state
   (which it also saves on its own, so both copies agree).
7. Rotary embeddings under context parallelism: `RotaryEmbedding.forward` slices the positions of this CP rank
   with `get_pos_emb_on_this_cp_rank`, whose index tensor is made in pinned memory and moved with `.cuda()`;
   the name it calls in `rotary_pos_embedding` is bound to `_pos_emb_on_this_cp_rank` (same slicing, no pinning).

No Megatron class is modified; everything is module-level and reversible (`uninstall()`).
"""

from __future__ import annotations

import contextlib
import types

import torch

_CPU = torch.device("cpu")
_installed: dict = {}


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return _CPU
    return device


class _TorchWithCudaOnCpu(types.ModuleType):
    """Stands in for `torch` inside one Megatron module: factory calls with device="cuda" land on CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_to_cpu(device), **kwargs)

    @staticmethod
    def empty(*args, device=None, **kwargs):
        return torch.empty(*args, device=_to_cpu(device), **kwargs)

    @staticmethod
    def ones(*args, device=None, **kwargs):
        return torch.ones(*args, device=_to_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_to_cpu(device), **kwargs)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's named RNG states, kept as CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim: int, cp_group):
    """Megatron's `get_pos_emb_on_this_cp_rank` without pinned memory: the rows of chunks r and 2C-1-r."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def is_active() -> bool:
    return bool(_installed)


def install() -> bool:
    """Bridge the CUDA-only spots if CUDA is absent. Idempotent. Returns whether the bridge is active."""
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as tp_random

    _installed["current_device"] = torch.cuda.current_device
    _installed["synchronize"] = torch.cuda.synchronize
    _installed["schedules_torch"] = schedules.torch
    _installed["tensor_cuda"] = torch.Tensor.cuda
    _installed["rng_state_fns"] = (tp_random._get_cuda_rng_state, tp_random._set_cuda_rng_state)
    _installed["tracker"] = (tp_random._CUDA_RNG_STATE_TRACKER, tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    _installed["rotary_cp_slice"] = rotary.get_pos_emb_on_this_cp_rank

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    schedules.torch = _TorchWithCudaOnCpu()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tp_random._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_class()()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    rotary.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    return True


def uninstall() -> None:
    """Undo `install()` (tests use it to show what breaks without the bridge)."""
    if not _installed:
        return
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as tp_random

    torch.cuda.current_device = _installed["current_device"]
    torch.cuda.synchronize = _installed["synchronize"]
    schedules.torch = _installed["schedules_torch"]
    torch.Tensor.cuda = _installed["tensor_cuda"]
    tp_random._get_cuda_rng_state, tp_random._set_cuda_rng_state = _installed["rng_state_fns"]
    tp_random._CUDA_RNG_STATE_TRACKER, tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = _installed["tracker"]
    rotary.get_pos_emb_on_this_cp_rank = _installed["rotary_cp_slice"]
    _installed.clear()
