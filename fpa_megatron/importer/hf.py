"""Hugging Face `transformers` import: a GPT-2, GPT-NeoX or LLaMA / Mistral checkpoint on disk as a complete
fpa-megatron checkpoint (any TP x PP x DP) that `fpa-train` starts from with `checkpoint.init_from`.

The model section of the run config is read from `config.json`; whatever Megatron's GPT cannot compute exactly
(parallel residual, rope scaling, partial rotary, sliding windows, biases where Megatron has none, another
activation) is an `HFImportError` naming the key, raised before anything is written. The tensors go through the
same rules as the export (`fpa_megatron.export.hf.mapping_rules`, inverted), and the files are written by
fpa-reshard's writer.

Weights only: the checkpoint holds the model files (one per TP x PP rank), no optimizer state. `fpa-train` starts
from it with `checkpoint.init_from` (a fresh AdamW, as for any init_from); `fpa-reshard` turns it into a complete
checkpoint with a fresh AdamW state when one is wanted. Streaming: the transformers files are read tensor by
tensor (safetensors' `safe_open`, .bin through torch.load(mmap=True)) and each model file is built, written and
let go before the next, so the write holds about one output file plus the tensors in use, whatever the model's
size. The self-check that follows holds one float32 copy of the model at a time (4 bytes per parameter, see
export/verify.compare_logits); `--no-verify` skips it.

Vocabulary padding: the word embeddings (and an untied output layer) get zero rows up to the padded size
(a multiple of make_vocab_size_divisible_by x TP). A zero output row gives the logit 0, which could win a softmax
where every real logit is negative, so the trainer's loss leaves the padded columns out of the softmax
(`fpa_megatron.model.gpt.GPTModelOverVocabulary`) and generation / evaluation cut logits back to the real
vocabulary: the loss at step 0 is the transformers model's, and padded rows get no gradient.

The tokenizer travels with the import: the model directory's `tokenizer.json` (with the `tokenizer_config.json`
that names its eos) or sentencepiece `tokenizer.model`, or the one `data.tokenizer=PATH` names, is copied into
`<out>/tokenizer/` and the written config's `data.tokenizer` is that copy's absolute path, so fpa-eval,
fpa-generate and training need no `--tokenizer`. Its sha256 is recorded in the checkpoint's `resharded.json`
(`tokenizer`, the fields of fpa-prep's manifest); the copy is byte for byte, so data encoded by `fpa-prep` with
the model's tokenizer passes the run's data check, and data encoded with another is the usual config error.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional

import torch

from data_prep.common import PrepError
from data_prep.tokenizer import HF_TOKENIZER_CONFIG, resolve_tokenizer_path
from fpa_megatron.checkpoint.layout import CheckpointLayout
from fpa_megatron.checkpoint.reader import ReadOnAccess, read_model_checkpoint
from fpa_megatron.checkpoint.reshard import GlobalState, ReshardError, check_new_layout, write_checkpoint
from fpa_megatron.config import ConfigError, RunConfig, config_from_dict, parse_overrides, save_config
from fpa_megatron.export.hf import (_LAYOUT, EMBEDDING, HEAD, OUTPUT, Rule, _Source, mapping_rules,
                                    require_transformers, to_megatron_tensor)
from fpa_megatron.export.verify import DEFAULT_TOLERANCE, compare_logits
from fpa_megatron.rules import padded_vocab_size
from fpa_megatron.run_tokenizer import load_run_tokenizer, tokenizer_vocab_size
from fpa_megatron.schedules import LambdaSchedule
from fpa_megatron.training.optimizer import deepspeed_config

# config.json's model_type -> the export family whose tensor names it uses
SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama"}
# transformers' activation names (ACT2FN) -> model.activation computing the same function
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# model keys an import may change through overrides: they do not change the function the weights compute
ADJUSTABLE_MODEL_KEYS = {"seq_length", "dtype", "recompute", "attention_impl", "attention_block_size",
                         "hidden_dropout", "attention_dropout", "init_std", "make_vocab_size_divisible_by",
                         "vocab_size"}
IMPORTED_TAG = "iter_0000000"
TOKENIZER_DIR = "tokenizer"  # <out>/tokenizer/: the copy of the tokenizer the written config names
# the tokenizer files of a transformers model directory, in the order they are looked for
MODEL_DIR_TOKENIZERS = ("tokenizer.json", "tokenizer.model")


class HFImportError(ValueError):
    """A transformers checkpoint that cannot be imported exactly; the message names the key or file."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HFImportError(message)


def read_hf_config(model_dir: str | Path):
    """The model's transformers config (every default filled in, as transformers builds the model from it)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    _require(path.is_file(), f"--model {model_dir}: no config.json (not a transformers model directory)")
    model_type = json.loads(path.read_text()).get("model_type")
    _require(model_type in SUPPORTED_MODEL_TYPES,
             f"{path}: model_type={model_type!r} is not a supported architecture (supported: "
             f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    transformers = require_transformers()
    return transformers.AutoConfig.from_pretrained(str(model_dir))


def _rope(c, where: str) -> float:
    """rope_theta, or an error naming the rope setting Megatron's rotary embedding cannot compute."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    _require(rope_type == "default",
             f"{where}: rope_scaling / rope_parameters.rope_type={rope_type!r}: Megatron's rotary embedding has no "
             f"frequency scaling (only rope_type 'default' imports exactly)")
    partial = rope.get("partial_rotary_factor", 1.0)
    _require(float(partial) == 1.0,
             f"{where}: rope_parameters.partial_rotary_factor={partial} (rotary_pct): rotary on part of each head "
             f"is not supported by this model (only 1.0 imports)")
    return float(rope.get("rope_theta", 10000.0))


def model_section(c, where: str = "config.json") -> dict:
    """ModelConfig values that compute what the transformers config `c` computes, or HFImportError naming the key."""
    family = SUPPORTED_MODEL_TYPES[c.model_type]
    if family == "gpt2":
        act = c.activation_function
        _require(act in GELU_NAMES, f"{where}: activation_function={act!r} is not a GeLU ({', '.join(GELU_NAMES)})")
        _require(c.scale_attn_weights, f"{where}: scale_attn_weights=false: Megatron always scales scores by 1/sqrt(d)")
        _require(not c.scale_attn_by_inverse_layer_idx,
                 f"{where}: scale_attn_by_inverse_layer_idx=true: Megatron has no per-layer score scaling")
        _require(not c.add_cross_attention, f"{where}: add_cross_attention=true: a decoder-only GPT has none")
        return dict(num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head, num_query_groups=None,
                    ffn_hidden_size=c.n_inner or 4 * c.n_embd, max_position_embeddings=c.n_positions,
                    seq_length=c.n_positions, vocab_size=c.vocab_size, position_embedding="learned",
                    normalization="LayerNorm", activation=GELU_NAMES[act], norm_epsilon=c.layer_norm_epsilon,
                    tie_embeddings=bool(c.tie_word_embeddings))
    if family == "gpt_neox":
        _require(not c.use_parallel_residual,
                 f"{where}: use_parallel_residual=true: x + attn(ln1(x)) + mlp(ln2(x)) is another architecture than "
                 f"Megatron's sequential residual (only use_parallel_residual=false imports)")
        _require(c.hidden_act in GELU_NAMES, f"{where}: hidden_act={c.hidden_act!r} is not a GeLU "
                                             f"({', '.join(GELU_NAMES)})")
        _require(c.attention_bias, f"{where}: attention_bias=false: Megatron's GeLU models have biases on every "
                                   f"linear layer (attention and MLP alike)")
        theta = _rope(c, where)
        return dict(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                    num_attention_heads=c.num_attention_heads, num_query_groups=None,
                    ffn_hidden_size=c.intermediate_size,
                    max_position_embeddings=c.max_position_embeddings, seq_length=c.max_position_embeddings,
                    vocab_size=c.vocab_size, position_embedding="rope", normalization="LayerNorm",
                    activation=GELU_NAMES[c.hidden_act], norm_epsilon=c.layer_norm_eps, rotary_base=theta,
                    tie_embeddings=bool(c.tie_word_embeddings))
    # LLaMA / Mistral
    _require(c.hidden_act == "silu", f"{where}: hidden_act={c.hidden_act!r}: only SwiGLU (silu) imports")
    _require(not getattr(c, "attention_bias", False),
             f"{where}: attention_bias=true: Megatron's SwiGLU models have no linear biases")
    _require(not getattr(c, "mlp_bias", False), f"{where}: mlp_bias=true: Megatron's SwiGLU models have no biases")
    window = getattr(c, "sliding_window", None)
    _require(window is None, f"{where}: sliding_window={window}: Megatron's attention is full causal attention "
                             f"(only sliding_window=null imports)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    _require(head_dim * c.num_attention_heads == c.hidden_size,
             f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads = "
             f"{c.hidden_size} / {c.num_attention_heads}")
    groups = c.num_key_value_heads or c.num_attention_heads
    theta = _rope(c, where)
    return dict(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                num_query_groups=None if groups == c.num_attention_heads else groups,
                ffn_hidden_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                seq_length=c.max_position_embeddings, vocab_size=c.vocab_size, position_embedding="rope",
                normalization="RMSNorm", activation="swiglu", norm_epsilon=c.rms_norm_eps, rotary_base=theta,
                tie_embeddings=bool(c.tie_word_embeddings))


def run_config(c, tensor: int, pipeline: int, overrides: Optional[list[str]] = None,
               where: str = "config.json") -> RunConfig:
    """The run config: defaults, the model section from `c`, the layout, then `key=value` overrides; an override
    of a model key that would change the function (e.g. model.num_layers) is an error naming it."""
    model = model_section(c, where)
    dtype = str(getattr(c, "dtype", None) or "float32").removeprefix("torch.")
    values = {"model": dict(model, dtype="bf16" if dtype == "bfloat16" else "fp32", hidden_dropout=0.0,
                            attention_dropout=0.0),
              "parallel": {"tensor": tensor, "pipeline": pipeline}}
    cfg = config_from_dict(values, overrides)
    for key in parse_overrides(overrides or []).get("model", {}):
        if key not in ADJUSTABLE_MODEL_KEYS and key in model and getattr(cfg.model, key) != model[key]:
            raise HFImportError(f"model.{key}={getattr(cfg.model, key)!r} (override): the checkpoint's {where} gives {model[key]!r}, "
                                f"and the weights compute only that")
    vocab = model["vocab_size"]
    if cfg.model.vocab_size != vocab:
        raise HFImportError(f"model.vocab_size={cfg.model.vocab_size} (override) differs from the checkpoint's "
                            f"vocabulary ({vocab} rows, vocab_size in {where}): "
                            + ("larger than the checkpoint's" if cfg.model.vocab_size > vocab else
                               "rows would be dropped"))
    if cfg.data.tokenizer is not None:
        size = tokenizer_vocab_size(cfg.data.tokenizer)
        if size > vocab:
            raise HFImportError(f"data.tokenizer={cfg.data.tokenizer!r} has {size} tokens, more than the checkpoint's "
                                f"vocabulary ({vocab} rows, vocab_size in {where}): wrong tokenizer?")
    return cfg


SAFETENSORS, PYTORCH = ("model.safetensors", "pytorch_model.bin")  # transformers' weight files (or their index)
BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # recomputed by Megatron, not weights


class HFWeights(ReadOnAccess):
    """A transformers checkpoint's tensors (safetensors or .bin, one file or sharded with an index), read one at a
    time on access and cast to `dtype` as transformers would load them: safetensors through `safe_open`, .bin
    through torch.load(mmap=True); each file is opened for the access and let go after it, so memory holds the
    tensors in use, never the model. Stored names are renamed as transformers renames them when it loads (`rename`,
    e.g. GPT-NeoX's `embed_out` -> `lm_head`), and names without the model's prefix (`transformer.`, `model.`:
    how some checkpoints store the base model) are found under the full name."""

    _index = "files"  # the names, in order

    def __init__(self, model_dir: Path, dtype: torch.dtype, prefix: str = "",
                 rename: Callable[[str], str] = lambda name: name):
        self.model_dir, self.dtype = model_dir, dtype
        self.files: dict[str, tuple[Path, str]] = {}  # full name -> (file, name in the file)
        for kind in (SAFETENSORS, PYTORCH):
            index = model_dir / f"{kind}.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                names = {name: model_dir / file for name, file in weight_map.items()}
            elif (model_dir / kind).is_file():
                names = {name: model_dir / kind for name in self._names(model_dir / kind)}
            else:
                continue
            for stored, file in names.items():
                full = rename(stored)
                if prefix and not full.startswith(prefix + ".") and full != HEAD:
                    full = f"{prefix}.{full}"
                self.files[full] = (file, stored)
            break
        _require(bool(self.files), f"--model {model_dir}: no weights ({SAFETENSORS} or {PYTORCH}, or their "
                                   f".index.json)")

    @staticmethod
    def _names(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(_load_bin(file))

    def shape(self, name: str) -> torch.Size:
        file, stored = self.files[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return torch.Size(f.get_slice(stored).get_shape())
        return _load_bin(file)[stored].shape

    def __getitem__(self, name: str) -> torch.Tensor:
        file, stored = self.files[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(stored)
        else:
            tensor = _load_bin(file)[stored].clone()  # out of the mapped file
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def _load_bin(file: Path) -> dict:
    """A PyTorch weight file, tensors mapped from disk (not read) where its format allows."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be mapped: read whole
        return torch.load(file, map_location="cpu", weights_only=True)


def load_hf_state(model_dir: str | Path, c, dtype: torch.dtype) -> HFWeights:
    """Every tensor of the checkpoint, read on access (`HFWeights`); weights transformers would have to initialize
    itself (missing from the files) or of another shape than the config gives are an error naming them. The
    expected names and shapes come from the transformers model built on the meta device (no memory)."""
    transformers = require_transformers()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(c)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state = HFWeights(Path(model_dir), dtype, model.base_model_prefix, _renaming(model))
    missing = sorted(set(expected) - set(state) - {HEAD})
    mismatched = sorted(n for n in set(expected) & set(state) if not n.endswith(BUFFERS)
                        and state.shape(n) != expected[n])
    _require(not missing, f"--model {model_dir}: the weight files lack {missing} (transformers would initialize "
                          f"them randomly)")
    shapes = [f"{n} has shape {list(state.shape(n))}, config.json gives {list(expected[n])}" for n in mismatched]
    _require(not mismatched, f"--model {model_dir}: {'; '.join(shapes)}")
    return state


def _renaming(model) -> Callable[[str], str]:
    """The stored name -> model name renaming transformers applies when it loads `model`'s files (its
    conversion mapping); a transform that does more than rename is an error naming it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    transforms = get_model_conversion_mapping(model)
    other = [t for t in transforms if not isinstance(t, WeightRenaming)]
    if other:
        raise HFImportError(f"{type(model).__name__}: transformers converts its weights on loading "
                            f"({', '.join(map(str, other[0].source_patterns))}), which the import does not do")

    def rename(name: str) -> str:
        for transform in transforms:
            name, _ = transform.rename_source_key(name)
        return name

    return rename


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` (the vocabulary padded for tensor parallelism)."""
    out = torch.zeros(rows, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    out[: tensor.shape[0]] = tensor
    return out


class MegatronWeights(ReadOnAccess):
    """The global (TP 1 x PP 1) Megatron state of a transformers checkpoint, in GPTModel's parameter order, each
    tensor converted (`mapping_rules`, inverted) when it is asked for. Built on the meta device first: every HF
    tensor is used once and every conversion works on the files' shapes before anything is read or written."""

    _index = "sources"  # the names, in order

    def __init__(self, hf_state: Mapping, c, cfg: RunConfig, padded_vocab: int):
        arch, self.m, self.padded = SUPPORTED_MODEL_TYPES[c.model_type], cfg.model, padded_vocab
        self.hf_state = hf_state
        self.dtype = torch.bfloat16 if self.m.dtype == "bf16" else torch.float32
        embedding = _LAYOUT[arch][0]
        shape = getattr(hf_state, "shape", lambda name: hf_state[name].shape)
        names = set(hf_state)
        src = _Source({name: torch.empty(shape(name), device="meta") for name in names}, error=HFImportError)
        self.sources: OrderedDict[str, tuple[Optional[Rule], list[str]]] = OrderedDict()
        self.shapes: dict[str, torch.Size] = {}
        src.take(embedding)
        self.sources[EMBEDDING] = (None, [embedding])
        for rule in mapping_rules(arch, self.m):
            self.sources[rule.megatron] = (rule, list(rule.hf))
        if self.m.tie_embeddings:
            if HEAD in names:  # transformers lists the tied head under its own name too
                _require(torch.equal(hf_state[HEAD], hf_state[embedding]),
                         f"tie_word_embeddings=true but {HEAD} differs from {embedding}")
                src.take(HEAD)
        else:
            self.sources[OUTPUT] = (None, [HEAD])
        for name, (rule, hf_names) in self.sources.items():
            self.shapes[name] = self._convert(name, rule, [src.take(n) for n in hf_names]).shape
        src.taken |= {name for name in names if name.endswith(BUFFERS)}  # causal masks, rotary frequencies
        src.check_all_taken()

    def _convert(self, name: str, rule: Optional[Rule], tensors: list[torch.Tensor]) -> torch.Tensor:
        if rule is None:  # the word embeddings or the output layer: the vocabulary padded
            return pad_rows(tensors[0], self.padded).to(self.dtype)
        return to_megatron_tensor(rule, tensors, self.m).contiguous().to(self.dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        rule, hf_names = self.sources[name]
        return self._convert(name, rule, [self.hf_state[n] for n in hf_names])


def megatron_state(hf_state: Mapping, c, cfg: RunConfig, padded_vocab: int) -> Mapping[str, torch.Tensor]:
    """The global (TP 1 x PP 1) Megatron state, in GPTModel's parameter order, converted on access
    (`MegatronWeights`); every HF tensor is used once."""
    return MegatronWeights(hf_state, c, cfg, padded_vocab)


def _shapes(weights: Mapping) -> dict[str, torch.Size]:
    return getattr(weights, "shapes", None) or {name: w.shape for name, w in weights.items()}


def _extra_state(cfg: RunConfig) -> OrderedDict:
    """The `_extra_state` entries (None for the local spec) Megatron's linear layers put in the state dict."""
    modules = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
    names = [f"decoder.layers.{i}.{module}._extra_state" for i in range(cfg.model.num_layers) for module in modules]
    return OrderedDict((name, None) for name in names + ["output_layer._extra_state"])


def global_state(weights: Mapping, cfg: RunConfig) -> GlobalState:
    """fpa-reshard's GlobalState for `weights`, weights only (no optimizer state: `checkpoint.init_from` builds a
    fresh AdamW, and fpa-reshard writes one when asked for a complete checkpoint)."""
    import deepspeed

    shapes = _shapes(weights)
    decay = [name for name in weights if len(shapes[name]) >= 2]  # as optimizer.param_groups
    rest = [name for name in weights if len(shapes[name]) < 2]
    meta = {"buffer_names": [], "optimizer": None, "frozen_param_shapes": None, "shared_params": {},
            "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None, "random_ltd": None,
            "skipped_steps": 0, "global_steps": 0, "global_samples": 0, "ds_version": deepspeed.__version__,
            "ds_config": deepspeed_config(cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, 1)}
    return GlobalState(groups=[decay] + ([rest] if rest else []), tensors={"weight": weights},
                       extra_state=_extra_state(cfg), step=None, group_hparams=[], zero_meta={}, model_meta=meta)


def model_dir_tokenizer(model_dir: Path, overrides: Optional[list[str]]) -> Optional[str]:
    """The tokenizer to carry: data.tokenizer when an override sets it (null: none), else the model directory's
    tokenizer.json or tokenizer.model, else None."""
    given = parse_overrides(overrides or []).get("data", {})
    if "tokenizer" in given:
        return given["tokenizer"] or None
    return next((str(model_dir / name) for name in MODEL_DIR_TOKENIZERS if (model_dir / name).is_file()), None)


def tokenizer_files(path: str) -> list[Path]:
    """The files a tokenizer is read from: the model file, and a tokenizer.json's tokenizer_config.json (its eos)."""
    try:
        main = Path(resolve_tokenizer_path(path))
    except PrepError as err:
        raise HFImportError(f"tokenizer {path}: {err}") from None
    config = main.parent / HF_TOKENIZER_CONFIG
    return [main] + ([config] if main.suffix == ".json" and config.is_file() else [])


def carry_tokenizer(files: list[Path], out: Path, sha256: str) -> None:
    """Copy the tokenizer files into <out>/tokenizer/; the copy must hash as the original did."""
    dest = out / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, dest / file.name)
    copied = load_run_tokenizer(str(dest / files[0].name)).sha256
    _require(copied == sha256, f"the copy of {files[0]} in {dest} has sha256 {copied[:12]}..., the original "
                               f"{sha256[:12]}...: the file changed while it was copied")


def check_import(model_dir: Path, iter_dir: Path, out: Path, tolerance: float, log: Callable[[str], None]) -> None:
    """The written checkpoint, read back, against the transformers model it came from; on a mismatch `out` is
    removed (it was new or empty) and the import fails naming the difference."""
    transformers = require_transformers()
    vocab = read_hf_config(model_dir).vocab_size
    check = compare_logits(lambda: transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                                                    dtype=torch.float32),
                           vocab, read_model_checkpoint(iter_dir), tolerance)
    if not check.ok:
        shutil.rmtree(out, ignore_errors=True)
        raise HFImportError(f"the import does not reproduce {model_dir}: {check.describe()}; {out} was removed "
                            f"(--no-verify skips this check)")
    log(f"verified: {check.describe()}")


def import_hf(model_dir: str | Path, out: str | Path, tensor: int = 1, pipeline: int = 1,
              data_parallel: Optional[int] = None, overrides: Optional[list[str]] = None,
              write_config: Optional[str | Path] = None, log: Callable[[str], None] = print, verify: bool = True,
              tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Write the transformers checkpoint in `model_dir` as a complete checkpoint root `out` for TP x PP x DP;
    every check happens before anything is written, and (`verify`) the written checkpoint's own model must give
    the transformers model's logits on a fixed sample, or `out` is removed again. Returns the iteration
    directory (step 0)."""
    model_dir, out = Path(model_dir), Path(out)
    _require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
             f"--out {out} exists and is not empty; choose a new directory (nothing was written)")
    c = read_hf_config(model_dir)
    source = model_dir_tokenizer(model_dir, overrides)
    files = tokenizer_files(source) if source else []
    try:
        tokenizer = load_run_tokenizer(str(files[0])) if files else None
    except ConfigError as err:
        raise HFImportError(f"{err}; name another with data.tokenizer=PATH, or import without one with "
                            f"data.tokenizer=null") from None
    tok_override = [f"data.tokenizer={files[0]}"] if files else []
    try:
        cfg = run_config(c, tensor, pipeline, list(overrides or []) + tok_override,
                         where=str(model_dir / "config.json"))
    except ConfigError as err:
        raise HFImportError(str(err)) from None
    if tokenizer is not None:  # the written config names the copy in <out>/tokenizer/
        cfg.data.tokenizer = str(out.resolve() / TOKENIZER_DIR / files[0].name)
    layout = CheckpointLayout(tensor * pipeline * (data_parallel or 1), tensor, pipeline, data_parallel or 1,
                              cfg.optimizer.zero_stage)
    try:
        check_new_layout(cfg, layout)
    except ReshardError as err:
        raise HFImportError(str(err)) from None
    m = cfg.model
    padded = padded_vocab_size(m.vocab_size, tensor, m.make_vocab_size_divisible_by)
    hf_dtype = torch.bfloat16 if m.dtype == "bf16" else torch.float32
    weights = megatron_state(load_hf_state(model_dir, c, hf_dtype), c, cfg, padded)
    log(f"fpa-import: {model_dir} ({c.model_type}: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads{f', {m.num_query_groups} key/value groups' if m.num_query_groups else ''}, "
        f"vocabulary {m.vocab_size} padded to {padded}, {'tied' if m.tie_embeddings else 'untied'} embeddings, "
        f"{sum(s.numel() for s in _shapes(weights).values()):,} parameters) -> {layout.describe()}, weights "
        f"only")
    state = global_state(weights, cfg)
    lambdas = LambdaSchedule(cfg.fpa.lambda0, cfg.fpa.gamma, cfg.fpa.min_lambda, cfg.fpa.enabled)
    trainer_state = {"step": 0, "consumed_samples": 0, "updates": 0, "lambda_schedule": lambdas.state_dict()}
    note = {"source": str(model_dir.resolve()), "imported_from": "transformers", "model_type": c.model_type,
            "weights_only": True}
    if tokenizer is not None:  # as fpa-prep's manifest records it, with the copy's path
        info = tokenizer.info()
        note["tokenizer"] = dict(info.describe(), path=cfg.data.tokenizer, source=str(files[0]))
    iter_dir = write_checkpoint(state, cfg, layout, out, IMPORTED_TAG, trainer_state, note, log)
    if verify:
        check_import(model_dir, iter_dir, out, tolerance, log)
    if tokenizer is not None:
        carry_tokenizer(files, out, tokenizer.sha256)
        log(f"  tokenizer {files[0]} (sha256 {tokenizer.sha256[:12]}..., vocabulary {tokenizer.vocab_size}, EOD "
            f"{tokenizer.eod_piece!r}={tokenizer.eod_id}) copied to {out / TOKENIZER_DIR}: data.tokenizer of the "
            f"checkpoint's config")
    if write_config is not None:
        run = copy.deepcopy(cfg)
        run.checkpoint.init_from = str(out)
        save_config(run, write_config)
        log(f"  run config (model section from config.json, checkpoint.init_from={out}, "
            f"data.tokenizer={run.data.tokenizer}): {write_config}")
    log(f"done: {iter_dir}\nstart training from it with: fpa-train --config <config> checkpoint.init_from={out}"
        f" parallel.tensor={tensor} parallel.pipeline={pipeline}  (model section: {iter_dir / 'config.yaml'})")
    return iter_dir
