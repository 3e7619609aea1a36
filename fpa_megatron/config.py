"""One config system: YAML files mapped onto dataclasses, `key.sub=value` overrides, unknown keys rejected.

`load_config(path, overrides)` builds a `RunConfig`; `fpa_megatron.preflight.check_config` validates it
before any process group starts; `save_config` writes the resolved config next to a run.

A string field keeps its value as written: YAML 1.1 would read `run_name: off` as False, `1_000` as 1000,
`2024-01-01` as a date, so files and overrides are read with `TextKeepingLoader`, which keeps every plain
scalar's text next to what YAML made of it (`Scalar`); str fields take the text, typed fields the YAML value.
Only null / ~ / an empty value make an Optional[str] field None.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key and the value."""


class Scalar(str):
    """A plain YAML scalar: its text as written (the str) and what YAML 1.1 resolved it to (`.value`)."""

    value: Any


class TextKeepingLoader(yaml.SafeLoader):
    """SafeLoader whose plain booleans, numbers and timestamps come back as `Scalar`s (text + YAML value)."""


def _keep_text(loader: TextKeepingLoader, node: yaml.ScalarNode, constructor) -> Scalar:
    scalar = Scalar(node.value)
    scalar.value = constructor(loader, node)
    return scalar


for _tag, _constructor in dict(yaml.SafeLoader.yaml_constructors).items():
    if _tag and _tag.rsplit(":", 1)[-1] in ("bool", "int", "float", "timestamp"):
        TextKeepingLoader.add_constructor(_tag, lambda loader, node, c=_constructor: _keep_text(loader, node, c))


def load_yaml(text: str) -> Any:
    """YAML with plain scalars' text kept (TextKeepingLoader)."""
    return yaml.load(text, Loader=TextKeepingLoader)


def _typed(value: Any) -> Any:
    """What YAML made of a value (lists element-wise), for fields that are not strings."""
    if isinstance(value, Scalar):
        return value.value
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, dict):
        return {_typed(k): _typed(v) for k, v in value.items()}
    return value


@dataclass
class ModelConfig:
    """GPT shape and options (Megatron-core GPTModel with the penalized attention spec)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA: key/value heads; None = num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # None = seq_length
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 128  # vocabulary padded to a multiple of this x parallel.tensor
    position_embedding: str = "rope"  # rope | learned
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    activation: str = "gelu"  # gelu (exact, erf) | gelu_tanh (GPT-2's tanh approximation) | swiglu
    norm_epsilon: float = 1e-5  # the epsilon of every LayerNorm / RMSNorm
    rotary_base: float = 10000.0  # rotary position embedding base (theta); LLaMA 3 uses 500000
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    recompute: str = "none"  # none | selective | full
    dtype: str = "fp32"  # fp32 | bf16
    # auto: the fastest exact kernel per call (SDPA without penalty; with it, blockwise on CPU, Triton on CUDA)
    # | eager (the reference, S x S; attention dropout / custom masks) | blockwise | triton (CUDA)
    attention_impl: str = "auto"
    attention_block_size: int = 64  # query rows per block of the blockwise attention (keys: tiles of 2048)
    qk_layernorm: bool = False  # normalize queries and keys per head before the scores (Megatron's qk_layernorm)


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel = world_size / (tensor * context * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1  # context parallelism: each sequence split over this many ranks (2 x context chunks)
    sequence_parallel: bool = False  # Megatron's sequence parallelism inside the TP group (needs tensor > 1)
    virtual_pipeline: int = 1  # model chunks per pipeline stage (the interleaved 1F1B schedule; needs pipeline > 1)
    # Resume a checkpoint saved with another data-parallel size (a job whose node count changed: torchrun
    # --nnodes MIN:MAX; launch/torchrun.sh sets it for such a range) by rewriting its ZeRO partitions for this
    # world size; the global batch is kept by more or fewer micro-batches. Off: such a resume is refused.
    elastic: bool = False
    # Every process group (torch's default group, Megatron's TP/PP/DP groups) gives up on a collective after
    # this long: a rank that stalls or dies makes the others fail with an error naming this key. Generous
    # enough for a checkpoint save or rank 0 building the dataset indices while the others wait.
    timeout_minutes: float = 30.0


@dataclass
class FPAConfig:
    """The attention penalty lambda_t * sum ||A||_F^2 with lambda_t = lambda0 * gamma^t."""

    enabled: bool = True
    lambda0: float = 1e-3
    gamma: float = 0.999
    min_lambda: float = 0.0  # below this lambda the penalty is not computed at all
    target: str = "probs"  # probs | logits
    normalize: str = "sum"  # sum | mean (mean divides by layers * heads * seq_length)


@dataclass
class OptimizerConfig:
    """AdamW through DeepSpeed ZeRO, linear warmup then the LR schedule, global-norm clipping, optional z-loss."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    # after the warmup: cosine (to min_lr at decay_steps) | wsd (stable, then decay to min_lr at decay_steps)
    # | constant | inverse_sqrt (lr * sqrt(warmup_steps / (t + 1)), at least min_lr)
    lr_schedule: str = "cosine"
    decay_steps: Optional[int] = None  # where the cosine / WSD decay reaches min_lr; None = train.steps
    decay_style: str = "linear"  # wsd: the decay's shape: linear | cosine | 1-sqrt
    decay_start: Optional[int] = None  # wsd: the step where the decay begins (wins over decay_fraction)
    decay_fraction: Optional[float] = None  # wsd: the decay takes this fraction of decay_steps (0 = no decay)
    grad_clip: float = 1.0  # 0 disables clipping
    zero_stage: int = 1  # 0 | 1 | 2
    z_loss: float = 0.0  # weight of the z-loss: z_loss * mean over tokens of (log Z)^2 of the output softmax; 0 = off


@dataclass
class DataConfig:
    """Megatron indexed datasets blended by weight and split train/valid/test."""

    prefixes: list[str] = field(default_factory=list)  # paths to <prefix>.bin/.idx
    weights: Optional[list] = None  # None = by size (Megatron blends prefixes in proportion to their samples)
    split: str = "98,1,1"
    tokenizer: Optional[str] = None  # sentencepiece .model, Hugging Face tokenizer.json or a directory with one
    cache_dir: Optional[str] = None  # where GPTDataset keeps its index caches
    mock: bool = False  # synthetic data (tests, benchmarks): no prefixes needed
    eod_mask_loss: bool = False  # no LM loss where the input token is EOD (Megatron-LM's --eod-mask-loss)
    # packed documents attend only to themselves (causally) and positions restart at each one; the FPA penalty
    # is then each document's own (attention/documents.py). Megatron-LM's --reset-attention-mask and
    # --reset-position-ids together, at O(S) memory and sum(len^2) work
    document_mask: bool = False
    exclude_samples: list = field(default_factory=list)  # global training sample indices never trained on, or
    # paths of the forensics files a skipped or rolled-back step wrote (<run dir>/forensics/step_*.json)
    # named validation sets, each evaluated every train.eval_interval steps (`val/<name>/loss`): name -> a prefix,
    # a list of prefixes (blended by size) or {prefixes: [...], weights: [...]}; each whole prefix is held out
    validation: dict = field(default_factory=dict)


@dataclass
class SpikeConfig:
    """Loss spikes: lm_loss above factor x the median lm_loss of the last `window` updated steps, and above that
    median by more than min_increase nats and by more than `deviations` robust standard deviations of those
    losses (training/guard.py: SpikeDetector says why each test is there).

    Checked once `min_history` steps were recorded. policy: warn (log, keep the update), skip (drop the
    update), rollback (reload the newest complete checkpoint; the batches since it are not replayed: the
    data position stays), stop (exit with code 82). A rollback with no checkpoint yet skips the step instead.
    """

    factor: float = 3.0  # a loss 3x the recent median is far outside step-to-step noise
    window: int = 100
    min_history: int = 50  # steps recorded before spikes are looked for (the first steps fall fast)
    min_increase: float = 1.0  # nats above the median, at least: near zero loss a ratio alone fires on noise
    deviations: float = 6.0  # robust standard deviations (1.4826 x MAD) above the median, at least; 0 = off
    policy: str = "rollback"  # warn | skip | rollback | stop
    max_rollbacks: int = 3  # rollbacks to the same checkpoint before the run stops (exit code 82)


@dataclass
class SlowRankConfig:
    """A slow rank: its step time (from the step's start to the end of its forward/backward) above `factor` x the
    median of the other ranks' for `steps` steps in a row names it in the log: host, rank, TP/CP/PP/DP
    (training/slow_ranks.py). The times travel in the guard's all-reduce. factor 0 or null, or steps 0: off."""

    factor: Optional[float] = 2.0  # twice the others' time is no noise; a slow GPU or host, or its data
    steps: int = 5


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps attempted = global batches consumed (skipped steps consume theirs)
    micro_batch_size: int = 4
    global_batch_size: int = 8
    # [start, increment, samples] as Megatron-LM's --rampup-batch-size: the global batch starts at `start` and
    # grows by `increment` in equal shares of `samples` consumed samples up to global_batch_size; None = off
    rampup_batch_size: Optional[list[int]] = None
    seed: int = 1234
    eval_interval: int = 50  # 0 disables validation
    eval_iters: int = 4
    exit_interval: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = never
    # A step whose loss or gradients are not finite on any rank is skipped on every rank (no update; the LR
    # and lambda schedules do not advance; the batch is consumed). More than this many skipped steps in a
    # row (non-finite, or dropped by spike.policy=skip) stop the run (exit code 81) without saving; 0 stops
    # at the first one.
    max_consecutive_skips: int = 5
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    slow_rank: SlowRankConfig = field(default_factory=SlowRankConfig)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <logging.dir>/<run name>/checkpoints
    interval: int = 0  # save every N steps; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | <path of a checkpoint directory>
    init_from: Optional[str] = None  # weights only (e.g. from fpa-import): step 0, a fresh optimizer
    interval_minutes: float = 0.0  # also save when this much wall-clock time passed since the last save; 0 = off
    save_at_end: bool = True
    async_save: bool = True  # stage to host memory at the step, write in the background (docs/checkpoints.md)


@dataclass
class WandbConfig:
    project: Optional[str] = None  # None = no W&B; a project name turns it on (pip install -e .[wandb])
    entity: Optional[str] = None
    mode: str = "offline"  # offline (no network; `wandb sync` later) or online
    dir: Optional[str] = None  # where W&B writes its files; None = the run directory


@dataclass
class LoggingConfig:
    dir: str = "runs"
    run_name: Optional[str] = None  # None = the config file's stem (null, ~ or empty; any other value is its text)
    interval: int = 10
    tensorboard: bool = True
    heatmap_interval: int = 0  # per-layer penalty + [layers x heads] heatmap every N steps; 0 = logging.interval
    attention_stats_interval: int = 100  # attention collision/entropy/max logit on one no-grad micro-batch every N steps; 0 = off
    peak_tflops: float = 989.0  # per device, for MFU (H100/H200 bf16 dense)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ProfilingConfig:
    start_step: int = 0  # the first step traced with torch.profiler; 0 = off
    steps: int = 1  # how many steps are traced
    ranks: list = field(default_factory=lambda: [0])  # the global ranks that trace
    memory: bool = False  # also memory: a CUDA allocator snapshot on GPU, the CPU memory profile on CPU
    dir: Optional[str] = None  # where the traces go; None = <run dir>/profile


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fpa: FPAConfig = field(default_factory=FPAConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the key.

    A str field takes a Scalar's text; every other type takes what YAML resolved (see the module doc)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (args[0] is not str and isinstance(value, str)
                             and value.lower() in ("null", "none", "~")):
            return None
        hint = args[0]
    if hint in ("list", list) or typing.get_origin(hint) is list:
        if isinstance(value, str) and not isinstance(value, Scalar):
            value = load_yaml(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_typed(value)!r}")
        item = (typing.get_args(hint) or (Any,))[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)  # a Scalar: the text as written
    value = _typed(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    return value


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Set dataclass fields from a nested dict; unknown keys are an error naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"{key}: unknown key (known keys: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return tree


def config_from_dict(values: dict, overrides: Optional[list[str]] = None) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, values or {})
    _apply(cfg, parse_overrides(overrides or []))
    return cfg


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML file (or nothing: the defaults) and apply `key.sub=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    cfg = config_from_dict(values, overrides)
    if cfg.logging.run_name is None and path is not None:
        cfg.logging.run_name = Path(path).stem
    return cfg


def run_dir(cfg: RunConfig) -> Path:
    """Where a run writes its logs, config and (by default) checkpoints: <logging.dir>/<run name>."""
    return Path(cfg.logging.dir) / (cfg.logging.run_name or "run")


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config; `load_config` of the file gives back an equal RunConfig."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
