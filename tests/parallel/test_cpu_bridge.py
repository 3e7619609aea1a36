"""The CPU bridge: each CUDA-only spot it covers is still where megatron-core has it, and each is bridged.

If a Megatron upgrade moves one of these spots, the first test fails and names it: re-check
fpa_megatron/parallel/cpu_bridge.py against the new release before trusting CPU runs.
"""

import inspect

import pytest
import torch

import megatron.core
import megatron.core.models.common.embeddings.rope_utils as rope_utils
import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary
import megatron.core.pipeline_parallel.p2p_communication as p2p
import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.tensor_parallel.random as tp_random
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.utils import GlobalMemoryBuffer

from fpa_megatron.parallel import cpu_bridge

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is inactive with CUDA")

SPOTS = [
    (schedules, 'device="cuda"', "schedules allocate total_num_tokens on cuda"),
    (p2p, "torch.cuda.current_device()", "p2p receive buffers"),
    (p2p, "torch.cuda.synchronize()", "p2p synchronize"),
    (GlobalMemoryBuffer.get_tensor, "torch.cuda.current_device()", "attention score buffer"),
    (LanguageModule.setup_embeddings_and_output_layer, ".cuda()", "tied embeddings moved to cuda"),
    (tp_random.CudaRNGStatesTracker.add, "torch.cuda.get_rng_state()", "RNG tracker keeps CUDA states"),
    (tp_random._get_all_rng_states, "_get_cuda_rng_state(", "recompute saves the CUDA RNG state"),
    (tp_random._set_all_rng_states, "_set_cuda_rng_state(", "recompute restores the CUDA RNG state"),
    (rope_utils.get_pos_emb_on_this_cp_rank, "pin_memory=True", "RoPE CP slice pins its index"),
    (rotary.RotaryEmbedding.forward, "get_pos_emb_on_this_cp_rank(emb, 0, cp_group)", "RoPE slices per CP rank"),
]


@pytest.mark.parametrize("obj,needle,what", SPOTS, ids=[s[2] for s in SPOTS])
def test_bridged_spot_is_still_in_megatron(obj, needle, what):
    source = inspect.getsource(obj)
    assert needle in source, (
        f"megatron-core {megatron.core.__version__}: '{needle}' ({what}) is no longer in "
        f"{getattr(obj, '__qualname__', obj.__name__)}; re-check fpa_megatron/parallel/cpu_bridge.py"
    )
    assert hasattr(tp_random, "_CUDA_RNG_STATE_TRACKER") and hasattr(tp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")


def test_install_bridges_each_spot_and_uninstall_restores():
    cpu_bridge.uninstall()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # what Megatron would hit without the bridge
    original_schedules_torch = schedules.torch
    try:
        assert cpu_bridge.install() and cpu_bridge.is_active()
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()  # no-op
        assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert schedules.torch.float32 is torch.float32  # everything else is torch itself
        buffer = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
        assert buffer.shape == (2, 3) and buffer.device.type == "cpu"
        t = torch.ones(2)
        assert t.cuda() is t
        torch.manual_seed(3)
        saved = tp_random._get_cuda_rng_state()
        first = torch.rand(3)
        tp_random._set_cuda_rng_state(saved)
        assert torch.equal(torch.rand(3), first)
    finally:
        cpu_bridge.uninstall()
    assert schedules.torch is original_schedules_torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()
    cpu_bridge.install()


def test_cpu_rng_tracker_forks_reproducible_streams():
    cpu_bridge.install()
    tracker = tp_random.get_cuda_rng_tracker()
    assert type(tracker).__name__ == "CpuRNGStatesTracker"
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream did not move
    with tracker.fork():
        b = torch.rand(4)
    torch.manual_seed(1234)
    expected = torch.rand(8)
    assert torch.equal(torch.cat([a, b]), expected)  # one continuing stream seeded 1234


def rope_slice_rank():
    """Megatron's CP slice of the rotary table fails on CPU without the bridge; with it, rank r gets the rows of
    chunks r and 2C-1-r (a table whose rows are their own positions, compared with cp_chunk_bounds)."""
    from fpa_megatron.parallel.context import cp_chunk_bounds

    group = torch.distributed.group.WORLD
    table = torch.arange(16.0).reshape(16, 1, 1, 1)
    cpu_bridge.uninstall()
    try:
        rotary.get_pos_emb_on_this_cp_rank(table, 0, group)
        unbridged = None
    except (AssertionError, RuntimeError) as err:
        unbridged = str(err)
    finally:
        cpu_bridge.install()
    (a0, a1), (b0, b1) = cp_chunk_bounds(16, group.size(), group.rank())
    got = rotary.get_pos_emb_on_this_cp_rank(table, 0, group).flatten().tolist()
    return unbridged, got, list(range(a0, a1)) + list(range(b0, b1))


def test_rope_slice_per_context_parallel_rank():
    from fpa_megatron.testing import run_distributed

    for rank, (unbridged, got, expected) in enumerate(run_distributed(rope_slice_rank, 2)):
        assert unbridged is not None  # what Megatron does on CPU without the bridge
        assert got == expected and len(got) == 8, rank
    assert expected == [4, 5, 6, 7, 8, 9, 10, 11]  # rank 1 of CP 2: chunks 1 and 2
