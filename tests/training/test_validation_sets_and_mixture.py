"""Named validation sets (`data.validation`) and a data mixture changed at a resume, on real `train(cfg)` runs.

The data: three indexed prefixes written with Megatron-core's IndexedDatasetBuilder (tests/data/test_datasets.py's
`write_prefix`), no tokenizer (model.vocab_size, EOD = vocab - 1 as MockTokenizer has it). B is small: its
training split holds ~20 samples, so a weight that asks more of it than its order holds is refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fpa_megatron.testing import run_distributed
from tests.data.test_datasets import write_prefix

SEQ, VOCAB, SEED, SPLIT = 16, 256, 3, "80,10,10"
VALUES = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ, "vocab_size": VOCAB},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "zero_stage": 1},
    "train": {"steps": 8, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0, "seed": SEED},
    "checkpoint": {"resume": "auto", "keep_last": 5},
    "logging": {"interval": 1, "tensorboard": False},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mixdata")
    rng = np.random.default_rng(1)
    out = {}
    for name, docs, (low, high) in (("A", 60, (20, 80)), ("B", 25, (14, 22)), ("C", 60, (20, 80))):
        lengths = rng.integers(low, high, size=docs).tolist()
        write_prefix(str(root / name), rng.integers(3, VOCAB - high - 2, size=docs).tolist(), lengths)
        out[name] = str(root / name)
    out["cache"] = str(root / "cache")
    return out


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return train(config_from_dict(values, overrides))


def run_values(tmp_path, data: dict, name: str, **data_section) -> dict:
    return {**VALUES, "data": {"cache_dir": data["cache"], "split": SPLIT, **data_section},
            "logging": {**VALUES["logging"], "dir": str(tmp_path), "run_name": name}}


# ------------------------------------------------------------------------------------------- named validation sets


def test_named_validation_sets_are_logged_and_fpa_eval_reproduces_them(tmp_path, data, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fpa_megatron.checkpoint.lineage import complete_checkpoints
    from fpa_megatron.inference.cli import eval_main

    values = run_values(tmp_path, data, "val", prefixes=[data["A"]],
                        validation={"code": data["B"], "web": {"prefixes": [data["C"], data["B"]], "weights": [3, 1]}})
    history = run_distributed(train_rank, 1, values, ["train.steps=4", "train.eval_interval=2", "train.eval_iters=2",
                                                      "logging.tensorboard=true"])[0]
    evaluated = [h for h in history if "val_loss" in h]
    assert [h["step"] for h in evaluated] == [2, 4]
    events = EventAccumulator(str(tmp_path / "val"), size_guidance={"scalars": 0})
    events.Reload()
    curves = {name: {e.step: e.value for e in events.Scalars(f"val/{name}/loss")} for name in ("code", "web")}
    assert sorted(curves["code"]) == sorted(curves["web"]) == [0, 2, 4]  # step 0 of a fresh run, every 2, the last
    for name in ("code", "web"):
        assert curves[name][4] == pytest.approx(history[-1][f"val_loss/{name}"], rel=1e-6)
        assert events.Scalars(f"val/{name}/ppl")[-1].value == pytest.approx(math.exp(curves[name][4]), rel=1e-5)
    assert curves["code"][4] != pytest.approx(curves["web"][4], rel=1e-3)  # two sets, two values
    assert curves["code"][4] != pytest.approx(history[-1]["val_loss"], rel=1e-3)  # neither is the blend's split

    (checkpoint,) = complete_checkpoints(tmp_path / "val" / "checkpoints")
    capsys.readouterr()
    for name in ("code", "web", "valid"):
        assert eval_main(["--checkpoint", str(checkpoint), "--split", name, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        loss = float(printed.split("loss ")[1].split()[0])
        trainer = history[-1]["val_loss" if name == "valid" else f"val_loss/{name}"]
        assert abs(loss - trainer) <= 1e-5 * trainer, (name, loss, trainer)
        assert "first 2 global batches of 4 x 16 tokens" in printed
    assert eval_main(["--checkpoint", str(checkpoint), "--split", "news", "--no-progress"]) == 2
    assert "'news' is not one of valid, test, code, web" in capsys.readouterr().err


def test_validation_set_config_errors(tmp_path, data):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    cases = [
        ({"valid": data["B"]}, "data.validation.valid: the name 'valid' is taken"),
        ({"code": data["B"] + "_missing"}, "data.validation.code="),
        ({"web": {"prefixes": [data["B"], data["C"]], "weights": [1]}}, "data.validation.web.weights=[1]"),
        ({"a/b": data["B"]}, "data.validation.a/b: a validation set's name"),
    ]
    for validation, fragment in cases:
        cfg = config_from_dict(run_values(tmp_path, data, "bad", prefixes=[data["A"]], validation=validation),
                               ["train.eval_interval=2"])
        with pytest.raises(ConfigError, match="^" + fragment.replace("[", r"\[").replace("]", r"\]")):
            check_config(cfg, 1)
    cfg = config_from_dict(run_values(tmp_path, data, "bad", prefixes=[data["A"]], validation={"code": data["B"]}))
    with pytest.raises(ConfigError, match="train.eval_interval=0 never evaluates"):
        check_config(cfg, 1)


# ------------------------------------------------------------------------------------------- mixture change


def sample_id(dataset, j: int) -> tuple[int, int]:
    """Sample j of a GPTDataset: (document id, token offset) where it starts, from the dataset's own indices."""
    position, offset = dataset.sample_index[dataset.shuffle_index[j]]
    return int(dataset.document_index[position]), int(offset)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, data):
    """Steps 1-3 of 8 on A:B = 1:1 (exit_interval: a checkpoint at step 3); the run's log directory."""
    root = tmp_path_factory.mktemp("mix")
    values = run_values(root, data, "mix", prefixes=[data["A"], data["B"]], weights=[1, 1])
    history = run_distributed(train_rank, 1, values, ["train.exit_interval=3"])[0]
    assert [h["step"] for h in history] == [1, 2, 3]
    return root


def test_a_changed_mixture_continues_each_dataset_without_repeats(three_steps, data):
    """After steps 1-3 on A:B = 1:1, a resume on A:B:C = 1:3:4 up to step 8 (itself resumed after step 5): the 12
    samples before and the 20 after hold no sample twice, the 20 follow the new weights, and the checkpoints
    record what each dataset gave."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from fpa_megatron.checkpoint.format import TRAINER_STATE, load_trusted
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.data.datasets import MockTokenizer, build_gpt_datasets
    from fpa_megatron.data.mixture import blending_index
    from fpa_megatron.data.run_data import RunData

    after = run_values(three_steps, data, "mix", prefixes=[data["A"], data["B"], data["C"]], weights=[1, 3, 4])
    second = run_distributed(train_rank, 1, after, ["train.exit_interval=2"])[0]
    third = run_distributed(train_rank, 1, after, [])[0]  # the new mixture goes on as it began
    assert [h["step"] for h in second + third] == [4, 5, 6, 7, 8]
    checkpoints = three_steps / "mix" / "checkpoints"
    at3 = load_trusted(checkpoints / "iter_0000003" / TRAINER_STATE)["data_mixture"]
    at5 = load_trusted(checkpoints / "iter_0000005" / TRAINER_STATE)["data_mixture"]
    at8 = load_trusted(checkpoints / "iter_0000008" / TRAINER_STATE)["data_mixture"]
    assert at5["start"] == at8["start"] == 12 and at5["next_sample"] == 20 and at8["next_sample"] == 32

    # before: Megatron's blend of A and B (built here as the trainer's builder does), its first 12 samples
    old, _, _ = build_gpt_datasets([data["A"], data["B"]], [1, 1], SPLIT, SEQ, SEED, (32, 0, 0), None, data["cache"],
                                   tokenizer=MockTokenizer(VOCAB))
    assert isinstance(old, BlendedDataset)
    ids = [(["A", "B"][d], sample_id(old.datasets[d], int(k)))
           for d, k in zip(old.dataset_index[:12], old.dataset_sample_index[:12])]
    given = {name: sum(1 for n, _ in ids if n == name) for name in ("A", "B")}
    assert at3["start"] == 0 and {p: e["given"] for p, e in at3["datasets"].items()} == {
        data["A"]: given["A"], data["B"]: given["B"]}

    # after: each dataset's own order (A, B: as in the old blend; C: a new one) after what it gave, Megatron's
    # blending index for the new weights
    c_order = build_gpt_datasets([data["C"]], None, SPLIT, SEQ, SEED, (at8["datasets"][data["C"]]["order_size"], 0, 0),
                                 None, data["cache"], tokenizer=MockTokenizer(VOCAB))[0]
    orders = {"A": old.datasets[0], "B": old.datasets[1], "C": c_order}
    dataset_index, sample_index = blending_index([1 / 8, 3 / 8, 4 / 8], 20)
    new = []
    for d, k in zip(dataset_index, sample_index):
        name = "ABC"[d]
        new.append((name, sample_id(orders[name], given.get(name, 0) + int(k))))
    assert len(set(ids + new)) == 32  # no sample twice across the change
    counts = {name: sum(1 for n, _ in new if n == name) for name in "ABC"}
    for name, weight in zip("ABC", (1 / 8, 3 / 8, 4 / 8)):
        assert abs(counts[name] - 20 * weight) <= 1, counts  # the new weights from the resume on
    assert {p: e["given"] for p, e in at8["datasets"].items()} == {
        data[name]: given.get(name, 0) + counts[name] for name in "ABC"}
    assert at8["start"] == 12 and at8["given_at_start"] == [given["A"], given["B"], 0]

    # the trainer's dataset from the resume position serves exactly these samples
    cfg = config_from_dict(after)
    mixture = RunData.build(cfg, VOCAB).training_mixture(cfg, VOCAB, at3, 12)
    for g, (name, _) in enumerate(new, start=12):
        want = orders[name][given.get(name, 0) + int(sample_index[g - 12])]
        assert torch.equal(mixture.dataset[g]["tokens"], want["tokens"]), g


def test_a_mixture_change_that_exhausts_a_dataset_is_a_config_error(three_steps, data):
    """B's order holds ~20 samples; after steps 1-3 it gave 6: weights asking more of it are refused before any
    process group, naming it."""
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    resume = [f"checkpoint.resume={three_steps / 'mix' / 'checkpoints' / 'iter_0000003'}"]
    values = run_values(three_steps, data, "mix", prefixes=[data["A"], data["B"]], weights=[1, 1])
    check_config(config_from_dict(values, resume), 1)  # unchanged
    check_config(config_from_dict(values, resume + ["data.weights=[1,2]"]), 1)  # B can give that much more
    with pytest.raises(ConfigError, match=r"^data.weights \(normalized .*\): data.prefixes\[1\]=.*B' would have to "
                                          r"give \d+ more samples .* exhausted"):
        check_config(config_from_dict(values, resume + ["data.weights=[1,30]"]), 1)
    with pytest.raises(ConfigError, match="a changed mixture needs explicit data.weights"):
        check_config(config_from_dict({**values, "data": {**values["data"], "weights": None,
                                                          "prefixes": [data["A"], data["C"]]}}, resume), 1)
