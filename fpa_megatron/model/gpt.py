"""Megatron-core GPTModel with the FPA core attention substituted in the local (non-TransformerEngine) spec."""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from fpa_megatron.config import ModelConfig
from fpa_megatron.model.penalized_attention import AttentionPenalty, PenalizedDotProductAttention
from fpa_megatron.model.sp_norm import SequenceParallelNorm
from fpa_megatron.parallel.state import compute_device
from fpa_megatron.parallel.weights import init_global_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
# model.activation -> the MLP's activation (SwiGLU: silu on the gate half of fc1)
ACTIVATION_FUNCS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "swiglu": F.silu}


def penalized_layer_spec(model_cfg: ModelConfig, penalty: AttentionPenalty) -> ModuleSpec:
    """The local GPT layer spec with `core_attention` replaced by the penalized attention (no patching) and
    our norms (torch's, usable with sequence parallelism); with `qk_layernorm`, per-head query and key norms."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=model_cfg.normalization,
                                                  qk_layernorm=model_cfg.qk_layernorm))
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=PenalizedDotProductAttention, params={"penalty": penalty})
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelNorm
    if model_cfg.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = ModuleSpec(module=SequenceParallelNorm,
                                                                   params={"for_qk": True})
    return spec


def decoder_block_spec(layer_spec: ModuleSpec, config: TransformerConfig,
                       vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This stage's layers and the final norm: Megatron's default final norm refuses sequence parallelism."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelNorm)


def transformer_config(model_cfg: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       ffn_hidden_size: int | None = None, virtual_pipeline: int = 1,
                       context_parallel: int = 1, sequence_parallel: bool = False) -> TransformerConfig:
    """Megatron's TransformerConfig for our model options; fused CUDA kernels off so CPU and GPU agree.

    `sequence_parallel`: Megatron's SP inside the TP group (the embedding output is scattered over the
    sequence, the output layer gathers it back; attention sees the whole sequence)."""
    dtype = DTYPES[model_cfg.dtype]
    interleaved = virtual_pipeline > 1
    swiglu = model_cfg.activation == "swiglu"
    recompute = {"none": None, "selective": "selective", "full": "full"}[model_cfg.recompute]
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=ffn_hidden_size or model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_std,
        normalization=model_cfg.normalization,
        activation_func=ACTIVATION_FUNCS[model_cfg.activation],
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=swiglu,
        add_bias_linear=not swiglu,
        tensor_model_parallel_size=tensor_parallel,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if interleaved else None,
        # The interleaved schedule with batched p2p is refused for PP = 2 by Megatron-LM (both neighbours are
        # the same rank); its overlapped p2p (separate isend/irecv) works for every PP size.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        context_parallel_size=context_parallel,  # RoPE builds C x s_local positions, keeps this rank's chunks
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=True,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        cuda_graph_scope=[],  # the whole layer (no CUDA graphs are used); Megatron's default "full" is deprecated
    )


class VocabParallelLogZ(torch.autograd.Function):
    """log Z = log sum_v exp(logit_v) over the whole vocabulary when each tensor-parallel rank holds a slice of it
    (the last dimension): the max and the sum of exponentials are all-reduced within the TP group, in float32 at
    least. Backward needs no communication: d log Z / d logit_v = softmax_v, this rank's slice of it, which
    forward keeps (float32, the size of the logits: Megatron's cross-entropy changes the logits in place)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        peak = logits.max(dim=-1).values.to(dtype)
        if tp > 1:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
        softmax = torch.exp(logits.to(dtype) - peak.unsqueeze(-1))
        sum_exp = softmax.sum(dim=-1)
        if tp > 1:
            torch.distributed.all_reduce(sum_exp, group=group)
        softmax /= sum_exp.unsqueeze(-1)
        ctx.input_dtype = logits.dtype
        ctx.save_for_backward(softmax)
        return peak + torch.log(sum_exp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        softmax, = ctx.saved_tensors
        return (grad.unsqueeze(-1) * softmax).to(ctx.input_dtype)


def vocab_parallel_log_z(logits: torch.Tensor) -> torch.Tensor:
    """log Z of the softmax over the last (vocabulary-parallel) dimension; see `VocabParallelLogZ`."""
    return VocabParallelLogZ.apply(logits)


class GPTModelOverVocabulary(GPTModel):
    """Megatron's GPTModel whose LM loss is a softmax over the real vocabulary only: the columns padded for tensor
    parallelism are -inf there (a padded row's logit, 0 for a zero row, could otherwise beat every real token and
    takes probability from all of them); they get no gradient. A subclass because the loss is a GPTModel method,
    not a module of the layer spec.

    With `z_loss` > 0 it also keeps (log Z)^2 per token of the last forward, [b, s] with its graph, for the loss
    function to take (`take_log_z_squared`): OLMo-core's and GPT-NeoX's z-loss, exact under TP.

    With `rotary_from_position_ids` (document masking: positions restart at each document) the rotary angles are
    those of each token's `position_ids` rather than of its index in the sequence; Megatron's RoPE takes only a
    length, so `_preprocess` swaps its table for the table's rows at the given positions."""

    def __init__(self, *args, real_vocab_size: int, z_loss: float = 0.0, rotary_from_position_ids: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.z_loss = z_loss
        self.rotary_from_position_ids = rotary_from_position_ids and self.position_embedding_type == "rope"
        self._log_z_squared = None

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if not self.rotary_from_position_ids or position_ids is None or out[1] is None:
            return out
        table = self.rotary_pos_emb.get_emb(self.max_sequence_length)  # [max_len, 1, 1, d]: the angles of 0, 1, ...
        at_positions = table[:, 0, 0][position_ids.transpose(0, 1)].unsqueeze(2)  # [s, b, 1, d]
        return (out[0], at_positions, *out[2:])

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        local = logits.shape[-1]  # this tensor-parallel rank's slice of the vocabulary
        start = parallel_state.get_tensor_model_parallel_rank() * local
        padded = torch.arange(start, start + local, device=logits.device) >= self.real_vocab_size
        if bool(padded.any()):
            logits = logits.masked_fill(padded, float("-inf"))
        if self.z_loss > 0:
            self._log_z_squared = vocab_parallel_log_z(logits).square().transpose(0, 1)  # [s, b] -> [b, s]
        return super().compute_language_model_loss(labels, logits)

    def take_log_z_squared(self) -> torch.Tensor | None:
        """(log Z)^2 per token [b, s] of the last forward (None without z-loss); handed over once."""
        value, self._log_z_squared = self._log_z_squared, None
        return value


class ModelChunks(torch.nn.ModuleList):
    """The V model chunks of this pipeline stage (interleaved schedule) as one module, so that one DeepSpeed
    engine holds them: one optimizer over all chunks, one model file per rank. `forward(..., chunk=i)`."""

    def forward(self, *args, chunk: int, **kwargs):
        return self[chunk](*args, **kwargs)

    @property
    def config(self) -> TransformerConfig:
        return self[0].config


def model_chunks(model) -> list[GPTModel]:
    """This rank's GPTModel chunks: [model] without the interleaved pipeline."""
    return list(model) if isinstance(model, ModelChunks) else [model]


def build_gpt_model(model_cfg: ModelConfig, padded_vocab_size: int, penalty: AttentionPenalty,
                    ffn_hidden_size: int | None = None, seed: int | None = None,
                    vocab_size: int | None = None, sequence_parallel: bool = False,
                    z_loss: float = 0.0, document_positions: bool = False) -> GPTModel | ModelChunks:
    """This rank's stage of the GPT (parallel_state must be initialized): a GPTModel, or with a virtual
    pipeline of size V, a `ModelChunks` of V GPTModels (chunk i built with vp_stage=i: Megatron's layer offsets).

    With `seed`, every parameter is drawn from its global name (`init_global_weights`), so every
    (TP, PP, VP) layout starts from the same model; without it, Megatron's own initialization is kept.
    `vocab_size` (the real vocabulary; default: all `padded_vocab_size` rows) is what the loss's softmax covers.
    `z_loss` (optimizer.z_loss): the last stage keeps (log Z)^2 per token for the loss (`GPTModelOverVocabulary`).
    `document_positions` (data.document_mask): RoPE reads the batch's position_ids (they restart at each document).
    """
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    config = transformer_config(
        model_cfg,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        ffn_hidden_size,
        virtual_pipeline=virtual,
        context_parallel=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
    )
    chunks = []
    for vp_stage in range(virtual):
        chunk_stage = vp_stage if virtual > 1 else None
        model = GPTModelOverVocabulary(
            real_vocab_size=vocab_size or padded_vocab_size,
            z_loss=z_loss,
            rotary_from_position_ids=document_positions,
            config=config,
            transformer_layer_spec=decoder_block_spec(penalized_layer_spec(model_cfg, penalty), config,
                                                      vp_stage=chunk_stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings or model_cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage() and vp_stage == 0,
            post_process=parallel_state.is_pipeline_last_stage() and vp_stage == virtual - 1,
            share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="rope" if model_cfg.position_embedding == "rope" else "learned_absolute",
            rotary_base=model_cfg.rotary_base,
            vp_stage=chunk_stage,
        )
        if seed is not None:
            init_global_weights(model, seed, model_cfg.init_std)
        # Megatron's local norms are created in float32; cast everything, as Megatron-LM's Float16Module does.
        chunks.append(model.to(device=compute_device(), dtype=config.params_dtype))
    return ModelChunks(chunks) if virtual > 1 else chunks[0]


def make_penalty(model_cfg: ModelConfig, fpa_cfg) -> AttentionPenalty:
    return AttentionPenalty(
        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_attention_heads, target=fpa_cfg.target,
        normalize=fpa_cfg.normalize, impl=model_cfg.attention_impl, block_size=model_cfg.attention_block_size,
    )
