"""Map parameters between this rank's shard and the global (single-process) model.

Global names are those of a TP=1, PP=1 GPTModel. Locally, layer i of pipeline stage p is global layer
i + offset(p) (with a virtual pipeline, of model chunk c of stage p: i + offset(p, c), and the chunk's names
carry "c." in front); tensor-parallel parameters (`tensor_model_parallel` attribute) are split along their
`partition_dim` into contiguous chunks, except SwiGLU's fc1, whose local shard is [gate_r; up_r].
Used to load the same weights into every layout and to gather gradients for comparison or export.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(local_name: str, layer_offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name)


def layer_index(global_param_name: str) -> int | None:
    """The transformer layer a parameter belongs to, or None (embeddings, final norm, output layer)."""
    match = _LAYER.match(global_param_name)
    return int(match.group(1)) if match else None


def _parallel_state():
    """megatron.core.parallel_state, imported on first use: the name and shard functions work offline, and
    reading or exporting a checkpoint does not pay for importing megatron.core."""
    from megatron.core import parallel_state

    return parallel_state


def _layer_offset(model) -> int:
    """Megatron's own offset of one GPTModel chunk (its pipeline stage and virtual stage)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config, vp_stage=getattr(model, "vp_stage", None))


def _chunks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, GPTModel) per model chunk of this rank: a ModuleList of chunks (the interleaved pipeline)
    names its parameters "<chunk>.<name>"."""
    if isinstance(model, torch.nn.ModuleList):
        return [(f"{i}.", chunk) for i, chunk in enumerate(model)]
    return [("", model)]


def uniform_layer_offset(num_layers: int, pipeline: int, virtual: int, pp_rank: int, chunk: int) -> int:
    """The first global layer of model chunk `chunk` of stage `pp_rank` when Megatron splits the layers evenly:
    chunk c of stage p holds layers c * L/V + p * L/(P V) + [0, L/(P V)). For files read without Megatron."""
    return chunk * (num_layers // virtual) + pp_rank * (num_layers // (pipeline * virtual))


def layer_placement(layer: int, num_layers: int, pipeline: int, virtual: int) -> tuple[int, int, int]:
    """(pipeline stage, model chunk, local index) of global layer `layer` (inverse of `uniform_layer_offset`)."""
    per_chunk = num_layers // (pipeline * virtual)
    chunk, rest = divmod(layer, num_layers // virtual)
    stage, local = divmod(rest, per_chunk)
    return stage, chunk, local


_CHUNK = re.compile(r"^(\d+)\.")


def stage_global_name(local_name: str, num_layers: int, pipeline: int, virtual: int, pp_rank: int) -> str:
    """A parameter name in stage `pp_rank`'s model file ("1.decoder.layers.0...." with V > 1 chunks) -> global."""
    chunk = 0
    if virtual > 1:
        match = _CHUNK.match(local_name)
        if match is None:
            raise ValueError(f"parameter {local_name!r}: expected a model-chunk prefix '<chunk>.' (virtual pipeline "
                             f"of size {virtual})")
        chunk, local_name = int(match.group(1)), local_name[match.end():]
    return global_name(local_name, uniform_layer_offset(num_layers, pipeline, virtual, pp_rank, chunk))


# How tensor parallelism splits each parameter of Megatron's local-spec GPT, by global-name suffix: the
# dimension the shards are cut along. A name table (not Megatron's own `partition_dim` attributes) so that
# checkpoints can be read offline: building a Megatron model needs process groups. A test checks the table
# against the live model's attributes.
TP_SPLIT_DIMS = (
    ("embedding.word_embeddings.weight", 0),  # vocab-parallel
    ("output_layer.weight", 0),  # column-parallel
    ("self_attention.linear_qkv.weight", 0),
    ("self_attention.linear_qkv.bias", 0),
    ("mlp.linear_fc1.weight", 0),
    ("mlp.linear_fc1.bias", 0),
    ("self_attention.linear_proj.weight", 1),  # row-parallel (its bias is replicated)
    ("mlp.linear_fc2.weight", 1),
)
# The same full tensor on every tensor-parallel rank: norms, learned positions, row-parallel biases.
_REPLICATED = re.compile(r"(layernorm\.(weight|bias)|position_embeddings\.weight|linear_proj\.bias|linear_fc2\.bias)$")


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits parameter `name` along, or None if it is replicated."""
    for suffix, dim in TP_SPLIT_DIMS:
        if name.endswith(suffix):
            return dim
    if _REPLICATED.search(name):
        return None
    raise ValueError(f"parameter {name!r}: unknown tensor-parallel layout (add it to TP_SPLIT_DIMS or "
                     f"_REPLICATED in fpa_megatron/parallel/weights.py)")


def is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    """SwiGLU's fc1 holds [gate; up]: each TP shard is [gate_r; up_r], not a plain chunk."""
    return gated_linear_unit and "mlp.linear_fc1" in name


def split_shard(full: torch.Tensor, dim: int, tp: int, rank: int, gated: bool = False) -> torch.Tensor:
    """TP rank `rank`'s piece of `full` (of `tp` pieces along `dim`)."""
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def join_shards(pieces: list[torch.Tensor], dim: int, gated: bool = False) -> torch.Tensor:
    """The full tensor from the TP ranks' pieces, in rank order (inverse of `split_shard`)."""
    if gated:
        halves = [p.chunk(2, dim=dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(pieces, dim=dim)


def _split(name: str, param, full: torch.Tensor, model) -> torch.Tensor:
    """This TP rank's piece of the full tensor `full` for local parameter `param`."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return split_shard(full, param.partition_dim, _parallel_state().get_tensor_model_parallel_world_size(),
                       _parallel_state().get_tensor_model_parallel_rank(),
                       is_gated_fc1(name, model.config.gated_linear_unit))


def _join(name: str, param, pieces: list[torch.Tensor], model) -> torch.Tensor:
    """The full tensor from the TP ranks' pieces (inverse of `_split`)."""
    if not getattr(param, "tensor_model_parallel", False):
        return pieces[0]
    return join_shards(pieces, param.partition_dim, is_gated_fc1(name, model.config.gated_linear_unit))


def _global_source(name: str, global_state: dict) -> str:
    # With tied embeddings and PP > 1, the last stage keeps its own copy of the word embeddings.
    if name == "output_layer.weight" and name not in global_state:
        return "embedding.word_embeddings.weight"
    return name


def _local_parameters(model) -> dict[str, tuple[torch.nn.Module, str, torch.nn.Parameter, str]]:
    """{local name: (its GPTModel chunk, its name in the chunk, the parameter, its global name)}."""
    out = {}
    for prefix, chunk in _chunks(model):
        offset = _layer_offset(chunk)
        for name, param in chunk.named_parameters():
            out[prefix + name] = (chunk, name, param, global_name(name, offset))
    return out


@torch.no_grad()
def load_global_state(model, global_state: dict) -> None:
    """Copy the matching piece of each global tensor into this rank's parameters (every model chunk)."""
    for chunk, name, param, gname in _local_parameters(model).values():
        full = global_state[_global_source(gname, global_state)]
        param.copy_(_split(name, param, full, chunk))


def gather_global(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{local name: tensor shaped like the local parameter} -> {global name: full tensor}, on every rank.

    The last stage's tied output weight is left out (its gradient equals the embedding's after
    `finalize_grads`).
    """
    params = _local_parameters(model)
    tp_group = _parallel_state().get_tensor_model_parallel_group()
    tp = _parallel_state().get_tensor_model_parallel_world_size()
    local_full = {}
    for local, tensor in tensors.items():
        chunk, name, param, gname = params[local]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            pieces = [torch.empty_like(tensor) for _ in range(tp)]
            torch.distributed.all_gather(pieces, tensor.contiguous(), group=tp_group)
            full = _join(name, param, pieces, chunk)
        else:
            full = tensor
        if gname == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            continue
        local_full[gname] = full.detach().clone()
    # Every pipeline stage contributes its layers.
    gathered: list = [None] * _parallel_state().get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(
        gathered, local_full, group=_parallel_state().get_pipeline_model_parallel_group()
    )
    merged: dict = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def _draw(global_param_name: str, shape: torch.Size, seed: int, init_std: float, num_layers: int) -> torch.Tensor:
    """The full tensor of one parameter, from a generator keyed by (seed, global name): layout independent.

    Same distributions as Megatron's defaults: normal(0, std) for weights and embeddings, normal(0,
    std / sqrt(2 L)) for the output projections of attention and MLP, zeros for biases, ones for norm weights.
    """
    name = global_param_name
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "layernorm" in name or "norm.weight" in name:
        return torch.ones(shape)
    key = zlib.crc32(name.encode())
    gen = torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63 - 1))
    std = init_std
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = init_std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _global_shape(param) -> torch.Size:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _parallel_state().get_tensor_model_parallel_world_size()
    return torch.Size(shape)


@torch.no_grad()
def init_global_weights(model, seed: int, init_std: float) -> None:
    """Initialize every parameter from its global name, so any (TP, PP, VP) layout starts from the same model."""
    for chunk, name, param, gname in _local_parameters(model).values():
        if gname == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            gname = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embeddings
        full = _draw(gname, _global_shape(param), seed, init_std, chunk.config.num_layers)
        param.copy_(_split(name, param, full, chunk).to(param.dtype))
