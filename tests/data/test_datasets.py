"""fpa_megatron.data.datasets: Megatron GPT datasets over indexed prefixes, blends, DP micro-batches, resume.

The datasets are written with Megatron-core's own IndexedDatasetBuilder. Document d of a prefix holds the
consecutive integers start_d, start_d + 1, ... followed by EOD, so any sample can be checked to be real
contiguous text: inside a document each token is the previous one plus 1, and after an EOD a document
starts. No torch.distributed process group exists in these tests, except in the two-rank one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpa_megatron.data.datasets import (
    FileTokenizer,
    MicroBatchSampler,
    build_gpt_datasets,
    micro_batches,
)

EOD = 2  # the sentencepiece model below: <unk>=0 <s>=1 </s>=2 <pad>=3
SEQ = 32


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    import sentencepiece as spm

    prefix = str(tmp_path_factory.mktemp("tok") / "m")
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   num_threads=1, minloglevel=2)
    return prefix + ".model"


def write_prefix(prefix: str, starts: list[int], lengths: list[int]) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = []
    for start, n in zip(starts, lengths):
        doc = np.concatenate([np.arange(start, start + n), [EOD]]).astype(np.uint16)
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> dict:
    """Two prefixes with disjoint token ranges: A in [10, 20000), B in [30000, 50000)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    out = {}
    for name, base, n_docs in (("A", 10, 120), ("B", 30000, 150)):
        lengths = rng.integers(5, 120, size=n_docs).tolist()
        starts, pos = [], base
        for n in lengths:
            starts.append(pos)
            pos += n + 7
        write_prefix(str(root / name), starts, lengths)
        out[name] = str(root / name)
    return out


def assert_real_text(tokens: np.ndarray, starts: set) -> None:
    """Consecutive within a document; a document (a known start) begins after each EOD."""
    for prev, cur in zip(tokens[:-1], tokens[1:]):
        if prev == EOD:
            assert cur in starts, (prev, cur)
        elif cur != EOD:
            assert cur == prev + 1, (prev, cur)


def doc_starts(prefix: str) -> set:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return {int(ds[i][0]) for i in range(len(ds))}


def test_sequences_have_seq_length_and_are_real_text(prefixes, tokenizer_model, tmp_path):
    assert not torch.distributed.is_initialized()
    train, valid, test = build_gpt_datasets([prefixes["A"]], None, "90,5,5", SEQ, 1234, (500, 40, 40),
                                            tokenizer_model, str(tmp_path / "cache"))
    starts = doc_starts(prefixes["A"])
    for ds, wanted in ((train, 500), (valid, 40), (test, 40)):
        assert len(ds) >= wanted
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert s["tokens"].shape == (SEQ,) and s["tokens"].dtype == torch.int64
            assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
            assert s["position_ids"].tolist() == list(range(SEQ))
            text = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()
            assert np.array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())
            assert_real_text(text, starts)
    # the index caches went to cache_dir; a second build reads them and yields the same samples
    assert any((tmp_path / "cache").iterdir())
    again, _, _ = build_gpt_datasets([prefixes["A"]], None, "90,5,5", SEQ, 1234, (500, 40, 40),
                                     tokenizer_model, str(tmp_path / "cache"))
    for i in (0, 7, 499):
        assert torch.equal(again[i]["tokens"], train[i]["tokens"])


def test_blend_of_two_prefixes_follows_the_weights(prefixes, tokenizer_model, tmp_path):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    train, valid, _ = build_gpt_datasets([prefixes["A"], prefixes["B"]], [0.25, 0.75], "80,10,10", SEQ, 5,
                                         (400, 40, 40), tokenizer_model, str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and len(train) == 400
    starts_a, starts_b = doc_starts(prefixes["A"]), doc_starts(prefixes["B"])
    from_b = 0
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        content = tokens[tokens != EOD]
        in_a, in_b = (content < 20000).all(), (content >= 30000).all()
        assert in_a != in_b  # every sample comes whole from one of the two datasets
        assert_real_text(tokens, starts_b if in_b else starts_a)
        from_b += int(in_b)
    assert abs(from_b - 300) <= 2
    assert len(valid) == 40


def test_eod_mask_loss_and_mock(prefixes, tokenizer_model):
    train, _, _ = build_gpt_datasets([prefixes["A"]], None, "100,0,0", SEQ, 3, (50, 0, 0), tokenizer_model, None,
                                     eod_mask_loss=True)
    s = train[0]
    assert torch.equal(s["loss_mask"] == 0, s["tokens"] == EOD)
    mtrain, mvalid, mtest = build_gpt_datasets([], None, "1,1,1", 16, 3, (20, 4, 4), None, None, mock=True,
                                               mock_vocab_size=512)
    for ds in (mtrain, mvalid, mtest):
        s = ds[0]
        assert s["tokens"].shape == (16,) and int(s["tokens"].max()) < 512


def test_split_without_tokens_is_an_error_not_a_hang(tmp_path, tokenizer_model):
    small = str(tmp_path / "small")
    write_prefix(small, [10, 100, 200], [20, 20, 20])
    with pytest.raises(ValueError, match="no token in the valid split"):
        build_gpt_datasets([small], None, "98,1,1", SEQ, 1, (10, 1, 1), tokenizer_model, str(tmp_path / "c"))


def test_tokenizer_adapter_matches_sentencepiece(tokenizer_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    tok = FileTokenizer(tokenizer_model)
    text = "the quick brown fox 123 ünïcode"
    assert tok.tokenize(text) == sp.encode(text)
    assert tok.detokenize(tok.tokenize(text)) == sp.decode(sp.encode(text))
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos, tok.unk) == (sp.vocab_size(), 2, 3, 1, 0)
    assert len(tok.vocab) == sp.vocab_size()


def test_micro_batches_are_dp_disjoint_and_resume_exactly(prefixes, tokenizer_model, tmp_path):
    train, _, _ = build_gpt_datasets([prefixes["A"]], None, "100,0,0", SEQ, 9, (200, 0, 0), tokenizer_model,
                                     str(tmp_path / "cache"))
    mbs, dp = 3, 2
    runs = {r: list(micro_batches(train, 0, mbs, r, dp)) for r in range(dp)}
    steps = len(train) // (mbs * dp)
    assert len(runs[0]) == len(runs[1]) == steps
    for step in range(steps):
        base = step * mbs * dp
        for r in range(dp):
            batch = runs[r][step]
            assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert batch["tokens"].shape == (mbs, SEQ)
            expected = torch.stack([train[base + r * mbs + j]["tokens"] for j in range(mbs)])
            assert torch.equal(batch["tokens"], expected)  # rank r gets the r-th slice of each block
    # resume: an iterator restarted from the consumed-samples count continues exactly
    it = micro_batches(train, 0, mbs, 1, dp)
    for _ in range(5):
        next(it)
    consumed = it.consumed_samples
    assert consumed == 5 * mbs * dp
    resumed = list(micro_batches(train, consumed, mbs, 1, dp))
    continued = list(it)
    assert len(resumed) == len(continued) == steps - 5
    for a, b in zip(resumed, continued):
        for k in a:
            assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError):
        MicroBatchSampler(100, 7, mbs, 0, dp)


def _two_rank_build(prefix, model, cache):
    from fpa_megatron.data.datasets import build_gpt_datasets, micro_batches

    rank = torch.distributed.get_rank()
    train, _, _ = build_gpt_datasets([prefix], None, "100,0,0", SEQ, 4, (60, 0, 0), model, cache)
    batches = list(micro_batches(train, 12, 2, rank, 2))
    return [b["tokens"] for b in batches]


def test_build_under_a_two_rank_process_group(prefixes, tokenizer_model, tmp_path):
    """With gloo initialised Megatron builds the caches on rank 0 first; both ranks see the same samples
    and take disjoint halves of every block."""
    from fpa_megatron.testing import run_distributed

    cache = str(tmp_path / "cache")
    out = run_distributed(_two_rank_build, 2, prefixes["A"], tokenizer_model, cache, timeout_s=240)
    train, _, _ = build_gpt_datasets([prefixes["A"]], None, "100,0,0", SEQ, 4, (60, 0, 0), tokenizer_model, cache)
    for r in range(2):
        for step, tokens in enumerate(out[r]):
            base = 12 + step * 4 + r * 2
            assert torch.equal(tokens, torch.stack([train[base]["tokens"], train[base + 1]["tokens"]]))
    assert len(out[0]) == len(out[1]) == (len(train) - 12) // 4
