"""Per-GPU memory of one training step for a layout, from the config alone (docs/planner.md derives each term).

The activation terms follow what THIS model saves for backward: Megatron-core's GPT layer with the local spec
(torch norms, ColumnParallel/RowParallel linears with the bias added separately, RoPE unfused), the FPA core
attention of `model.attention_impl`, and Megatron's vocab-parallel cross entropy (fp32 softmax). The peak is
taken over the phases of a step where it can occur: the loss (all layers' activations + the logits), the MLP
backward and the attention backward of the top layer. tests/planner/test_memory_model.py checks the result
against the live tensor bytes of real steps on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fpa_megatron.attention.choice import attention_path
from fpa_megatron.config import RunConfig
from fpa_megatron.model.param_count import uses_linear_bias

BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
GIB = 1024**3
# What the allocator and the rest of the process hold beyond the tensors (documented in docs/planner.md):
# fragmentation of the caching allocator, and a fixed reserve for the CUDA context, NCCL buffers, workspaces.
ALLOCATOR_FRACTION = 0.10
FIXED_RESERVE_BYTES = int(1.5 * GIB)
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class Layout:
    """One way to run the config on `gpus` GPUs (what the planner enumerates)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    context: int = 1
    data: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1
    recompute: str = "none"
    micro_batch_size: int = 1
    num_microbatches: int = 1

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    def overrides(self) -> list[str]:
        """The `key=value` overrides that give a config this layout."""
        return [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}",
                f"parallel.virtual_pipeline={self.virtual_pipeline}", f"parallel.context={self.context}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"optimizer.zero_stage={self.zero_stage}", f"model.recompute={self.recompute}",
                f"train.micro_batch_size={self.micro_batch_size}"]

    def name(self) -> str:
        parts = [f"TP{self.tensor}", f"PP{self.pipeline}"]
        if self.virtual_pipeline > 1:
            parts.append(f"VP{self.virtual_pipeline}")
        if self.context > 1:
            parts.append(f"CP{self.context}")
        parts.append(f"DP{self.data}")
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts) + f" ZeRO-{self.zero_stage} {self.recompute} mbs{self.micro_batch_size}"


# ------------------------------------------------------------------------------------------ parameters


def stage_parameters(cfg: RunConfig, layout: Layout, padded_vocab: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage `stage` (its TP shard; replicated norms/row biases whole)."""
    m = cfg.model
    t = layout.tensor
    h, heads = m.hidden_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    d = h // heads
    ffn = m.ffn_hidden_size or 4 * h
    bias = uses_linear_bias(m)
    norm = 2 * h if m.normalization == "LayerNorm" else h
    qkv_out = d * (heads + 2 * groups)
    fc1_out = 2 * ffn if m.activation == "swiglu" else ffn
    sharded = h * qkv_out + heads * d * h + h * fc1_out + ffn * h  # column and row parallel weights
    sharded += (qkv_out + fc1_out) if bias else 0  # column-parallel biases are split too
    replicated = 2 * norm + (2 * h if bias else 0)  # the two norms; row-parallel biases (proj, fc2)
    if m.qk_layernorm:
        replicated += 2 * (2 * d if m.normalization == "LayerNorm" else d)
    per_layer = sharded // t + replicated
    params = (m.num_layers // layout.pipeline) * per_layer
    first, last = stage == 0, stage == layout.pipeline - 1
    if first:
        params += padded_vocab * h // t
        if m.position_embedding == "learned":
            params += (m.max_position_embeddings or m.seq_length) * h
    if last:
        params += norm
        if not m.tie_embeddings or not first:  # untied output layer, or the last stage's copy of the tied one
            params += padded_vocab * h // t
    return params


# ------------------------------------------------------------------------------------------ activations


@dataclass
class LayerActivations:
    """Bytes one micro-batch leaves saved in one layer, split where the backward frees them, and the extra
    working memory of that layer's backward phases (all per rank)."""

    attention_half: int  # norm input/output, QKV, RoPE'd q/k, the attention's saved output and row stats/probs
    attention_internal: int  # the part of attention_half the core attention saves itself (selective recompute drops it)
    mlp_half: int  # output projection input, pre-MLP norm input/output, fc1 output/activation
    layer_input: int  # what full recompute keeps per layer
    mlp_backward_extra: int
    attention_backward_extra: int

    @property
    def saved(self) -> int:
        return self.attention_half + self.mlp_half


def layer_activations(cfg: RunConfig, layout: Layout, device: str = "cuda") -> LayerActivations:
    m = cfg.model
    e = BYTES[m.dtype]
    t, cp = layout.tensor, layout.context
    r = t if layout.sequence_parallel else 1  # the norm regions are split over TP only with SP
    s, b, h = m.seq_length // cp, layout.micro_batch_size, m.hidden_size
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    d = h // heads
    ffn = m.ffn_hidden_size or 4 * h
    kv = 2 * groups * d
    sb = s * b
    impl = attention_kernel(cfg, device)
    documents = cfg.data.document_mask is True
    norm_stats = (2 if m.normalization == "LayerNorm" else 1) * sb // r * FP32  # mean/rstd of one norm

    # attention half: input norm (input + stats), its output (QKV input), the QKV output buffer (v stays a view
    # of it), RoPE's new q and k (without RoPE, the reshape copy of q), the core attention's saved tensors.
    qkv_in = 2 * sb * h // r * e + norm_stats
    qkv_out = sb * (h + kv) // t * e
    new_qk = sb * (h + (kv // 2 if m.position_embedding == "rope" else 0)) // t * e
    local_heads = heads // t
    if impl == "eager":
        # probabilities (fp32; a copy in the model dtype feeds P V when that is bf16), the causal mask (bool)
        internal = local_heads * b * s * s * (FP32 + (e if e != FP32 else 0)) + s * s
        if documents:  # the document mask of each sample: this rank's rows against every key (bool)
            internal += b * s * s * cp
    else:
        stats = 2 if impl in ("blockwise", "triton") else 1  # LSE and the collision sums; SDPA: LSE only
        internal = sb * h // t * e + stats * local_heads * sb * FP32  # output + per-row stats
    attention_half = qkv_in + qkv_out + new_qk + internal
    # MLP half: the projection's input, pre-MLP norm input + output, fc1's activation input and output
    act = 4 * ffn if m.activation == "swiglu" else 2 * ffn  # SwiGLU: fc1 (2f) + silu out + product
    mlp_half = sb * h // t * e + 2 * sb * h // r * e + norm_stats + sb * act // t * e
    if m.hidden_dropout > 0:  # two bool masks in the norm regions
        mlp_half += 2 * sb * h // r
    layer_input = sb * h // r * e

    residual_grad = sb * h // r * e
    mlp_backward_extra = residual_grad + sb * ffn // t * e  # the grad of fc2's input next to its saved tensors
    if impl == "eager":
        # the gradient of the probabilities and the softmax backward's output, both [b, heads, s, s] fp32
        attention_backward_extra = residual_grad + 2 * local_heads * b * s * s * FP32
    else:
        # dO, D and fp32 copies of q, k, v, dO and dq, dk, dv, and the tiles (blockwise: fp32 temporaries in
        # memory; Triton keeps them on chip)
        copies = 2 * sb * h // t * FP32 + 2 * sb * h // t * FP32 + 2 * sb * kv // t * FP32
        tiles = 0
        if impl == "blockwise":
            block, key_block = m.attention_block_size, max(2048 // m.attention_block_size, 1) * m.attention_block_size
            # with documents one sample at a time (each has its own tiles), plus a boundary tile's mask and bias
            samples = 1 if documents else b
            tiles = 2 * samples * local_heads * block * min(s, key_block) * FP32
            if documents:
                tiles += block * (heads // groups) * min(s, key_block) * (1 + FP32)
        attention_backward_extra = residual_grad + sb * h // t * e + copies + tiles
    if cp > 1:  # the context-parallel exchange: the gathered K/V of the whole sequence and its dK/dV buffer
        attention_backward_extra += cp * sb * kv // t * (e + FP32)
    return LayerActivations(attention_half, internal, mlp_half, layer_input, mlp_backward_extra,
                            attention_backward_extra)


def attention_kernel(cfg: RunConfig, device: str = "cuda") -> str:
    """The kernel a training step runs while the penalty is on (`attention_path`); SDPA when FPA is off (unless
    documents are masked: then the kernel that skips their tiles)."""
    return attention_path(cfg.model.attention_impl, cfg.fpa.enabled, device, has_mask=False,
                          has_documents=cfg.data.document_mask is True)


def inflight_microbatches(layout: Layout, stage: int) -> float:
    """Micro-batches whose activations a stage holds at once: 1F1B keeps p - stage on stage `stage` (at most m);
    the interleaved schedule keeps Megatron's factor 1 + (p-1)/(p v) more on the first stage."""
    p, m, v = layout.pipeline, layout.num_microbatches, layout.virtual_pipeline
    if p == 1:
        return 1.0
    if v > 1:
        return (p - stage) * (1 + (p - 1) / (p * v)) if stage == 0 else float(min(p - stage, m))
    return float(min(p - stage, m))


def head_bytes(cfg: RunConfig, layout: Layout, padded_vocab: int) -> dict:
    """The last stage's final norm and the logits: output layer result, its fp32 copy, the saved fp32 softmax."""
    m = cfg.model
    e = BYTES[m.dtype]
    t, r = layout.tensor, (layout.tensor if layout.sequence_parallel else 1)
    sb = m.seq_length // layout.context * layout.micro_batch_size
    final_norm = 2 * sb * m.hidden_size // r * e
    logits = sb * padded_vocab // t * FP32
    # in bf16 the logits exist in bf16 next to their fp32 copy, and their gradient is cast back in backward
    transient = sb * padded_vocab // t * e * (1 if e != FP32 else 0) + sb * m.hidden_size * e
    return {"final_norm": final_norm, "logits": logits, "logits_transient": transient}


def activation_peak(cfg: RunConfig, layout: Layout, padded_vocab: int, stage: int, device: str = "cuda") -> dict:
    """Peak activation bytes of a stage: max over the loss, MLP-backward and attention-backward phases."""
    m = cfg.model
    la = layer_activations(cfg, layout, device)
    layers = m.num_layers // layout.pipeline
    inflight = inflight_microbatches(layout, stage)
    top_saved = la.saved
    if layout.recompute == "full":  # layer inputs only; the top layer is recomputed whole in its backward
        stored = layers * inflight * la.layer_input
        top = la.saved
    elif layout.recompute == "selective":  # the core attention's own tensors are recomputed in backward
        stored = layers * inflight * (la.saved - la.attention_internal)
        top = 0
        top_saved = la.saved - la.attention_internal
    else:
        stored = layers * inflight * la.saved
        top = 0
    phases = {
        "mlp_backward": stored + top + la.mlp_backward_extra,
        "attention_backward": stored + top - la.mlp_half + la.attention_backward_extra
        + (la.attention_internal if layout.recompute == "selective" else 0),
    }
    head = head_bytes(cfg, layout, padded_vocab)
    if stage == layout.pipeline - 1:
        phases["loss"] = stored + head["final_norm"] + head["logits"] + head["logits_transient"]
    phase = max(phases, key=phases.get)
    return {"per_layer_saved": top_saved, "layers": layers, "inflight_microbatches": inflight,
            "stored": stored, "phase": phase, "peak": phases[phase], "phases": phases}


# ------------------------------------------------------------------------------------------ the whole step


def reduce_bucket_elements(parameters: int) -> int:
    """The gradient reduce bucket the trainer gives DeepSpeed for a rank's `parameters`: all of them, at most
    DeepSpeed's default (which it would allocate whole at the first step, 2 GB in fp32 whatever the model)."""
    return max(1, min(parameters, REDUCE_BUCKET_ELEMENTS))


def optimizer_bytes(params: int, layout: Layout, dtype: str) -> dict:
    """DeepSpeed ZeRO-1/2 over the data-parallel group (and CP ranks, which hold the same weights):
    fp32 master partition, Adam's two fp32 moments, the fp32 gradient partition; the gradients and the reduce
    bucket DeepSpeed allocates at the first step (fp32 under ZeRO-1; ZeRO-2 partitions the model-dtype
    gradients and keeps its bucket in the model dtype)."""
    e = BYTES[dtype]
    dp = layout.data * layout.context
    part = -(-params // dp)
    bucket = reduce_bucket_elements(params)
    grads = params * e + bucket * FP32 if layout.zero_stage == 1 else part * e + bucket * e
    return {"gradients": grads, "master_fp32": part * FP32, "adam_moments": 2 * part * FP32,
            "fp32_gradient_partition": part * FP32}


def checkpoint_staging_bytes(cfg: RunConfig, terms: dict) -> int:
    """Host memory (not GPU) of one rank under checkpoint.async_save: the copy of what it writes, staged at the
    save step and reused by every save (one in flight at most): the model weights (on the first data-parallel
    rank, the one that writes them), its fp32 master partition and Adam's two moments. 0 for synchronous saves."""
    return terms["weights"] + terms["master_fp32"] + terms["adam_moments"] if cfg.checkpoint.async_save else 0


def step_memory(cfg: RunConfig, layout: Layout, padded_vocab: int, device: str = "cuda") -> dict:
    """Every term of the per-GPU memory (bytes) on the stage that needs the most, and the total with margin."""
    e = BYTES[cfg.model.dtype]
    stages = sorted({0, layout.pipeline - 1})
    best = None
    for stage in stages:
        params = stage_parameters(cfg, layout, padded_vocab, stage)
        act = activation_peak(cfg, layout, padded_vocab, stage, device)
        terms = {"weights": params * e, **optimizer_bytes(params, layout, cfg.model.dtype),
                 "activations": act["peak"]}
        tensors = sum(terms.values())
        margin = int(ALLOCATOR_FRACTION * tensors) + FIXED_RESERVE_BYTES
        row = {"stage": stage, "parameters": params, **terms, "tensors": tensors, "margin": margin,
               "total": tensors + margin, "activation_detail": act,
               "host_checkpoint_staging": checkpoint_staging_bytes(cfg, terms)}
        if best is None or row["total"] > best["total"]:
            best = row
    return best


def layout_dict(layout: Layout) -> dict:
    return asdict(layout)
