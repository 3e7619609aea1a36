"""Read a training checkpoint offline (no process group, no GPU, no DeepSpeed engine).

`read_model_checkpoint(path)` returns the run's resolved config, the layout it was saved with, the trainer
state and the full model state {global name: tensor}, read tensor by tensor on access (`ShardedState`: memory
holds the tensors in use, never the whole model), in the names of a TP=1 x PP=1 Megatron GPTModel (the
names `parallel/weights.py` uses): each `mp_rank_XX_model_states.pt` that DeepSpeed wrote is placed at its
(tensor, pipeline) rank, its layers renamed by the stage's layer offset (with a virtual pipeline, each model
chunk's "c." prefix dropped and its layers renamed by the chunk's offset), and tensor-parallel pieces joined
with the same rules the live model uses. Used by export, generation, evaluation and resharding.

Every file read is first checked against the size and checksum its `complete` marker recorded (integrity.py):
a damaged checkpoint is refused naming the file and what is wrong.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fpa_megatron.checkpoint.format import TRAINER_STATE, load_trusted
from fpa_megatron.checkpoint.integrity import MARKER, has_checksums, one_file_problem
from fpa_megatron.checkpoint.layout import CheckpointLayout
from fpa_megatron.checkpoint.lineage import resolve_latest
from fpa_megatron.config import ConfigError, RunConfig, load_config
from fpa_megatron.parallel.weights import is_gated_fc1, join_shards, stage_global_name, tensor_parallel_dim
from fpa_megatron.run_log import get_logger

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
log = get_logger("checkpoint")
TIED_COPY = "output_layer.weight"  # the last stage's copy of tied word embeddings
EMBEDDING = "embedding.word_embeddings.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the directory or file."""


@dataclass
class ModelCheckpoint:
    """Everything a checkpoint holds about the model, independent of the layout it was saved with."""

    path: Path  # the iter_XXXXXXX directory
    config: RunConfig  # the resolved config of the run that wrote it
    layout: CheckpointLayout
    trainer_state: dict  # step, consumed_samples, lambda_schedule (as the trainer saved them)
    state_dict: Mapping[str, torch.Tensor] = field(repr=False)  # global names; tied output weight left out

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    @property
    def consumed_samples(self) -> int:
        return int(self.trainer_state["consumed_samples"])

    @property
    def lambda_schedule(self) -> dict:
        return self.trainer_state["lambda_schedule"]

    @property
    def padded_vocab_size(self) -> int:
        shapes = getattr(self.state_dict, "shapes", None)  # a ShardedState knows it without reading the tensor
        return int(shapes[EMBEDDING][0] if shapes is not None else self.state_dict[EMBEDDING].shape[0])


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """An iter_XXXXXXX directory from itself, a checkpoint root or a run directory (`<run>/checkpoints`).

    In a root, what `resume: auto` takes there (`latest`, else the lineage's newest). Only complete checkpoints
    (with the marker written after every rank finished) count.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / MARKER).exists():
        return path
    if path.name.startswith("iter_"):
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {MARKER!r} marker: a run stopped "
                              f"while saving it); use an earlier one")
    for root in (path, path / "checkpoints"):
        found, _ = resolve_latest(root)  # what `resume: auto` would take there
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint (iter_*/{MARKER}) in {str(path)!r} or {str(path / 'checkpoints')!r}")


def model_parallel_coordinates(tensor: int, pipeline: int) -> dict[int, tuple[int, int]]:
    """{DeepSpeed model-parallel rank: (tensor rank, pipeline rank)} for the groups fpa-train builds.

    DeepSpeed names model files by the rank in Megatron's model-parallel (tp-pp) group; Megatron's own
    RankGenerator, with the order `initialize_model_parallel` uses by default, says which rank that is.
    """
    from megatron.core.parallel_state import RankGenerator, initialize_model_parallel

    order = inspect.signature(initialize_model_parallel).parameters["order"].default
    ranks = RankGenerator(tp=tensor, ep=1, dp=1, pp=pipeline, cp=1, order=order)
    tp_of = {r: group.index(r) for group in ranks.get_ranks("tp") for r in group}
    pp_of = {r: group.index(r) for group in ranks.get_ranks("pp") for r in group}
    (model_parallel_group,) = ranks.get_ranks("tp-pp")  # dp = 1: one group, every rank
    return {mp_rank: (tp_of[r], pp_of[r]) for mp_rank, r in enumerate(sorted(model_parallel_group))}


def _load(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"cannot read checkpoint file {str(file)!r}: {err}") from None


def _read_layout(path: Path, cfg: RunConfig, first: dict) -> CheckpointLayout:
    """The layout from config.yaml, cross-checked with what DeepSpeed recorded."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dims = first.get("checkpoint_parallel_dimensions") or {}
    recorded = (dims.get("tp_degree", tp), dims.get("pp_degree", pp), first.get("mp_world_size", tp * pp))
    if recorded != (tp, pp, tp * pp):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: config.yaml says parallel.tensor={tp}, parallel.pipeline={pp} but DeepSpeed "
            f"recorded tp={recorded[0]}, pp={recorded[1]}, model-parallel size {recorded[2]}")
    cp = cfg.parallel.context
    dp = int(first.get("dp_world_size", 1)) // cp  # DeepSpeed's data-parallel group is DP x CP
    return CheckpointLayout(tp * cp * pp * dp, tp, pp, dp, cfg.optimizer.zero_stage,
                            virtual_pipeline=cfg.parallel.virtual_pipeline, context=cp)


def verify_checkpoint(path: Path, names: list[str]) -> None:
    """Raise CheckpointError naming the file when one of `names` is missing, cut or changed since the save
    (nothing to check in a checkpoint without checksums)."""
    if not has_checksums(path):
        return
    for name in names:
        if problem := one_file_problem(path / name):
            raise CheckpointError(f"checkpoint {path} is damaged: {problem} (`fpa-ckpt verify {path.parent}` "
                                  f"reports each checkpoint there)")


def read_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    """Read a complete checkpoint of any (TP, PP, DP) layout as the full TP1 x PP1 model state (on CPU, read tensor by
    tensor on access: `ShardedState`); the files read are first checked against their recorded sizes and
    checksums."""
    path = resolve_checkpoint_dir(path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no config.yaml (not written by fpa-train?)")
    if not has_checksums(path):
        log.warning(f"checkpoint {path} has no checksums (written before checksums were recorded): its files "
                    f"are not verified")
    verify_checkpoint(path, ["config.yaml"])  # read first, to know which model files there are
    cfg = load_config(path / "config.yaml")
    coordinates = model_parallel_coordinates(cfg.parallel.tensor, cfg.parallel.pipeline)
    verify_checkpoint(path, [model_file(mp) for mp in coordinates] + [TRAINER_STATE])
    layout = _read_layout(path, cfg, _load(path / model_file(0)))
    state = ShardedState(path, cfg, coordinates)
    _check_complete(path, cfg, state)
    return ModelCheckpoint(path=path, config=cfg, layout=layout, trainer_state=_trainer_state(path),
                           state_dict=state)


class ReadOnAccess(Mapping):
    """A {name: tensor} mapping whose tensors are read (or converted) only when asked for; `_index` names the
    attribute whose keys are its names, in order."""

    _index = ""

    def __iter__(self):
        return iter(getattr(self, self._index))

    def __len__(self) -> int:
        return len(getattr(self, self._index))

    def __contains__(self, name) -> bool:
        return name in getattr(self, self._index)


def model_file(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


class ShardedState(ReadOnAccess):
    """{global name: tensor} of a checkpoint, read on access: each access maps the model files holding the
    tensor's tensor-parallel pieces (torch.load mmap=True), copies the pieces out, joins them and unmaps the files
    again, so memory holds the tensors being used, never the model. The last stage's copy of tied embeddings is
    checked against the first stage's once, then left out."""

    _index = "where"  # the names, in order

    def __init__(self, path: Path, cfg: RunConfig, coordinates: dict[int, tuple[int, int]]):
        self.path, self.gated, self.tensor = path, cfg.model.activation == "swiglu", cfg.parallel.tensor
        self.where: dict[str, tuple[list[int], str]] = {}  # global name -> (model files by TP rank, local name)
        self.shapes: dict[str, torch.Size] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        pieces: dict[str, dict[int, tuple[int, str, torch.Size]]] = {}  # global name -> {TP rank: (mp, local, shape)}
        tied: dict[str, dict[int, tuple[int, str, torch.Size]]] = {}
        for mp, (tp, pp) in sorted(coordinates.items(), key=lambda item: item[1]):
            module = _load(path / model_file(mp)).get("module")  # names and shapes only: no tensor data is touched
            if not isinstance(module, dict):
                raise CheckpointError(f"{path}/{model_file(mp)} has no 'module' state")
            for local, value in module.items():
                if not isinstance(value, torch.Tensor):  # Megatron's `_extra_state` entries (None for local layers)
                    continue
                name = stage_global_name(local, cfg.model.num_layers, cfg.parallel.pipeline,
                                         cfg.parallel.virtual_pipeline, pp)
                into = tied if name == TIED_COPY and cfg.model.tie_embeddings else pieces
                into.setdefault(name, {})[tp] = (mp, local, value.shape)
                self.dtypes[name] = value.dtype
        for name, per_tp in list(pieces.items()) + [(TIED_COPY, p) for p in tied.values()]:
            if len(per_tp) != self.tensor:
                raise CheckpointError(f"checkpoint {path}: {name} found on {len(per_tp)} of {self.tensor} "
                                      f"tensor-parallel ranks of its pipeline stage")
        for name, per_tp in pieces.items():
            self.where[name] = ([per_tp[t][0] for t in range(self.tensor)], per_tp[0][1])
            dim, shapes = tensor_parallel_dim(name), [per_tp[t][2] for t in range(self.tensor)]
            self.shapes[name] = shapes[0] if dim is None else torch.Size(
                [sum(s[d] for s in shapes) if d == dim else size for d, size in enumerate(shapes[0])])
        if tied and EMBEDDING in self.where:
            copy = tied[TIED_COPY]
            self._check_tied([copy[t][0] for t in range(self.tensor)], copy[0][1])

    def _pieces(self, files: list[int], local: str) -> list[torch.Tensor]:
        pieces = []
        for mp in files:
            mapped = _load(self.path / model_file(mp))["module"][local]
            pieces.append(mapped.clone())  # out of the mapping, which is unmapped as `mapped` goes
            del mapped
        return pieces

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(name)
        files, local = self.where[name]
        return _join_tensor_parallel(name, self._pieces(files, local), self.gated)

    def _check_tied(self, files: list[int], local: str) -> None:
        """Warn when the last stage's copy of the tied embeddings differs from the first stage's (piece by piece)."""
        first, last = self.where[EMBEDDING]
        diff = 0.0
        for a, b in zip(self._pieces(first, last), self._pieces(files, local)):
            if not torch.equal(a, b):
                diff = max(diff, (a.float() - b.float()).abs().max().item())
        if diff:
            warnings.warn(f"checkpoint {self.path}: the last stage's copy of the tied embeddings differs from the "
                          f"first stage's by up to {diff:.3g}; using the first stage's", stacklevel=4)


def _join_tensor_parallel(name: str, pieces: list[torch.Tensor], gated: bool) -> torch.Tensor:
    dim = tensor_parallel_dim(name)
    if dim is None:
        return pieces[0]
    return join_shards(pieces, dim, is_gated_fc1(name, gated))


def _trainer_state(path: Path) -> dict:
    file = path / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {TRAINER_STATE}")
    return load_trusted(file)


def _check_complete(path: Path, cfg: RunConfig, state: dict) -> None:
    """Every global layer present once, plus the embeddings and final norm."""
    layers = {int(m.group(1)) for name in state if (m := _LAYER.match(name))}
    if layers != set(range(cfg.model.num_layers)):
        raise CheckpointError(f"checkpoint {path}: found layers {sorted(layers)}, expected "
                              f"0..{cfg.model.num_layers - 1} (model.num_layers={cfg.model.num_layers})")
    required = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not cfg.model.tie_embeddings:
        required.append("output_layer.weight")
    missing = [name for name in required if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {', '.join(missing)}")


# ModelConfig keys that decide the tensors' shapes and the function they compute (checkpoint.init_from must match)
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "position_embedding", "normalization", "activation", "norm_epsilon", "rotary_base", "tie_embeddings",
              "qk_layernorm")


def _model_key(model, key: str):
    """A model key's resolved value (None means its default: groups = heads, ffn = 4 x hidden)."""
    value = getattr(model, key)
    if key == "num_query_groups":
        return value or model.num_attention_heads
    if key == "ffn_hidden_size":
        return value or 4 * model.hidden_size
    return value


def check_init_from(cfg: RunConfig, vocab_size: int) -> None:
    """checkpoint.init_from names a complete checkpoint whose model has this run's shape and covers its vocabulary
    (reads only its config.yaml); a ConfigError naming the key otherwise."""
    key = f"checkpoint.init_from={cfg.checkpoint.init_from!r}"
    try:
        path = resolve_checkpoint_dir(cfg.checkpoint.init_from)
        source = load_config(path / "config.yaml")
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"{key} is not a valid checkpoint: {err}") from None
    keys = list(MODEL_KEYS) + (["max_position_embeddings"] if cfg.model.position_embedding == "learned" else [])
    for name in keys:
        ours, theirs = _model_key(cfg.model, name), _model_key(source.model, name)
        if name == "max_position_embeddings":
            ours, theirs = ours or cfg.model.seq_length, theirs or source.model.seq_length
        if ours != theirs:
            raise ConfigError(f"{key}: its model has model.{name}={theirs!r}, this run model.{name}={ours!r}")
    if source.model.vocab_size is not None and vocab_size > source.model.vocab_size:
        raise ConfigError(f"{key}: its vocabulary has {source.model.vocab_size} tokens, this run's {vocab_size}")


def initial_weights(path: str | Path, padded_vocab_size: int) -> Mapping[str, torch.Tensor]:
    """checkpoint.init_from: the checkpoint's global weights (any layout, read on access), vocabulary rows cut or
    zero-padded to this run's padded size (padded rows never enter the loss, see GPTModelOverVocabulary)."""
    return VocabularyRows(read_model_checkpoint(path).state_dict, padded_vocab_size)


class VocabularyRows(ReadOnAccess):
    """A global state whose word embeddings and output layer have `rows` rows (cut, or zero rows appended)."""

    _index = "state"  # the names, in order

    def __init__(self, state: Mapping[str, torch.Tensor], rows: int):
        self.state, self.rows = state, rows

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.state[name]
        if name not in (EMBEDDING, "output_layer.weight") or tensor.shape[0] == self.rows:
            return tensor
        out = torch.zeros(self.rows, *tensor.shape[1:], dtype=tensor.dtype)
        n = min(self.rows, tensor.shape[0])
        out[:n] = tensor[:n]
        return out
