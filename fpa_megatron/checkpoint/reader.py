"""Read a training checkpoint offline (no process group, no GPU, no DeepSpeed engine).

`read_model_checkpoint(path)` returns the run's resolved config, the layout it was saved with, the trainer
state and the full model state {global name: tensor} in the names of a TP=1 x PP=1 Megatron GPTModel (the
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the directory or file."""


@dataclass
class ModelCheckpoint:
    """Everything a checkpoint holds about the model, independent of the layout it was saved with."""

    path: Path  # the iter_XXXXXXX directory
    config: RunConfig  # the resolved config of the run that wrote it
    layout: CheckpointLayout
    trainer_state: dict  # step, consumed_samples, lambda_schedule (as the trainer saved them)
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # global names; tied output weight left out

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
        return int(self.state_dict["embedding.word_embeddings.weight"].shape[0])


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


def _stage_state(module: dict, pp_rank: int, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """One model file's tensors under global names (`stage_global_name`: Megatron's even split into stages and
    model chunks)."""
    out = {}
    for name, value in module.items():
        if not isinstance(value, torch.Tensor):  # Megatron's `_extra_state` entries (None for local layers)
            continue
        out[stage_global_name(name, cfg.model.num_layers, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline,
                              pp_rank)] = value
    return out


def _join_tensor_parallel(name: str, pieces: list[torch.Tensor], gated: bool) -> torch.Tensor:
    dim = tensor_parallel_dim(name)
    if dim is None:
        return pieces[0]
    return join_shards(pieces, dim, is_gated_fc1(name, gated))


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
    """Read a complete checkpoint of any (TP, PP, DP) layout into the full TP1 x PP1 model state (on CPU); the
    files read are first checked against their recorded sizes and checksums."""
    path = resolve_checkpoint_dir(path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no config.yaml (not written by fpa-train?)")
    if not has_checksums(path):
        log.warning(f"checkpoint {path} has no checksums (written before checksums were recorded): its files "
                    f"are not verified")
    verify_checkpoint(path, ["config.yaml"])  # read first, to know which model files there are
    cfg = load_config(path / "config.yaml")
    coordinates = model_parallel_coordinates(cfg.parallel.tensor, cfg.parallel.pipeline)
    verify_checkpoint(path, [f"mp_rank_{mp:02d}_model_states.pt" for mp in coordinates] + [TRAINER_STATE])
    files = {mp: _load(path / f"mp_rank_{mp:02d}_model_states.pt") for mp in coordinates}
    layout = _read_layout(path, cfg, files[0])
    state = _join_stages(path, cfg, _stage_pieces(path, cfg, files, coordinates))
    _check_complete(path, cfg, state)
    return ModelCheckpoint(path=path, config=cfg, layout=layout, trainer_state=_trainer_state(path),
                           state_dict=state)


def _stage_pieces(path: Path, cfg: RunConfig, files: dict, coordinates: dict) -> list[dict[str, list]]:
    """[pipeline rank][global name] = [piece of tensor rank 0, 1, ...]."""
    pieces: list[dict[str, list]] = [{} for _ in range(cfg.parallel.pipeline)]
    for mp, (_, pp_rank) in sorted(coordinates.items(), key=lambda item: item[1]):  # tensor ranks in order
        module = files[mp].get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}/mp_rank_{mp:02d}_model_states.pt has no 'module' state")
        for name, tensor in _stage_state(module, pp_rank, cfg).items():
            pieces[pp_rank].setdefault(name, []).append(tensor)
    return pieces


def _join_stages(path: Path, cfg: RunConfig, stage_pieces: list[dict[str, list]]) -> dict[str, torch.Tensor]:
    """Join each tensor's TP pieces; the last stage's copy of tied embeddings is checked, then left out."""
    tp, gated = cfg.parallel.tensor, cfg.model.activation == "swiglu"
    state: dict[str, torch.Tensor] = {}
    tied_copy = None
    for pp_rank, pieces in enumerate(stage_pieces):
        for name, shards in pieces.items():
            if len(shards) != tp:
                raise CheckpointError(f"checkpoint {path}: {name} found on {len(shards)} of {tp} tensor-parallel "
                                      f"ranks of pipeline stage {pp_rank}")
            full = _join_tensor_parallel(name, shards, gated)
            if name == TIED_COPY and cfg.model.tie_embeddings:
                tied_copy = full
            else:
                state[name] = full
    embedding = state.get("embedding.word_embeddings.weight")
    if tied_copy is not None and embedding is not None and not torch.equal(tied_copy, embedding):
        diff = (tied_copy.float() - embedding.float()).abs().max().item()
        warnings.warn(f"checkpoint {path}: the last stage's copy of the tied embeddings differs from the first "
                      f"stage's by up to {diff:.3g}; using the first stage's", stacklevel=3)
    return state


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


def initial_weights(path: str | Path, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """checkpoint.init_from: the checkpoint's global weights (any layout), vocabulary rows cut or zero-padded to
    this run's padded size (padded rows never enter the loss, see GPTModelOverVocabulary)."""
    state = dict(read_model_checkpoint(path).state_dict)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state and state[name].shape[0] != padded_vocab_size:
            rows = torch.zeros(padded_vocab_size, *state[name].shape[1:], dtype=state[name].dtype)
            n = min(padded_vocab_size, state[name].shape[0])
            rows[:n] = state[name][:n]
            state[name] = rows
    return state
