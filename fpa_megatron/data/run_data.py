"""A run's data from its config: the training order, the validation split, the named validation sets (`RunData`),
and the training dataset at the resume position (`training_mixture`: Megatron's blend, or the mixture that
continues after a change of data.prefixes / data.weights, data/mixture.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fpa_megatron.config import RunConfig
from fpa_megatron.data import mixture
from fpa_megatron.data.data_checks import excluded_samples, validation_sets
from fpa_megatron.data.datasets import build_gpt_datasets, build_tokenizer, build_validation_sets
from fpa_megatron.data.mixture import MixtureRecord, SampleOrder


@dataclass
class RunData:
    order: SampleOrder  # the training order: global sample indices without data.exclude_samples
    train: object  # Megatron's blend of the config (the training split)
    valid: object  # the blend's validation split (None without one)
    named: dict  # data.validation: name -> held-out dataset

    @classmethod
    def build(cls, cfg: RunConfig, vocab_size: int) -> "RunData":
        t, d = cfg.train, cfg.data
        eval_samples = (t.eval_iters * t.global_batch_size) if t.eval_interval > 0 else 0
        train, valid, _ = build_gpt_datasets(
            d.prefixes, d.weights, d.split, cfg.model.seq_length, t.seed,
            (t.steps * t.global_batch_size, eval_samples, 0), d.tokenizer, d.cache_dir, mock=d.mock,
            mock_vocab_size=vocab_size, eod_mask_loss=d.eod_mask_loss, document_mask=d.document_mask,
        )  # the same samples and order whatever is excluded: the excluded ones come out of the epochs' slack
        named = build_validation_sets(validation_sets(d.validation), cfg.model.seq_length, t.seed, eval_samples,
                                      build_tokenizer(d.tokenizer, vocab_size), d.cache_dir, d.eod_mask_loss,
                                      d.document_mask)
        return cls(SampleOrder(excluded_samples(d.exclude_samples)), train, valid, named)

    def training_mixture(self, cfg: RunConfig, vocab_size: int, saved: Optional[dict],
                         consumed_samples: int) -> Optional[MixtureRecord]:
        """The mixture to train on from `consumed_samples` on, given the checkpoint's record (`saved`, None for a
        fresh run or an older checkpoint); None with mock data (no blend)."""
        if cfg.data.mock:
            return None
        d, t = cfg.data, cfg.train
        run_samples = t.steps * t.global_batch_size

        def build_order(prefix: str, size: Optional[int]):
            return build_gpt_datasets([prefix], None, d.split, cfg.model.seq_length, t.seed, (size, 0, 0), d.tokenizer,
                                      d.cache_dir, mock_vocab_size=vocab_size, eod_mask_loss=d.eod_mask_loss,
                                      document_mask=d.document_mask)[0]

        return mixture.resume(saved, d.prefixes, d.weights, self.train, self.order, consumed_samples, run_samples,
                              build_order)
