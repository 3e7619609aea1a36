"""An export checks itself: the written directory, loaded back with transformers, against the checkpoint's own
Megatron model (the trainer's model code), on a fixed sample of tokens.

Both run in float32 whatever the weights' dtype (a bf16 checkpoint is compared on the same bf16-rounded
weights), so the only difference left is the order of float32 sums: far below `DEFAULT_TOLERANCE`, where a wrong
weight mapping (a transposed projection, swapped query/key heads, a missing bias) differs by O(1).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from fpa_megatron.checkpoint.megatron_lm import megatron_lm
from fpa_megatron.checkpoint.reader import ModelCheckpoint
from fpa_megatron.export.hf import load_hf

DEFAULT_TOLERANCE = 1e-3  # max |logit difference| accepted, float32 on both sides
SAMPLE_SHAPE = (2, 32)  # sequences x tokens (fewer tokens when the model's sequence is shorter)
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Verification:
    max_difference: float
    tolerance: float
    tokens: tuple[int, int]

    @property
    def ok(self) -> bool:
        return self.max_difference <= self.tolerance  # a NaN difference is never ok

    def describe(self) -> str:
        verdict = "<=" if self.ok else ">"
        return (f"logits of the transformers model vs the checkpoint's own model on a fixed sample of "
                f"{self.tokens[0]} x {self.tokens[1]} tokens: max |difference| {self.max_difference:.2e} "
                f"{verdict} {self.tolerance:.0e}")


def sample_tokens(vocab_size: int, seq_length: int) -> torch.Tensor:
    """The fixed sample: uniform token ids from a seeded generator, the same for every export."""
    batch, length = SAMPLE_SHAPE[0], min(SAMPLE_SHAPE[1], seq_length)
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(SAMPLE_SEED))


def verify_export(ckpt: ModelCheckpoint, exported_dir: Path, tolerance: float = DEFAULT_TOLERANCE) -> Verification:
    """Compare the logits of `exported_dir` (as transformers reads it) with the checkpoint's model."""
    vocab = json.loads((Path(exported_dir) / "config.json").read_text())["vocab_size"]
    return compare_logits(lambda: load_hf(exported_dir).model, vocab, ckpt, tolerance)


def compare_logits(load_hf_model: Callable[[], object], hf_vocab_size: int, ckpt: ModelCheckpoint,
                   tolerance: float = DEFAULT_TOLERANCE) -> Verification:
    """A transformers model (built by `load_hf_model`) against a checkpoint's own model, float32 both, over the
    vocabulary both have (an import checks itself the other way round with this too). One model at a time: the
    checkpoint's is built, run and freed before the transformers model is loaded, so the check holds one float32
    copy of the model (4 bytes per parameter) plus the sample's activations."""
    fp32 = replace(ckpt, config=copy.deepcopy(ckpt.config))
    fp32.config.model.dtype = "fp32"  # the checkpoint's weights (bf16-rounded if so) in a float32 model
    vocab = min(hf_vocab_size, ckpt.config.model.vocab_size or ckpt.padded_vocab_size)
    tokens = sample_tokens(vocab, ckpt.config.model.seq_length)
    with megatron_lm(fp32) as lm:
        reference = lm.logits(tokens)[..., :vocab]
    del lm
    hf = load_hf_model().float().eval()
    with torch.no_grad():
        exported = hf(tokens).logits.float()[..., :vocab]
    del hf
    difference = (exported - reference).abs().max().item()
    return Verification(difference if torch.isfinite(exported).all() else float("nan"), tolerance,
                        tuple(tokens.shape))
