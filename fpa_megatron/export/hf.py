"""Hugging Face `transformers` export: a checkpoint's model as the standard architecture that computes the same
function, and its tokenizer (sentencepiece, converted; or the run's tokenizer.json) as a `tokenizer.json`; both
load with no custom code.

Model families (the only combinations with a faithful standard target):
  learned positions + LayerNorm + GeLU            -> GPT-2 (activation_function "gelu" (erf) or "gelu_new" (tanh))
  rotary + LayerNorm + GeLU                       -> GPT-NeoX (sequential residual, rotary on every channel)
  rotary + RMSNorm + SwiGLU (grouped-query or not) -> LLaMA
Megatron's fused `linear_qkv` holds, per query group, that group's query heads, then its key head, then its
value head; SwiGLU's `linear_fc1` holds [gate; up]. The vocabulary padded for tensor parallelism is cut back to
the tokenizer's (or `model.vocab_size`). `transformers` is an optional extra, imported only here.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from data_prep.common import PrepError
from data_prep.tokenizer import load_tokenizer
from fpa_megatron.checkpoint.reader import ModelCheckpoint, ReadOnAccess, read_model_checkpoint
from fpa_megatron.config import ModelConfig

# (model.position_embedding, model.normalization, model.activation) -> the transformers architecture that
# computes the same function; only LLaMA has grouped-query attention.
FAMILY_TARGETS = {
    ("learned", "LayerNorm", "gelu"): "gpt2",
    ("learned", "LayerNorm", "gelu_tanh"): "gpt2",
    ("rope", "LayerNorm", "gelu"): "gpt_neox",
    ("rope", "LayerNorm", "gelu_tanh"): "gpt_neox",
    ("rope", "RMSNorm", "swiglu"): "llama",
}
TARGET_NAMES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "llama": "LLaMA"}
GROUPED_QUERY_TARGETS = ("llama",)
# model.activation -> transformers' name of the same function (ACT2FN): "gelu" is the exact erf GeLU,
# "gelu_new" GPT-2's tanh approximation (equal to torch's approximate="tanh" to 1e-15)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "swiglu": "silu"}
INSTALL_HINT = "pip install -e .[hf]  (or: pip install 'transformers>=5.24,<6')"


class ExportError(ValueError):
    """A model or tokenizer that cannot be exported faithfully; the message says which setting and why."""


def require_transformers():
    """`transformers`, or an ExportError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ExportError(f"this needs the optional dependency transformers: {INSTALL_HINT}") from None
    return transformers


def quiet_transformers() -> None:
    """No transformers progress bars for loading and saving weights (the commands print their own summary)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def hf_architecture(m: ModelConfig) -> str:
    """The standard architecture computing the same function as model config `m`, or ExportError naming why not."""
    if getattr(m, "qk_layernorm", False):
        raise ExportError("model.qk_layernorm=true: GPT-2, GPT-NeoX and LLaMA have no layer norm on queries and keys, "
                          "so no standard transformers architecture computes this model")
    combination = (f"model.position_embedding={m.position_embedding}, model.normalization={m.normalization}, "
                   f"model.activation={m.activation}")
    target = FAMILY_TARGETS.get((m.position_embedding, m.normalization, m.activation))
    if target is None:
        supported = ", ".join(f"{'+'.join(k)} -> {TARGET_NAMES[v]}" for k, v in FAMILY_TARGETS.items())
        raise ExportError(f"{combination}: no standard transformers architecture computes this combination "
                          f"(supported: {supported})")
    groups = m.num_query_groups or m.num_attention_heads
    if groups != m.num_attention_heads and target not in GROUPED_QUERY_TARGETS:
        raise ExportError(f"model.num_query_groups={groups} (grouped-query attention) with {combination}: "
                          f"{TARGET_NAMES[target]} has no grouped-query attention; only the LLaMA family "
                          f"(rope+RMSNorm+swiglu) exports with it")
    return target


# ------------------------------------------------------------------------------------------ the tokenizer


@dataclass
class TokenizerSpec:
    """What the export needs to know about the run's tokenizer."""

    path: Optional[str]  # sentencepiece .model or tokenizer.json, or None (mock data: no tokenizer to export)
    vocab_size: int
    eod_id: int
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None
    unk_id: Optional[int] = None
    kind: str = "sentencepiece"  # or "huggingface" (a tokenizer.json)


def tokenizer_spec(ckpt: ModelCheckpoint, tokenizer_path: Optional[str] = None) -> TokenizerSpec:
    """The run's tokenizer (data.tokenizer, or `tokenizer_path` if it moved); EOD = its eos, as in training."""
    path = tokenizer_path or ckpt.config.data.tokenizer
    if path is None:  # mock data: the MockTokenizer's vocabulary and EOD
        vocab = ckpt.config.model.vocab_size
        if vocab is None:
            raise ExportError("the run has neither data.tokenizer nor model.vocab_size: cannot tell the vocabulary")
        return TokenizerSpec(None, vocab, vocab - 1)
    if not Path(path).exists():
        raise ExportError(f"tokenizer {path!r} (data.tokenizer of the run) not found: pass --tokenizer PATH")
    try:
        tok = load_tokenizer(str(path))
    except PrepError as err:
        raise ExportError(str(err)) from None
    return TokenizerSpec(tok.path, tok.vocab_size, tok.eod_id, tok.bos_id, tok.pad_id, tok.unk_id, tok.kind)


def hf_tokenizer(spec: TokenizerSpec, model_max_length: int):
    """A `transformers` fast tokenizer that encodes exactly like the run's tokenizer.

    A tokenizer.json is used as it is (its special tokens and post-processor: `tokenizer(text)` adds what the library
    adds; training, fpa-generate and fpa-eval encode without special tokens); eos = the EOD token. For a
    sentencepiece model, transformers' own converter builds the `tokenizers` pipeline from the model's settings
    (identity normalization, no dummy prefix, byte fallback, BPE merges ranked by piece score); special pieces
    written as text stay text (split_special_tokens), as sentencepiece treats them; no BOS/EOS is added.
    """
    require_transformers()
    from transformers import PreTrainedTokenizerFast

    if spec.kind == "huggingface":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(spec.path)
        special = {key: backend.id_to_token(index) for key, index in (
            ("eos_token", spec.eod_id), ("bos_token", spec.bos_id), ("pad_token", spec.pad_id),
            ("unk_token", spec.unk_id)) if index is not None}
        return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                       clean_up_tokenization_spaces=False, **special)
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spec.path).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if backend is None:
        raise ExportError(f"tokenizer {spec.path!r}: transformers cannot convert this sentencepiece model type")
    pieces = {i: p.piece for i, p in enumerate(proto.pieces)}
    special = {"eos_token": pieces[spec.eod_id]}
    for key, index in (("bos_token", spec.bos_id), ("pad_token", spec.pad_id), ("unk_token", spec.unk_id)):
        if index is not None:
            special[key] = pieces[index]
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False, **special)


# ------------------------------------------------------------------------------------------ the model


def hf_config(ckpt: ModelCheckpoint, arch: str, tok: TokenizerSpec, vocab_size: int, dtype: torch.dtype):
    """The transformers config of the exported model (vocabulary `vocab_size`, EOD as its eos, weights `dtype`)."""
    transformers = require_transformers()

    m = ckpt.config.model
    eps = m.norm_epsilon  # what the Megatron model uses (model.gpt.transformer_config)
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    positions = m.max_position_embeddings or m.seq_length
    common = dict(vocab_size=vocab_size, eos_token_id=tok.eod_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                  tie_word_embeddings=m.tie_embeddings, dtype=str(dtype).removeprefix("torch."))
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=ffn,
            n_positions=positions, activation_function=HF_ACTIVATIONS[m.activation],
            layer_norm_epsilon=eps, resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
            attn_pdrop=m.attention_dropout, **common)
    rope = {"rope_type": "default", "rope_theta": m.rotary_base}
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            intermediate_size=ffn, max_position_embeddings=positions, hidden_act=HF_ACTIVATIONS[m.activation],
            layer_norm_eps=eps,
            use_parallel_residual=False, rope_parameters={**rope, "partial_rotary_factor": 1.0},
            attention_bias=True, hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, **common)
    return transformers.LlamaConfig(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        intermediate_size=ffn, max_position_embeddings=positions, hidden_act="silu", rms_norm_eps=eps,
        rope_parameters=rope, attention_bias=False, mlp_bias=False, attention_dropout=m.attention_dropout, **common)


def split_qkv(fused: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV (weight [rows, in] or bias [rows]) -> q [heads*d], k [groups*d], v [groups*d] rows.

    Per query group the rows are that group's heads/groups query heads, then its key head, then its value head.
    """
    per_group = fused.shape[0] // groups
    d = per_group // (heads // groups + 2)
    q_rows = per_group - 2 * d
    blocks = fused.reshape(groups, per_group, *fused.shape[1:])
    q = blocks[:, :q_rows].reshape(heads * d, *fused.shape[1:])
    k = blocks[:, q_rows:q_rows + d].reshape(groups * d, *fused.shape[1:])
    v = blocks[:, q_rows + d:].reshape(groups * d, *fused.shape[1:])
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """The inverse of `split_qkv`: q, k, v rows -> Megatron's fused rows, group by group."""
    rest = q.shape[1:]
    blocks = [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)]
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


# How one Megatron tensor becomes its transformers tensor(s), and back. GPT-2's Conv1D layers store weights as
# [in, out] (transposed); its c_attn is [all queries; all keys; all values]; LLaMA has separate q/k/v
# projections; GPT-NeoX's query_key_value is [q_h; k_h; v_h] per head, which is Megatron's layout when every
# head is its own group (SAME); SwiGLU's fc1 is [gate; up].
SAME, TRANSPOSED, QKV_SPLIT, QKV_JOINED, QKV_JOINED_T, GATE_UP = (
    "same", "transposed", "qkv_split", "qkv_joined", "qkv_joined_t", "gate_up")


@dataclass(frozen=True)
class Rule:
    """Megatron global tensor `megatron` <-> transformers tensors `hf`, converted as `kind` says."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = SAME


def to_hf_tensors(rule: Rule, tensor: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if rule.kind == SAME:
        return [tensor]
    if rule.kind == TRANSPOSED:
        return [tensor.t()]
    if rule.kind == GATE_UP:
        return list(tensor.chunk(2, dim=0))
    q, k, v = split_qkv(tensor, heads, groups)
    if rule.kind == QKV_SPLIT:
        return [q, k, v]
    joined = torch.cat([q, k, v])
    return [joined.t() if rule.kind == QKV_JOINED_T else joined]


def to_megatron_tensor(rule: Rule, tensors: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """The inverse of `to_hf_tensors`."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if rule.kind == SAME:
        return tensors[0]
    if rule.kind == TRANSPOSED:
        return tensors[0].t()
    if rule.kind == GATE_UP:
        return torch.cat(tensors)
    if rule.kind == QKV_SPLIT:
        q, k, v = tensors
    else:
        joined = tensors[0].t() if rule.kind == QKV_JOINED_T else tensors[0]
        d = joined.shape[0] // (heads + 2 * groups)
        q, k, v = joined.split([heads * d, groups * d, groups * d])
    return join_qkv(q, k, v, heads, groups)


def _weight_and_bias(megatron: str, hf: str, kind: str = SAME) -> list[Rule]:
    bias_kind = {TRANSPOSED: SAME, QKV_JOINED_T: QKV_JOINED}.get(kind, kind)
    return [Rule(megatron + ".weight", (hf + ".weight",), kind), Rule(megatron + ".bias", (hf + ".bias",), bias_kind)]


def _gpt2_layer(i: int) -> list[Rule]:
    p, out = f"decoder.layers.{i}.", f"transformer.h.{i}."
    return [*_weight_and_bias(p + "input_layernorm", out + "ln_1"),
            *_weight_and_bias(p + "self_attention.linear_proj", out + "attn.c_proj", TRANSPOSED),
            *_weight_and_bias(p + "self_attention.linear_qkv", out + "attn.c_attn", QKV_JOINED_T),
            *_weight_and_bias(p + "pre_mlp_layernorm", out + "ln_2"),
            *_weight_and_bias(p + "mlp.linear_fc1", out + "mlp.c_fc", TRANSPOSED),
            *_weight_and_bias(p + "mlp.linear_fc2", out + "mlp.c_proj", TRANSPOSED)]


def _neox_layer(i: int) -> list[Rule]:
    p, out = f"decoder.layers.{i}.", f"gpt_neox.layers.{i}."
    names = {"input_layernorm": "input_layernorm", "self_attention.linear_proj": "attention.dense",
             "self_attention.linear_qkv": "attention.query_key_value", "pre_mlp_layernorm": "post_attention_layernorm",
             "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}
    return [rule for megatron, hf in names.items() for rule in _weight_and_bias(p + megatron, out + hf)]


def _llama_layer(i: int) -> list[Rule]:
    p, out = f"decoder.layers.{i}.", f"model.layers.{i}."
    attn = out + "self_attn."
    return [Rule(p + "input_layernorm.weight", (out + "input_layernorm.weight",)),
            Rule(p + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
            Rule(p + "self_attention.linear_qkv.weight",
                 (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), QKV_SPLIT),
            Rule(p + "pre_mlp_layernorm.weight", (out + "post_attention_layernorm.weight",)),
            Rule(p + "mlp.linear_fc1.weight", (out + "mlp.gate_proj.weight", out + "mlp.up_proj.weight"), GATE_UP),
            Rule(p + "mlp.linear_fc2.weight", (out + "mlp.down_proj.weight",))]


# per architecture: (word embeddings, final norm prefix, layer rules); the output layer is `lm_head`
_LAYOUT = {
    "gpt2": ("transformer.wte.weight", "transformer.ln_f", _gpt2_layer),
    "gpt_neox": ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", _neox_layer),
    "llama": ("model.embed_tokens.weight", "model.norm", _llama_layer),
}
HEAD = "lm_head.weight"
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


class _Source:
    """The state being converted; every tensor must be taken exactly once (nothing silently dropped)."""

    def __init__(self, state: dict[str, torch.Tensor], error=ExportError):
        self.state, self.taken, self.error = state, set(), error

    def take(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise self.error(f"the checkpoint has no {name}")
        self.taken.add(name)
        return self.state[name]

    def check_all_taken(self) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:
            raise self.error(f"the conversion does not map {', '.join(left)}")


def mapping_rules(arch: str, m: ModelConfig) -> list[Rule]:
    """Every tensor but the word embeddings and the output layer (their vocabulary is padded on one side only),
    in the order Megatron's GPTModel registers its parameters."""
    _, norm, layer = _LAYOUT[arch]
    rules = []
    if arch == "gpt2":
        rules.append(Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)))
    for i in range(m.num_layers):
        rules += layer(i)
    rules.append(Rule("decoder.final_layernorm.weight", (norm + ".weight",)))
    if arch != "llama":
        rules.append(Rule("decoder.final_layernorm.bias", (norm + ".bias",)))
    return rules


class HFState(ReadOnAccess):
    """A checkpoint's global state in the names and shapes of the transformers model (vocabulary unpadded), each
    tensor converted when asked for (the tensors one Megatron tensor becomes are kept until the next is asked
    for: a file written in this order reads every Megatron tensor once). Every conversion is tried on the
    meta device first, so an unmapped or misshapen tensor is an ExportError before anything is read or written."""

    _index = "sources"  # the names, in order

    def __init__(self, state: Mapping[str, torch.Tensor], arch: str, m: ModelConfig, vocab_size: int):
        self.state, self.m, self.vocab = state, m, vocab_size
        shapes = getattr(state, "shapes", None) or {name: t.shape for name, t in state.items()}
        dtypes = getattr(state, "dtypes", None) or {name: t.dtype for name, t in state.items()}
        self.dtype = dtypes[EMBEDDING]  # as saved: the model's dtype (bf16 runs keep bf16 weights)
        src = _Source({name: torch.empty(shape, dtype=dtypes[name], device="meta") for name, shape in shapes.items()})
        self.sources: OrderedDict[str, tuple[str, Optional[Rule], int]] = OrderedDict()  # hf name -> megatron, rule, i
        self.shapes: dict[str, torch.Size] = {}
        pairs = [(None, EMBEDDING, (_LAYOUT[arch][0],))] + [(rule, rule.megatron, rule.hf)
                                                             for rule in mapping_rules(arch, m)]
        if not m.tie_embeddings:  # a tied head is the embedding: transformers ties it, the files leave it out
            pairs.append((None, OUTPUT, (HEAD,)))
        for rule, megatron, hf_names in pairs:
            for i, (name, tensor) in enumerate(zip(hf_names, self._convert(rule, src.take(megatron)))):
                self.sources[name], self.shapes[name] = (megatron, rule, i), tensor.shape
        src.check_all_taken()
        self._last: tuple[Optional[str], list[torch.Tensor]] = (None, [])

    def _convert(self, rule: Optional[Rule], tensor: torch.Tensor) -> list[torch.Tensor]:
        if rule is None:  # the word embeddings or the output layer: the padded vocabulary cut back
            return [tensor[: self.vocab].clone()]
        return [t.contiguous() for t in to_hf_tensors(rule, tensor, self.m)]

    def __getitem__(self, name: str) -> torch.Tensor:
        megatron, rule, i = self.sources[name]
        if self._last[0] != megatron:
            self._last = (None, [])  # let the previous tensors go first
            self._last = (megatron, self._convert(rule, self.state[megatron]))
        return self._last[1][i]


def hf_state_dict(ckpt: ModelCheckpoint, arch: str, vocab_size: int) -> Mapping[str, torch.Tensor]:
    """The checkpoint's global state in the names and shapes of the transformers model (vocabulary unpadded; a tied
    head left out), converted on access (`HFState`)."""
    if vocab_size > ckpt.padded_vocab_size:
        raise ExportError(f"vocabulary of {vocab_size} is larger than the checkpoint's embedding "
                          f"({ckpt.padded_vocab_size} rows): wrong tokenizer?")
    return HFState(ckpt.state_dict, arch, ckpt.config.model, vocab_size)


@dataclass
class HFExport:
    """An exported model: the transformers model (eval mode; on the meta device when `state` holds its weights,
    to be written by `save_hf` tensor by tensor), its tokenizer (None without one)."""

    architecture: str
    model: object
    tokenizer: object
    tokenizer_spec: TokenizerSpec
    state: Optional[Mapping[str, torch.Tensor]] = None


def to_hf(ckpt: ModelCheckpoint, tokenizer_path: Optional[str] = None, with_tokenizer: bool = True,
          in_memory: bool = True) -> HFExport:
    """Convert a checkpoint (see `read_model_checkpoint`) into a transformers model: in memory, or (`in_memory`
    False) a model on the meta device with the converted state read on access, for `save_hf` to stream.

    Every check (architecture, tokenizer, vocabulary, unmapped tensors, names and shapes against the transformers
    model) happens here, before anything is written.
    """
    arch = hf_architecture(ckpt.config.model)
    transformers = require_transformers()
    tok = tokenizer_spec(ckpt, tokenizer_path)
    vocab = ckpt.config.model.vocab_size or tok.vocab_size
    if tok.vocab_size > vocab:
        raise ExportError(f"tokenizer has {tok.vocab_size} pieces but model.vocab_size={vocab}")
    state = hf_state_dict(ckpt, arch, vocab)
    dtype = getattr(state, "dtype", None) or state[_LAYOUT[arch][0]].dtype
    config = hf_config(ckpt, arch, tok, vocab, dtype)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = {name: tensor.shape for name, tensor in meta.state_dict().items()}
    shapes = getattr(state, "shapes", None) or {name: t.shape for name, t in state.items()}
    tied = {HEAD} if ckpt.config.model.tie_embeddings else set()
    wrong = [name for name in shapes if name in expected and shapes[name] != expected[name]]
    if set(shapes) - set(expected) or set(expected) - set(shapes) - tied or wrong:
        missing, unexpected = sorted(set(expected) - set(shapes) - tied), sorted(set(shapes) - set(expected))
        raise ExportError(f"transformers' {type(meta).__name__} does not take this state: missing {missing}, "
                          f"unexpected {unexpected}, of another shape {wrong}")
    if in_memory:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(dict(state), strict=False)
        model.eval()
        state = None
    else:
        model = meta
    name_loss_type(model)
    tokenizer = None
    if with_tokenizer and tok.path is not None:
        tokenizer = hf_tokenizer(tok, config.max_position_embeddings if arch != "gpt2" else config.n_positions)
    return HFExport(arch, model, tokenizer, tok, state)


SHARD_BYTES = 2 << 30  # the largest safetensors file an export writes (transformers' own default is 50 GB)
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def write_safetensors(state: Mapping[str, torch.Tensor], shapes: dict[str, torch.Size], dtype: torch.dtype,
                      out_dir: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """`state` as transformers' safetensors files: `model.safetensors`, or numbered files of at most `shard_bytes`
    with `model.safetensors.index.json`; each file is built from the tensors it holds, written, and let go before
    the next (safetensors writes a file from a dict of tensors in memory)."""
    from safetensors.torch import save_file

    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    filled = 0
    for name in state:
        size = shapes[name].numel() * itemsize
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    files = [out_dir / (WEIGHTS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
             for i in range(len(shards))]
    for file, names in zip(files, shards):
        tensors = {name: state[name] for name in names}
        save_file(tensors, str(file), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        total = sum(shapes[name].numel() for name in state) * itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file.name for file, names in zip(files, shards) for name in names}}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        files.append(out_dir / WEIGHTS_INDEX)
    return files


def save_hf(export: HFExport, out_dir: str | Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write the model (safetensors), its config, generation config and the tokenizer; return the files. A model
    on the meta device (`to_hf(..., in_memory=False)`) is written from its state tensor by tensor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if export.state is None:
        export.model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model = export.model
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)
        if model.can_generate():
            model.generation_config.save_pretrained(out_dir)
        shapes = getattr(export.state, "shapes", None) or {name: t.shape for name, t in export.state.items()}
        write_safetensors(export.state, shapes, model.dtype, out_dir, shard_bytes)
    if export.tokenizer is not None:
        export.tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def describe(ckpt: ModelCheckpoint, export: HFExport) -> str:
    """One paragraph on what was converted, for the command's output."""
    m, tok, vocab = ckpt.config.model, export.tokenizer_spec, export.model.config.vocab_size
    params = sum(p.numel() for p in export.model.parameters())
    layout = ckpt.layout
    return (f"{ckpt.path} (step {ckpt.step}, saved as TP{layout.tensor} x PP{layout.pipeline}"
            f" x DP{layout.data}) -> {type(export.model).__name__} ({export.architecture}): "
            f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads"
            f"{f' ({m.num_query_groups} key/value groups)' if m.num_query_groups else ''}, "
            f"vocabulary {vocab} (checkpoint padded to {ckpt.padded_vocab_size}), "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings, {params:,} parameters, "
            f"eos = EOD id {tok.eod_id}")


def name_loss_type(model) -> None:
    """transformers 5 picks a causal model's loss by matching its class name against its loss registry; GPT-2's
    class (GPT2LMHeadModel) matches none, so its first loss warns "`loss_type=None` was set in the config but it
    is unrecognized" (a model attribute, not a config.json key). Name the loss it then uses anyway."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"


def is_hf_dir(path: str | Path) -> bool:
    """An exported (or any transformers) model directory, as opposed to a training checkpoint."""
    return (Path(path) / "config.json").is_file()


def load_hf(path: str | Path, tokenizer_path: Optional[str] = None) -> HFExport:
    """A transformers model and tokenizer from an exported directory, or converted in memory from a training
    checkpoint (any layout; `tokenizer_path` if the run's tokenizer moved)."""
    if not is_hf_dir(path):
        return to_hf(read_model_checkpoint(path), tokenizer_path)
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    name_loss_type(model)
    model.eval()
    has_tokenizer = (Path(path) / "tokenizer.json").is_file() or (Path(path) / "tokenizer_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None
    c = model.config
    spec = TokenizerSpec(None, c.vocab_size, c.eos_token_id, c.bos_token_id, c.pad_token_id)
    return HFExport(model.config.model_type, model, tokenizer, spec)
