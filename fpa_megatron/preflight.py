"""Validate a RunConfig against the world size before any process group starts.

`check_config(cfg, world_size)` raises `ConfigError` naming the key and the bad value at the first problem: the
pure rules (rules.py: ranges, layout arithmetic, batch, ZeRO stage, ...), then what needs this machine and the
files (the Triton kernel's CUDA, the checkpoint to resume and its layout, the tokenizer, the data files,
checkpoint.init_from). Otherwise it returns the derived layout (`ResolvedLayout`): data-parallel size,
micro-batches per step, vocabulary sizes. It does not modify the config.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from fpa_megatron.checkpoint.format import TRAINER_STATE, load_trusted, weights_only
from fpa_megatron.checkpoint.layout import CheckpointLayout, check_layout
from fpa_megatron.checkpoint.lineage import checkpoint_root, resolve_resume
from fpa_megatron.checkpoint.reader import check_init_from
from fpa_megatron.config import ConfigError, RunConfig
from fpa_megatron.data import mixture
from fpa_megatron.data.data_checks import check_data, excluded_samples
from fpa_megatron.rules import ResolvedLayout, check_values, resolve_layout
from fpa_megatron.run_tokenizer import tokenizer_vocab_size


def _check_triton_runs_here(cfg: RunConfig) -> None:
    m = cfg.model
    if m.attention_impl == "triton":
        if not torch.cuda.is_available():
            raise ConfigError("model.attention_impl='triton' needs a CUDA device and none is available: use 'auto' "
                              "(blockwise on CPU when the penalty is computed) or 'blockwise'")
        for module in ("triton", "fpa_megatron.attention.triton_attention"):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"model.attention_impl='triton' needs the module {module!r}, which is not "
                                  f"installed")


def _check_resume(cfg: RunConfig, world_size: int) -> None:
    """The checkpoint this run would resume from is complete and was saved in this run's layout, or in one
    that parallel.elastic rewrites (read from its layout.json, before any weight is read); a changed data
    mixture can be honoured from its data position."""
    path, _ = resolve_resume(checkpoint_root(cfg), str(cfg.checkpoint.resume))
    if path is not None and weights_only(path):
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: {path} holds weights only (an fpa-import, "
                          f"no optimizer state): start from it with checkpoint.init_from={path.parent}, or make it a "
                          f"complete checkpoint with `fpa-reshard --checkpoint {path} ... --out NEW_DIR`")
    if path is not None:
        check_layout(path, CheckpointLayout.of_run(cfg, world_size), elastic=cfg.parallel.elastic)
        _check_mixture_change(cfg, path)


def _check_mixture_change(cfg: RunConfig, path) -> None:
    """The data mixture from the checkpoint's data position on can be honoured: every dataset kept can give what
    data.weights ask of it for the rest of the run (data/mixture.py)."""
    state_file = path / TRAINER_STATE
    if cfg.data.mock or not state_file.is_file():
        return
    saved = load_trusted(state_file)
    mixture.planned(saved.get(mixture.STATE_KEY), cfg.data.prefixes, cfg.data.weights,
                    mixture.SampleOrder(excluded_samples(cfg.data.exclude_samples)), saved["consumed_samples"],
                    cfg.train.steps * cfg.train.global_batch_size)


def _check_vocab(cfg: RunConfig) -> tuple[int, Optional[int]]:
    tok_size = tokenizer_vocab_size(cfg.data.tokenizer) if cfg.data.tokenizer is not None else None
    vocab = cfg.model.vocab_size
    if vocab is None:
        if tok_size is None:
            raise ConfigError("model.vocab_size=None and data.tokenizer=None: set one of them")
        return tok_size, tok_size
    if tok_size is not None and vocab < tok_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the vocabulary of data.tokenizer="
                          f"{cfg.data.tokenizer!r} ({tok_size} pieces)")
    return vocab, tok_size


def check_config(cfg: RunConfig, world_size: int) -> ResolvedLayout:
    """Check every value of cfg for a run on world_size ranks; return the derived layout.

    Raises ConfigError (message names the key and its value) at the first problem. Touches no process group.
    """
    check_values(cfg, world_size)
    _check_triton_runs_here(cfg)
    _check_resume(cfg, world_size)
    vocab, tok_size = _check_vocab(cfg)
    check_data(cfg, tok_size or vocab)  # files, sizes and token dtype of every prefix
    if cfg.checkpoint.init_from:
        check_init_from(cfg, vocab)
    return resolve_layout(cfg, world_size, vocab, tok_size)
