"""`fpa-reshard`: rewrite a checkpoint for another (TP, CP, PP, DP) layout, so that training continues exactly.

    fpa-reshard --checkpoint runs/x/checkpoints --tensor 1 --pipeline 2 [--virtual-pipeline 2] [--context 2] \
        [--data-parallel 2] --out runs/x/pp2

Memory: every file is built from the global tensors it needs, read one at a time from the source's files
(mapped, copied, unmapped), written, and let go before the next: peak memory is about the largest file written
plus the largest file read, whatever the model's size (benchmarks/tooling_memory.py measures it).

What moves: the model weights; the fp32 master weights and AdamW's exp_avg, exp_avg_sq and step, gathered
from every ZeRO partition of every model-parallel rank into whole (TP 1 x PP 1) tensors, split again for the
new TP size, placed on the new pipeline stages (and model chunks) and partitioned over the new DP x CP size
(DeepSpeed's data-parallel group: context parallelism shards no weight, it only changes the ZeRO partitions
and their file names) the way DeepSpeed's ZeRO-1/2 partitions them; the iteration, consumed samples (the data
position) and the lambda schedule.
The padded vocabulary keeps its size (the logits keep their columns; the loss leaves the padded ones out):
when the new TP size would pad differently, `model.make_vocab_size_divisible_by` is set so that it does not.
What does not move: the per-rank RNG streams (on GPUs they are device states); the
resumed run seeds them from `train.seed` as at the start of a run. Nothing draws from them with dropout 0,
which every shipped config uses.

Why not DeepSpeed's universal checkpoint: it keys each parameter by the engine's module name, and Megatron-core
numbers layers per pipeline stage (`decoder.layers.0` on every stage), so a PP change would load the wrong
layers. So this module writes the files DeepSpeed itself writes (model states per model-parallel rank, flat
fp32 partitions per DP rank) from global tensors: the weights as `read_model_checkpoint` reads them, the
optimizer state gathered here with the same names and split rules (`fpa_megatron.parallel.weights`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fpa_megatron.checkpoint.format import (LATEST, RESHARDED, TRAINER_STATE, load_deepspeed_file, mark_complete,
                                            save_durable, weights_only, write_atomic, write_layout)
from fpa_megatron.checkpoint.integrity import CheckpointIntegrityError, one_file_problem
from fpa_megatron.checkpoint.layout import CheckpointLayout
from fpa_megatron.checkpoint.reader import (CheckpointError, ModelCheckpoint, ReadOnAccess,
                                            model_parallel_coordinates, read_model_checkpoint)
from fpa_megatron.config import ConfigError, RunConfig, save_config
from fpa_megatron.model.memory import reduce_bucket_elements
from fpa_megatron.parallel.weights import (global_name, is_gated_fc1, join_shards, layer_index, layer_placement,
                                           split_shard, stage_global_name, tensor_parallel_dim, uniform_layer_offset)
from fpa_megatron.rules import check_values, padded_vocab_size
from fpa_megatron.run_tokenizer import tokenizer_vocab_size

MODEL_FILE = "mp_rank_{mp:02d}_model_states.pt"
ZERO_FILE = "{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
TIED_OUTPUT = "output_layer.weight"  # with tied embeddings and PP > 1: the last stage's copy of the embeddings
EMBEDDING = "embedding.word_embeddings.weight"
OPTIMIZER_HINT = ("rerun with --reset-optimizer to write the model with a fresh AdamW state (moments 0, step 0); "
                  "training then continues from these weights but not exactly as before")


class ReshardError(CheckpointError):
    """A checkpoint that cannot be rewritten as asked; the message names the file, key or value."""


def ranks_by_stage(layout: CheckpointLayout) -> list[tuple[int, int, int]]:
    """(model-parallel rank, TP rank, PP stage) of every model file, stage by stage, TP rank within."""
    coordinates = model_parallel_coordinates(layout.tensor, layout.pipeline)
    return sorted(((mp, tp, pp) for mp, (tp, pp) in coordinates.items()), key=lambda r: (r[2], r[1]))


@dataclass
class GlobalState:
    """A checkpoint in TP 1 x PP 1 names: everything needed to write it again in any layout."""

    groups: list[list[str]]  # parameters per optimizer param group (decayed matrices, the rest), module order
    # "weight" (model dtype), "fp32" (master), AdamW's moments (None: zeros); mappings that may read on access
    tensors: dict[str, Optional[Mapping[str, torch.Tensor]]]
    extra_state: OrderedDict[str, object]  # module state entries that are not parameters (`_extra_state`)
    step: Optional[torch.Tensor]  # AdamW's step count (one value for every partition)
    group_hparams: list[dict]  # each param group's hyperparameters (lr, betas, eps, weight_decay, ...)
    zero_meta: dict  # the ZeRO file's other entries (loss scaler, clip_grad, stage, version) and its name prefix
    model_meta: dict  # the other entries of DeepSpeed's model-states file

    @property
    def optimizer_kinds(self) -> list[str]:
        return [kind for kind in self.tensors if kind != "weight"]


def _load(path: Path, hint: str = "", verify: bool = False):
    """DeepSpeed's files, weights_only with DeepSpeed's own classes (loss scaler, fragment addresses) allowed;
    mmap keeps the tensors on disk until a slice of them is needed. verify: against the marker's checksum first
    (the model files were, by read_model_checkpoint)."""
    if not path.is_file():
        raise ReshardError(f"checkpoint file {str(path)!r} is missing" + (f"; {hint}" if hint else ""))
    if verify and (problem := one_file_problem(path)):
        raise ReshardError(f"checkpoint {path.parent} is damaged: {problem}")
    try:
        return load_deepspeed_file(path, mmap=True)
    except CheckpointIntegrityError as err:
        raise ReshardError(str(err)) from None


def zero_file_prefix(ckpt: Path) -> str:
    """'' or 'bf16_': DeepSpeed names ZeRO files after the engine's bf16 mode."""
    for prefix in ("", "bf16_"):
        if (ckpt / ZERO_FILE.format(prefix=prefix, dp=0, mp=0)).exists():
            return prefix
    raise ReshardError(f"checkpoint {str(ckpt)!r} has no ZeRO optimizer file "
                       f"({ZERO_FILE.format(prefix='', dp=0, mp=0)}); {OPTIMIZER_HINT}")


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class RankFiles:
    """What one model-parallel rank saved besides its weights, in its local names (metadata: no tensor is read)."""

    groups: list[list[str]]  # parameter names per param group, as DeepSpeed flattened them
    shapes: dict[str, tuple[int, torch.Size]]  # local name -> (param group, shape)
    extra_state: dict  # module entries that are not parameters
    kinds: list[str]  # the optimizer state kinds of its ZeRO files (fp32, exp_avg, ...)
    steps: list[torch.Tensor]
    group_hparams: list[dict]
    zero_meta: dict
    model_meta: dict


def _gather(zero_states: list[dict], group: int, shapes: dict, flat_of: Callable[[dict], torch.Tensor],
            what: str) -> dict[str, torch.Tensor]:
    """Each parameter of one param group, reassembled from its fragments in the DP partitions (in DP order)."""
    out = {}
    for name, shape in shapes.items():
        pieces = [flat_of(sd).narrow(0, address.start, address.numel) for sd in zero_states
                  if (address := sd["param_slice_mappings"][group].get(name)) is not None]
        flat = torch.cat(pieces) if pieces else torch.empty(0)  # a copy: nothing of the mapped files is kept
        if flat.numel() != math.prod(shape):
            raise ReshardError(f"{what} of {name}: the ZeRO partitions hold {flat.numel()} of {math.prod(shape)} "
                               f"elements; {OPTIMIZER_HINT}")
        out[name] = flat.view(shape)
    return out


ZERO_META = ("loss_scaler", "dynamic_loss_scale", "clip_grad", "zero_stage", "ds_version")


def read_rank(ckpt: Path, mp: int, data: int, zero_prefix: Optional[str]) -> RankFiles:
    """One model-parallel rank's parameter groups and extra state, and (unless zero_prefix is None) what its
    `data` ZeRO partitions say about the optimizer (checked against their checksums; the tensors stay on disk)."""
    model_file = ckpt / MODEL_FILE.format(mp=mp)
    model_states = _load(model_file)
    shapes = model_states["param_shapes"]
    params = {name for group in shapes for name in group}
    extra = {k: v for k, v in model_states["module"].items() if k not in params}
    if any(torch.is_tensor(v) for v in extra.values()):
        raise ReshardError(f"{model_file}: module entries {[k for k, v in extra.items() if torch.is_tensor(v)]} are "
                           f"tensors but not parameters; this tool does not know how to place them")
    rank = RankFiles(groups=[list(group) for group in shapes], extra_state=extra, kinds=[], steps=[], group_hparams=[],
                     shapes={name: (g, shape) for g, group in enumerate(shapes) for name, shape in group.items()},
                     zero_meta={}, model_meta={k: v for k, v in model_states.items() if k != "module"})
    del model_states
    if zero_prefix is None:
        return rank
    files = [ckpt / ZERO_FILE.format(prefix=zero_prefix, dp=d, mp=mp) for d in range(data)]
    states = [_load(f, OPTIMIZER_HINT, verify=True)["optimizer_state_dict"] for f in files]
    base = states[0]["base_optimizer_state"]
    if not isinstance(base, dict) or "state" not in base:
        raise ReshardError(f"{files[0]}: the ZeRO state is in DeepSpeed's elastic format, which this tool does not "
                           f"read; {OPTIMIZER_HINT}")
    if any(any(group) for group in states[0].get("param_alignment_paddings", [])):
        raise ReshardError(f"{files[0]}: ZeRO parameter alignment padding is not supported; {OPTIMIZER_HINT}")
    rank.zero_meta = dict({k: states[0][k] for k in ZERO_META if k in states[0]}, prefix=zero_prefix)
    rank.kinds = ["fp32"]
    for g, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():  # every element in some partition (the tensors are read later)
            held = sum(address.numel for sd in states if (address := sd["param_slice_mappings"][g].get(name)))
            if held != math.prod(shape):
                raise ReshardError(f"fp32 weights of {name}: the ZeRO partitions hold {held} of {math.prod(shape)} "
                                   f"elements; {OPTIMIZER_HINT}")
        for key, value in base["state"][g].items():
            if key == "step":
                rank.steps += [sd["base_optimizer_state"]["state"][g]["step"].clone() for sd in states]
            elif torch.is_tensor(value) and value.dim() == 1:
                rank.kinds += [key] if key not in rank.kinds else []
            else:
                raise ReshardError(f"{files[0]}: optimizer state {key!r} of param group {g} is not AdamW's; "
                                   f"{OPTIMIZER_HINT}")
        rank.group_hparams.append({k: v for k, v in base["param_groups"][g].items() if k != "params"})
    return rank


class OptimizerTensors(ReadOnAccess):
    """One kind of optimizer state ("fp32" master weights, AdamW's "exp_avg", "exp_avg_sq") in global names, read
    on access: each access maps the ZeRO files of the tensor's model-parallel ranks, gathers its fragments (the
    same split rule as the weights joins the TP pieces) and unmaps them again."""

    _index = "where"  # the names, in order

    def __init__(self, ckpt: Path, kind: str, prefix: str, partitions: int, tensor: int, gated: bool,
                 where: dict[str, list[tuple[int, int, str, torch.Size]]]):
        self.ckpt, self.kind, self.prefix, self.partitions, self.tensor, self.gated = (
            ckpt, kind, prefix, partitions, tensor, gated)
        self.where = where  # global name -> [(model-parallel rank, param group, local name, shape) by TP rank]

    def __getitem__(self, name: str) -> torch.Tensor:
        per_tp = {}
        for tp, (mp, g, local, shape) in enumerate(self.where[name]):
            files = [self.ckpt / ZERO_FILE.format(prefix=self.prefix, dp=d, mp=mp) for d in range(self.partitions)]
            states = [_load(f)["optimizer_state_dict"] for f in files]
            if self.kind == "fp32":
                flat_of = lambda sd: sd["single_partition_of_fp32_groups"][g]  # noqa: E731
            else:
                flat_of = lambda sd: sd["base_optimizer_state"]["state"][g][self.kind]  # noqa: E731
            per_tp[tp] = _gather(states, g, {local: shape}, flat_of, self.kind)[local]
            del states
        return _join(name, per_tp, self.tensor, self.gated)


def read_global_state(model: ModelCheckpoint, with_optimizer: bool = True,
                      log: Callable[[str], None] = print) -> GlobalState:
    """A checkpoint's weights (read by `read_model_checkpoint`) and its optimizer state in global (TP 1 x PP 1)
    names, read tensor by tensor when the writer asks for them: stages renumbered, TP shards joined; with tied
    embeddings and PP > 1 the last stage's copy of the embeddings is left out (it equals them)."""
    ckpt, cfg, layout = model.path, model.config, model.layout
    zero_prefix = zero_file_prefix(ckpt) if with_optimizer else None
    groups: list[list[str]] = []
    where: dict[str, dict[int, tuple]] = {}  # global name -> {TP rank: (mp, group, local, shape)}
    extra: OrderedDict = OrderedDict()
    steps: list[torch.Tensor] = []
    first: Optional[RankFiles] = None
    for mp, tp, pp in ranks_by_stage(layout):
        log(f"  reading model-parallel rank {mp} (TP rank {tp}, PP stage {pp})"
            + (f" and its {layout.zero_partitions} ZeRO partition(s)" if with_optimizer else ""))
        rank = read_rank(ckpt, mp, layout.zero_partitions, zero_prefix)
        first = first or rank
        def to_global(local: str, pp: int = pp) -> str:
            return stage_global_name(local, cfg.model.num_layers, layout.pipeline, layout.virtual_pipeline, pp)

        rename = {local: to_global(local) for group in rank.groups for local in group}
        keep = [local for local, name in rename.items() if not (cfg.model.tie_embeddings and name == TIED_OUTPUT)]
        if tp == 0:  # each stage's parameters, appended stage by stage: module order within every group
            for g, group in enumerate(rank.groups):
                groups.extend([] for _ in range(g + 1 - len(groups)))
                groups[g] += [rename[local] for local in group if local in keep]
        for local in keep:
            group, shape = rank.shapes[local]
            where.setdefault(rename[local], {})[tp] = (mp, group, local, shape)
        extra.update((to_global(k), v) for k, v in rank.extra_state.items())
        steps += rank.steps
    groups = [sorted(group, key=global_order) for group in groups]  # stages hold interleaved chunks of layers
    if sorted(name for group in groups for name in group) != sorted(model.state_dict):
        raise ReshardError(f"checkpoint {str(ckpt)!r}: the parameter groups in the model files do not list the "
                           f"model's parameters")
    gated = cfg.model.activation == "swiglu"
    by_tp = {name: [per_tp[t] for t in range(layout.tensor)] for name, per_tp in where.items()}
    tensors: dict[str, Mapping] = {"weight": model.state_dict}
    step = None
    if with_optimizer:
        tensors.update((kind, OptimizerTensors(ckpt, kind, zero_prefix, layout.zero_partitions, layout.tensor,
                                               gated, by_tp)) for kind in first.kinds)
        if not steps or any(float(s) != float(steps[0]) for s in steps):
            raise ReshardError(f"{ckpt}: the ZeRO partitions disagree on AdamW's step count "
                               f"({sorted({float(s) for s in steps})}); {OPTIMIZER_HINT}")
        step = steps[0].clone()
    return GlobalState(groups=groups, tensors=tensors, extra_state=extra, step=step,
                       group_hparams=first.group_hparams, zero_meta=first.zero_meta, model_meta=first.model_meta)


def _join(name: str, per_tp: dict[int, torch.Tensor], tensor: int, gated: bool) -> torch.Tensor:
    """The optimizer's tensors follow the weights: the same split rule (`tensor_parallel_dim`)."""
    pieces = [per_tp[t] for t in range(tensor)]
    dim = tensor_parallel_dim(name)
    return pieces[0] if dim is None else join_shards(pieces, dim, is_gated_fc1(name, gated))


# ------------------------------------------------------------------------------------------------ writing


def placement(name: str, num_layers: int, pipeline: int, virtual: int = 1) -> tuple[int, int]:
    """(pipeline stage, model chunk) holding a global parameter (Megatron-core's even split of the layers)."""
    layer = layer_index(name)
    if layer is not None:
        stage, chunk, _ = layer_placement(layer, num_layers, pipeline, virtual)
        return stage, chunk
    if name.startswith("embedding."):
        return 0, 0
    if name.startswith(("decoder.final_layernorm.", "output_layer.")):
        return pipeline - 1, virtual - 1
    raise ReshardError(f"{name}: not an embedding, layer, final norm or output layer parameter; "
                       f"cannot tell which pipeline stage holds it")


def global_order(name: str) -> tuple:
    """Module order of a TP 1 x PP 1 GPTModel (embeddings, layers, final norm, output layer); a stable sort by it
    keeps the order inside each layer. Every stage's and chunk's parameters are a subsequence of it."""
    layer = layer_index(name)
    if layer is not None:
        return (1, layer)
    return (0,) if name.startswith("embedding.") else (2,) if name.startswith("decoder.") else (3,)


def local_name(name: str, num_layers: int, pipeline: int, virtual: int) -> str:
    """The name of global parameter `name` in its stage's model file ("<chunk>." in front with V > 1 chunks)."""
    stage, chunk = placement(name, num_layers, pipeline, virtual)
    local = global_name(name, -uniform_layer_offset(num_layers, pipeline, virtual, stage, chunk))
    return f"{chunk}.{local}" if virtual > 1 else local


def stage_groups(state: GlobalState, cfg: RunConfig, layout: CheckpointLayout,
                 pp: int) -> list[list[tuple[str, str]]]:
    """[(local name, global source)] per param group of one new pipeline stage, in DeepSpeed's flattening order
    (the module order: chunk by chunk, each in global order)."""
    num_layers, pipeline, virtual = cfg.model.num_layers, layout.pipeline, layout.virtual_pipeline
    groups = [[(local_name(n, num_layers, pipeline, virtual), n) for n in group
               if placement(n, num_layers, pipeline, virtual)[0] == pp] for group in state.groups]
    if cfg.model.tie_embeddings and pipeline > 1 and pp == pipeline - 1:
        # the last stage's own copy, registered last in (the last chunk of) GPTModel
        groups[0].append((f"{virtual - 1}.{TIED_OUTPUT}" if virtual > 1 else TIED_OUTPUT, EMBEDDING))
    return [groups[0]] + [g for g in groups[1:] if g]  # as optimizer.param_groups: no empty no-decay group


def _shard(full: torch.Tensor, source: str, tensor: int, tp: int, gated: bool) -> torch.Tensor:
    """This TP rank's piece of a global tensor, in storage of its own (torch.save writes a view's whole storage)."""
    dim = tensor_parallel_dim(source)
    if dim is None:
        return full.clone()
    return split_shard(full, dim, tensor, tp, is_gated_fc1(source, gated)).clone()


def _partition(values: Optional[Mapping], group: list[tuple[str, str]], sizes: list[int], start: int, size: int,
               shard: Callable[[Mapping, str], torch.Tensor]) -> torch.Tensor:
    """Elements [start, start + size) of one param group's flat fp32 buffer (its parameters' shards one after the
    other, zeros past the end): one DP rank's ZeRO partition, built from the shards that overlap it. `values`
    None: all zeros (fresh AdamW moments)."""
    part = torch.zeros(size, dtype=torch.float32)
    offset = 0
    for (_, source), numel in zip(group, sizes):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if values is not None and lo < hi:
            part[lo - start:hi - start] = shard(values, source).reshape(-1)[lo - offset:hi - offset]
        offset += numel
    return part


def partition_size(numel: int, data: int) -> int:
    """DeepSpeed ZeRO-1/2's partition of a param group's flat buffer: zero-padded to a multiple of 2 x DP (its
    `nccl_start_alignment_factor` x DP), then DP equal parts."""
    return math.ceil(numel / (2 * data)) * 2


def _slice_mappings(sizes: list[tuple[str, int]], part_start: int, part_size: int) -> OrderedDict:
    """Where each parameter's fragment lies in one partition, as DeepSpeed records it (`param_slice_mappings`)."""
    from deepspeed.utils.tensor_fragment import fragment_address

    mapping, offset = OrderedDict(), 0
    for name, numel in sizes:
        start, end = max(offset, part_start), min(offset + numel, part_start + part_size)
        if start < end:
            mapping[name] = fragment_address(numel=end - start, start=start - part_start)
        offset += numel
    return mapping


def zero_file(state: GlobalState, dp: int, data: int, groups: list[list[tuple[str, str]]],
              sizes: list[list[int]], shard: Callable[[Mapping, str], torch.Tensor], ds_config: dict) -> dict:
    """The ZeRO file of DP rank `dp` of one model-parallel rank: its flat fp32 partitions, moments, step."""
    meta = state.zero_meta
    fp32, paddings, mappings, group_states = [], [], [], {}
    for g, group in enumerate(groups):
        numel, part_size = sum(sizes[g]), partition_size(sum(sizes[g]), data)
        start = dp * part_size
        padding = min(part_size, max(0, (dp + 1) * part_size - numel))  # zeros at the end of the buffer
        parts = {kind: _partition(state.tensors[kind], group, sizes[g], start,
                                  part_size - padding if kind == "fp32" else part_size, shard)
                 for kind in state.optimizer_kinds}  # fp32: saved without the padding, the moments with it
        fp32.append(parts["fp32"])
        paddings.append(padding)
        mappings.append(_slice_mappings([(local, n) for (local, _), n in zip(group, sizes[g])], start, part_size))
        group_states[g] = {"step": state.step.clone(),
                           **{kind: parts[kind] for kind in state.optimizer_kinds if kind != "fp32"}}
    optimizer_state = {
        "loss_scaler": meta["loss_scaler"], "dynamic_loss_scale": meta["dynamic_loss_scale"],
        "overflow": False, "clip_grad": meta["clip_grad"],
        "base_optimizer_state": {
            "state": group_states,
            "param_groups": [dict(state.group_hparams[g], params=[g]) for g in range(len(groups))]},
        "single_partition_of_fp32_groups": fp32, "zero_stage": meta["zero_stage"], "group_paddings": paddings,
        "param_alignment_paddings": [[0] * len(group) for group in groups],
        "partition_count": [data] * len(groups), "ds_version": meta["ds_version"],
        "param_slice_mappings": mappings,
    }
    return {"optimizer_state_dict": optimizer_state, "ds_config": ds_config, "ds_version": meta["ds_version"]}


def write_rank(state: GlobalState, cfg: RunConfig, layout: CheckpointLayout, mp: int, tp: int, pp: int,
               out: Path) -> None:
    """DeepSpeed's model-states file of one new model-parallel rank, then (unless the state holds weights only)
    the ZeRO file of each of its DP ranks; each file is built from the global tensors it needs, written, and let
    go before the next."""
    gated = cfg.model.activation == "swiglu"
    tensor, pipeline, data = layout.tensor, layout.pipeline, layout.data
    partitions = layout.zero_partitions  # DeepSpeed's data-parallel group is DP x CP
    groups = stage_groups(state, cfg, layout, pp)

    def shard(values: Mapping, source: str) -> torch.Tensor:
        return _shard(values[source], source, tensor, tp, gated)

    virtual = layout.virtual_pipeline
    module = OrderedDict((local, shard(state.tensors["weight"], source)) for group in groups for local, source in group)
    module.update((local_name(k, cfg.model.num_layers, pipeline, virtual), v) for k, v in state.extra_state.items()
                  if placement(k, cfg.model.num_layers, pipeline, virtual)[0] == pp)
    sizes = [[module[local].numel() for local, _ in group] for group in groups]
    ds_config = copy.deepcopy(state.model_meta.get("ds_config") or {})
    if ds_config:
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train.global_batch_size // data
        if "reduce_bucket_size" in ds_config.get("zero_optimization", {}):  # sized to this rank's parameters
            ds_config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(sum(map(sum, sizes)))
    model_states = {k: v for k, v in state.model_meta.items() if k not in ("module", "trainer")}
    model_states.update(
        module=module, param_shapes=[OrderedDict((local, module[local].shape) for local, _ in g) for g in groups],
        dp_world_size=partitions, mp_world_size=tensor * pipeline, ds_config=ds_config,
        checkpoint_parallel_dimensions={"pp_degree": pipeline, "tp_degree": tensor})
    torch.save(model_states, out / MODEL_FILE.format(mp=mp))
    del module, model_states
    if not state.optimizer_kinds:
        return
    for dp in range(partitions):
        torch.save(zero_file(state, dp, partitions, groups, sizes, shard, ds_config),
                   out / ZERO_FILE.format(prefix=state.zero_meta["prefix"], dp=dp, mp=mp))


def write_checkpoint(state: GlobalState, cfg: RunConfig, layout: CheckpointLayout, out: Path, tag: str,
                     trainer_state: dict, note: dict, log: Callable[[str], None] = print,
                     scripts_from: Optional[Path] = None) -> Path:
    """A complete checkpoint root `out` (`tag`/ with every rank's files, `complete`, `latest`) from global state;
    `note` goes into resharded.json (the marker that the run seeds its RNG streams from train.seed)."""
    iter_dir = out / tag
    step = int(trainer_state["step"])
    iter_dir.mkdir(parents=True)
    try:
        for mp, tp, pp in ranks_by_stage(layout):
            log(f"  writing model-parallel rank {mp} (TP rank {tp}, PP stage {pp}) and {layout.zero_partitions} "
                f"ZeRO partition(s)")
            write_rank(state, cfg, layout, mp, tp, pp, iter_dir)
        save_durable(trainer_state, iter_dir / TRAINER_STATE)
        save_config(cfg, iter_dir / "config.yaml")
        write_layout(iter_dir, layout, step)
        (iter_dir / RESHARDED).write_text(json.dumps(dict(
            note, rng="not carried over: the resumed run keeps the streams it seeds from train.seed"), indent=1) + "\n")
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's recovery scripts, as it leaves them
            if scripts_from is not None and (scripts_from / script).is_file():
                shutil.copy(scripts_from / script, out / script)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    mark_complete(iter_dir, step)  # durable before the marker, as the trainer's saves are
    write_atomic(out / LATEST, tag + "\n")
    return iter_dir


# ------------------------------------------------------------------------------------------------ the tool


def vocab_divisor(cfg: RunConfig, padded_old: int, tensor: int) -> int:
    """A `model.make_vocab_size_divisible_by` that gives the new TP size the checkpoint's padded vocabulary."""
    vocab = cfg.model.vocab_size
    if vocab is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        vocab = tokenizer_vocab_size(cfg.data.tokenizer)
    divisor = cfg.model.make_vocab_size_divisible_by
    if vocab is not None and padded_vocab_size(vocab, tensor, divisor) == padded_old:
        return divisor
    if padded_old % tensor:
        raise ReshardError(f"the checkpoint's padded vocabulary ({padded_old} rows) cannot be split over "
                           f"{tensor} tensor-parallel ranks")
    return padded_old // tensor  # then padded_vocab_size(v, tensor, divisor) = padded_old for any v <= padded_old


def check_new_layout(cfg: RunConfig, layout: CheckpointLayout) -> None:
    """The config's own rules for the new layout (heads and groups % TP, layers % PP, batch % DP, ZeRO-2 and PP).

    Data files, the tokenizer and the resume path are not needed to rewrite a checkpoint, so they are not checked.
    """
    try:
        check_values(cfg, layout.world_size)
    except ConfigError as err:
        raise ReshardError(f"the layout {layout.describe()} is not valid for this run: {err}") from None


def new_layout(src: CheckpointLayout, tensor: int, pipeline: int, data_parallel: Optional[int] = None,
               world_size: Optional[int] = None, virtual_pipeline: int = 1,
               context: Optional[int] = None) -> CheckpointLayout:
    """CP: context, else the source's. DP: data_parallel, else world_size / (TP x CP x PP), else the source's
    world size / (TP x CP x PP)."""
    context = context or src.context
    if data_parallel is None:
        total = world_size or src.world_size
        if total % (tensor * context * pipeline):
            cp = f" x CP {context}" if context > 1 else ""
            raise ReshardError(f"world size {total} is not divisible by TP {tensor}{cp} x PP {pipeline}; "
                               f"give --data-parallel or --world-size")
        data_parallel = total // (tensor * context * pipeline)
    return CheckpointLayout(tensor * context * pipeline * data_parallel, tensor, pipeline, data_parallel,
                            src.zero_stage, virtual_pipeline=virtual_pipeline, context=context)


def reshard(checkpoint: str | Path, out: str | Path, tensor: int, pipeline: int, data_parallel: Optional[int] = None,
            world_size: Optional[int] = None, reset_optimizer: bool = False,
            log: Callable[[str], None] = print, virtual_pipeline: int = 1, context: Optional[int] = None) -> Path:
    """Write the checkpoint `checkpoint` (an iter_* directory, a checkpoint root or a run directory) for
    TP `tensor` x CP `context` (default: the checkpoint's) x PP `pipeline` (x VP `virtual_pipeline` model
    chunks per stage) x DP into `out`, a new checkpoint root (iter_*, `complete`, `latest`);
    return the new iteration directory."""
    out = Path(out)
    if out.exists():
        raise ReshardError(f"--out {out} already exists; choose a new directory (nothing was written)")
    model = read_model_checkpoint(checkpoint)  # verifies the files it reads; the ZeRO files are verified in read_rank
    ckpt, cfg, src = model.path, model.config, model.layout
    new = new_layout(src, tensor, pipeline, data_parallel, world_size, virtual_pipeline, context)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.parallel.tensor, new_cfg.parallel.pipeline, new_cfg.parallel.context = tensor, pipeline, new.context
    new_cfg.parallel.virtual_pipeline = virtual_pipeline
    check_new_layout(new_cfg, new)
    log(f"fpa-reshard: {ckpt} (step {model.step}, {model.consumed_samples} samples consumed): "
        f"{src.describe()} -> {new.describe()}")

    if weights_only(ckpt) and not reset_optimizer:  # fpa-import's: no optimizer state to carry
        log("  the checkpoint holds weights only (fpa-import): writing it with a fresh AdamW state")
        reset_optimizer = True
    state = read_global_state(model, with_optimizer=not reset_optimizer, log=log)
    if reset_optimizer:
        log("  --reset-optimizer: AdamW restarts from these weights (moments 0, step 0)")
        reset_optimizer_state(state, cfg)
    new_cfg.model.make_vocab_size_divisible_by = vocab_divisor(cfg, model.padded_vocab_size, tensor)

    note = {"source": str(ckpt.resolve()), "from": asdict(src), "to": asdict(new), "reset_optimizer": reset_optimizer}
    iter_dir = write_checkpoint(state, new_cfg, new, out, ckpt.name, model.trainer_state, note, log,
                                scripts_from=ckpt.parent)

    overrides = [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}"]
    if virtual_pipeline != cfg.parallel.virtual_pipeline:
        overrides.append(f"parallel.virtual_pipeline={virtual_pipeline}")
    if new.context != src.context or new.context > 1:
        overrides.append(f"parallel.context={new.context}")
    if new_cfg.model.make_vocab_size_divisible_by != cfg.model.make_vocab_size_divisible_by:
        overrides.append(f"model.make_vocab_size_divisible_by={new_cfg.model.make_vocab_size_divisible_by}")
        log(f"  the padded vocabulary keeps its {model.padded_vocab_size} rows: model.make_vocab_size_divisible_by="
            f"{new_cfg.model.make_vocab_size_divisible_by} (also in {iter_dir / 'config.yaml'})")
    log(f"done: {iter_dir}\nresume on {new.world_size} rank(s) with: fpa-train --config <your config> "
        + " ".join(overrides) + f" checkpoint.resume={out}")
    return iter_dir


def reset_optimizer_state(state: GlobalState, cfg: RunConfig) -> None:
    """--reset-optimizer: fp32 master = the weights, moments 0, step 0, as a new torch AdamW from the config;
    loss scaling and clipping as DeepSpeed sets them for this config."""
    import deepspeed
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    o = cfg.optimizer
    # fp32 master weights = the weights (each partition is built in float32 from them), moments 0 (None: zeros)
    state.tensors = {"weight": state.tensors["weight"], "fp32": state.tensors["weight"], "exp_avg": None,
                     "exp_avg_sq": None}
    state.step = torch.tensor(0.0)
    state.group_hparams = [
        {k: v for k, v in torch.optim.AdamW([torch.zeros(1)], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                            weight_decay=decay, foreach=False).param_groups[0].items() if k != "params"}
        for decay in (o.weight_decay, 0.0)]  # as optimizer.param_groups: decayed matrices, then the rest
    state.zero_meta = {"loss_scaler": LossScaler(scale=1.0), "dynamic_loss_scale": False, "clip_grad": o.grad_clip,
                       "zero_stage": ZeroStageEnum(o.zero_stage), "ds_version": deepspeed.__version__,
                       "prefix": "bf16_" if cfg.model.dtype == "bf16" else ""}
