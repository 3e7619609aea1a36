"""Training-side data: Megatron-core GPT datasets over `fpa-prep` outputs, and resumable DP micro-batches.

- `FileTokenizer`: a `MegatronTokenizerBase` over a sentencepiece model or a tokenizer.json (EOD = eos), what
  `GPTDatasetConfig` needs (vocab_size, eod, pad, unique_identifiers for the index cache).
- `build_gpt_datasets(...)`: train/valid/test through `BlendedMegatronDatasetBuilder(GPTDataset, ...)`
  (blend by weight, split string), or `MockGPTDataset` with mock=True. Works with or without a
  torch.distributed process group (with one, rank 0 builds the index caches first, as in Megatron).
  `build_validation_sets(...)`: the named held-out sets of `data.validation`.
- `MicroBatchSampler` / `MicroBatchIterator`: Megatron's pretraining-sampler order. Samples are taken
  in order from `consumed_samples`; every block of micro_batch_size * dp_size samples is cut so that DP
  rank r gets the r-th micro-batch. `consumed_samples` (global, all DP ranks) is the resume position to
  store in checkpoints; restarting from it yields exactly the batches that continuing would have.
"""

from __future__ import annotations

import copy
import functools
import os
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from data_prep.common import PrepError
from data_prep.tokenizer import load_tokenizer
from fpa_megatron.attention.documents import document_ids
from fpa_megatron.data.mixture import SampleOrder

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class FileTokenizer(MegatronTokenizerBase):
    """Megatron tokenizer interface over a sentencepiece .model or a Hugging Face tokenizer.json (fpa-prep's
    `load_tokenizer`, so ids equal the encode's); EOD is the tokenizer's eos (or eod_piece)."""

    def __init__(self, model_path: str, eod_piece: Optional[str] = None):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        try:
            self._tok = load_tokenizer(model_path, eod_piece)
        except PrepError as err:
            raise ValueError(str(err)) from None
        super().__init__(self._tok.path, {"library": self._tok.kind})

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    @property
    def vocab(self) -> dict:
        return {self._tok.id_to_piece(i): i for i in range(self._tok.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("no chat template for a pretraining tokenizer")

    @property
    def eod(self) -> int:
        return self._tok.eod_id

    @property
    def eos(self) -> int:
        return self._tok.eod_id

    @property
    def bos(self) -> int:
        return -1 if self._tok.bos_id is None else self._tok.bos_id

    @property
    def pad(self) -> int:
        """The pad id, or -1 (never a token) when the tokenizer has none."""
        return -1 if self._tok.pad_id is None else self._tok.pad_id

    @property
    def unk(self) -> int:
        return -1 if self._tok.unk_id is None else self._tok.unk_id

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Part of GPTDataset's cache key: the tokenizer's content, not its path."""
        return OrderedDict(cls=type(self).__name__, sha256=self._tok.sha256, eod=self.eod)


class MockTokenizer(MegatronTokenizerBase):
    """Vocabulary size and EOD only, for MockGPTDataset when no model is given (EOD = vocab_size - 1)."""

    def __init__(self, vocab_size: int):
        super().__init__("mock", {"library": "null"})
        self._vocab_size = int(vocab_size)

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        raise NotImplementedError

    @property
    def vocab(self):
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def pad(self) -> int:
        return -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, vocab_size=self._vocab_size)


class _Builder(BlendedMegatronDatasetBuilder):
    """Megatron's builder, usable without a process group.

    Megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() on a cache miss whenever
    path_to_cache is set, which raises without a process group. Single-process, the blend index (cheap,
    built by Megatron's C++ helper) is then built in memory and not cached; GPTDataset caches still are.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized() and args[-1].path_to_cache:
            config = copy.copy(args[-1])
            config.path_to_cache = None
            args = (*args[:-1], config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)


def build_tokenizer(tokenizer_model: Optional[str], mock_vocab_size: int = 8192) -> MegatronTokenizerBase:
    """The adapter for a tokenizer path (sentencepiece or tokenizer.json), or a MockTokenizer when there is none."""
    if tokenizer_model:
        return FileTokenizer(tokenizer_model)
    return MockTokenizer(mock_vocab_size)


def build_gpt_datasets(
    prefixes: Sequence[str],
    weights: Optional[Sequence[float]],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple,
    tokenizer_model: Optional[str],
    cache_dir: Optional[str],
    mock: bool = False,
    *,
    tokenizer: Optional[MegatronTokenizerBase] = None,
    mock_vocab_size: int = 8192,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    document_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
):
    """(train, valid, test) GPT datasets of `seq_length`-token samples; a split is None when its share is 0.

    prefixes/weights: dataset prefixes (`<prefix>.bin/.idx`) and blend weights (None: by size).
    split: Megatron's "train,valid,test" weights, e.g. "98,1,1" (ignored with mock: Megatron uses 1,1,1).
    num_samples: samples wanted per split (train, valid, test); a dataset repeats epochs to reach them.
    cache_dir: where GPTDataset keeps its index caches (None: `<prefix dir>/cache/`, as Megatron does).
    mock=True: MockGPTDataset (no files), tokenizer from `tokenizer_model` or MockTokenizer(mock_vocab_size).
    Samples are dicts of tokens/labels (int64), loss_mask (float32), position_ids (int64), no attention
    mask (the model builds the causal mask).
    document_mask (data.document_mask): positions restart after each EOD (Megatron's reset_position_ids) and the
    micro-batches carry each token's document id (`collate`), which the attention masks by.
    """
    if tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_model, mock_vocab_size)
    if len(num_samples) != 3:
        raise ValueError("num_samples must be (train, valid, test)")
    sizes = [None if n is None else int(n) for n in num_samples]  # None: one epoch
    if mock:
        blend = None
    else:
        if not prefixes:
            raise ValueError("no dataset prefixes given (or set mock=True)")
        for p in prefixes:
            if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")):
                raise FileNotFoundError(f"dataset prefix {p}: {p}.bin / {p}.idx not found")
        if weights is not None:
            if len(weights) != len(prefixes):
                raise ValueError(f"{len(weights)} weights for {len(prefixes)} prefixes")
            if any(w <= 0 for w in weights):
                raise ValueError("blend weights must be positive")
        blend = (list(prefixes), None if weights is None or len(prefixes) == 1 else [float(w) for w in weights])
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids or document_mask,
        reset_attention_mask=reset_attention_mask or document_mask,  # no mask is built: it marks the documents
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if not mock:
        _check_splits_not_empty(config)
    cls = MockGPTDataset if mock else GPTDataset
    builder = _Builder(cls, sizes, is_built_on_rank or (lambda: True), config)
    train, valid, test = builder.build()
    return train, valid, test


def build_validation_sets(sets: dict, seq_length: int, seed: int, num_samples: int, tokenizer: MegatronTokenizerBase,
                          cache_dir: Optional[str], eod_mask_loss: bool = False, document_mask: bool = False) -> dict:
    """`data.validation` (name -> (prefixes, weights), as data_checks.validation_sets reads it): each set a
    held-out GPT dataset of `num_samples` samples over its whole prefixes (split 0,1,0), blended by its weights;
    the trainer and `fpa-eval --split NAME` build them with this one function."""
    return {name: build_gpt_datasets(prefixes, weights, "0,1,0", seq_length, seed, (0, num_samples, 0), None,
                                     cache_dir, tokenizer=tokenizer, eod_mask_loss=eod_mask_loss,
                                     document_mask=document_mask)[1]
            for name, (prefixes, weights) in sets.items()}


def _check_splits_not_empty(config: GPTDatasetConfig) -> None:
    """Megatron-core 0.16 loops forever in GPTDataset._get_num_epochs when a split of a prefix has no
    token (e.g. a small shard with split 98,1,1): refuse such a blend with a clear error instead."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("train", "valid", "test")
    for prefix in config.blend[0]:
        ds = IndexedDataset(prefix)  # keep alive: its lengths are a view into the index mmap
        lengths = np.array(ds.sequence_lengths, dtype=np.int64)
        del ds
        n = lengths.shape[0]
        for name, bookends in zip(names, config.split_matrix):
            if bookends is None:
                continue
            beg, end = int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))
            if int(lengths[beg:end].sum()) == 0:
                raise ValueError(
                    f"dataset {prefix} ({n} documents) gets no token in the {name} split of "
                    f"split={config.split!r}: use the merged dataset, a larger prefix, or another split"
                )


class MicroBatchSampler:
    """Megatron's pretraining sampler: in-order indices from consumed_samples, each block of
    micro_batch_size * dp_size split so that DP rank r gets [r*mbs, (r+1)*mbs). Incomplete blocks are dropped.
    With `order`, positions map to global sample indices without the excluded ones."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 order: Optional[SampleOrder] = None):
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size} dp_rank={dp_rank} dp_size={dp_size}")
        block = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % block:
            raise ValueError(f"consumed_samples={consumed_samples} must be a multiple of micro_batch_size * dp_size = {block}")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.order = order or SampleOrder()
        self.positions = self.total_samples - len(self.order.excluded)  # what the dataset holds past the exclusions

    def __len__(self) -> int:
        return max(0, (self.positions - self.consumed_samples) // (self.micro_batch_size * self.dp_size))

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for base in range(self.consumed_samples, self.positions - block + 1, block):
            yield self.order.samples(base + start, self.micro_batch_size)


def collate(samples: list[dict], eod: Optional[int] = None) -> dict:
    """Stack GPTDataset samples into [micro_batch, seq_length] tensors (only the batch keys); with `eod` (document
    masking) also `document_ids`, each token's document (attention/documents.py), computed once per micro-batch."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS if k in samples[0]}
    if eod is not None:
        batch["document_ids"] = document_ids(batch["tokens"], eod)
    return batch


def document_eod(dataset) -> Optional[int]:
    """The EOD that separates documents when `dataset` was built with document masking, else None."""
    config = getattr(dataset, "config", None)
    return config.tokenizer.eod if config is not None and config.reset_attention_mask else None


class MicroBatchIterator:
    """This DP rank's micro-batches from `consumed_samples` on; `.consumed_samples` is the global position
    after the micro-batches yielded so far (store it in checkpoints, pass it back to resume)."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 0, order: Optional[SampleOrder] = None):
        self.sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, order)
        self.consumed_samples = consumed_samples
        self._step = micro_batch_size * dp_size
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=functools.partial(collate, eod=document_eod(dataset)),
            multiprocessing_context="spawn" if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
        )
        self._it = iter(loader)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self.consumed_samples += self._step
        return batch

    def __len__(self) -> int:
        return len(self.sampler)


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                  num_workers: int = 0, order: Optional[SampleOrder] = None) -> MicroBatchIterator:
    """Shorthand for MicroBatchIterator(...)."""
    return MicroBatchIterator(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size, num_workers, order)


def dataset_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset prefix, concatenated (for tests and small tools)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    out = np.concatenate(ds[0 : len(ds)]).astype(np.int64)  # a copy: safe after ds closes its mmap
    del ds
    return out
