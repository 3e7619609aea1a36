"""W&B offline: a 2-rank run resumed once and rolled back once is ONE tracker run whose scalars are the
TensorBoard ones (both read back from their files)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, train_rank

pytest.importorskip("wandb")


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` transaction log. wandb 0.31 ships no Python reader of its own file any
    more (its Go core writes it): W&B's header (":W&B", magic 0xBEE1, version 0), then LevelDB log blocks of
    32 KiB whose chunks are crc32c (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    block, records, pending, pos = 32768, [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(root: Path) -> tuple[set[str], dict[int, dict]]:
    """(run ids, {step: {key: value}}) over every offline run directory under root."""
    ids, history = set(), {}
    for log in root.rglob("offline-run-*/run-*.wandb"):
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(items["_step"], {}).update(items)
    return ids, history


def tensorboard_scalars(root: Path) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out: dict[int, dict] = {}
    for path in sorted(root.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(event.step, {})[value.tag] = value.simple_value
    return out


def test_a_resumed_and_rolled_back_run_is_one_wandb_run_with_the_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path), "tensorboard": True,
                                  "wandb": {"project": "fpa-test", "mode": "offline"}},
              "checkpoint": {"interval": 2, "save_at_end": False, "resume": "auto"}}
    common = ["logging.run_name=wb", "train.steps=6", "train.spike.min_history=2", "train.spike.window=4",
              "train.spike.policy=rollback"]
    first = run_distributed(train_rank, 2, values, common + ["train.exit_interval=3"])[0]  # stops after step 3
    assert [h["step"] for h in first] == [1, 2, 3]
    monkeypatch.setenv("FPA_FAULT", "spike@5")  # step 5's loss x 100: rolled back to the step-4 checkpoint
    second = run_distributed(train_rank, 2, values, common)[0]
    assert [h["step"] for h in second] == [4, 5, 6]  # resumed from the exit checkpoint of step 3
    run = tmp_path / "wb"
    ids, history = wandb_history(run)
    assert len(ids) == 1, ids  # one tracker run across the resume and the rollback
    assert len(list(run.rglob("offline-run-*"))) == 2  # two attempts wrote into it
    board = tensorboard_scalars(run)
    for step in range(1, 7):
        assert step in history, sorted(history)
        for tag, value in board[step].items():
            if math.isnan(value):  # the grad norm of the rolled-back step: logged as NaN on both sides
                assert history[step][tag] == "NaN" or math.isnan(history[step][tag]), (step, tag)
            else:
                assert history[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)
    assert history[5]["train/rolled_back_to_step"] == 4 and board[5]["train/rolled_back_to_step"] == 4
    image = {key.rsplit("/", 1)[1]: value for key, value in history[6].items()
             if key.startswith("penalty/heads_heatmap/")}  # the image went to W&B too: 4 heads x 2 layers
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (4 * 16, 2 * 16), image
