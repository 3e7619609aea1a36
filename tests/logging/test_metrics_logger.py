"""MetricsLogger: the stdout line, and every TensorBoard scalar and the heatmap read back with TensorBoard's reader."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fpa_megatron.training.metrics import TAGS, MetricsLogger, colormap, heatmap_image, memory_gb

METRICS = {
    "lm_loss": 5.123, "penalty": 0.43, "penalty_weighted": 0.43 * 9.9e-3, "lambda": 9.9e-3, "lr": 3e-4,
    "grad_norm": 1.23, "tokens_per_s": 12345.0, "tflops": 0.01, "mfu": 0.001, "iter_time_s": 0.25, "mem_gb": 1.2,
}


LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] ")


def _logged(out: str) -> list[str]:
    """The run log's lines without their `<date> <time> [rank 0] ` prefix (which every line must have)."""
    lines = out.strip().splitlines()
    assert all(LOG_PREFIX.match(line) for line in lines), lines
    return [LOG_PREFIX.sub("", line) for line in lines]


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_log_line_and_scalars(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=True, total_steps=300)
    logger.log(10, METRICS)
    logger.log(20, {**METRICS, "lm_loss": 4.5, "loss_scale": 2.0})
    logger.close()

    lines = _logged(capsys.readouterr().out)
    assert lines[0] == ("step 10/300 | lm_loss 5.1230 | penalty 0.43 | lambda*penalty 4.26e-03 | lambda 9.9e-03 | "
                        "lr 3.0e-04 | grad_norm 1.230 | tok/s 12345 | TFLOP/s 0.01 | MFU 0.1% | iter 0.25s | mem 1.2GB")
    assert lines[1].startswith("step 20/300 | lm_loss 4.5000 |") and lines[1].endswith("| loss_scale 2")
    assert len(lines) == 2

    acc = _read(tmp_path)
    expected_tags = {
        "train/lm_loss", "train/penalty", "train/penalty_weighted", "train/lambda", "train/lr", "train/grad_norm",
        "perf/tokens_per_s", "perf/tflops", "perf/mfu", "perf/iter_time_s", "perf/mem_gb", "train/loss_scale",
    }
    assert set(acc.Tags()["scalars"]) == expected_tags
    for key, value in METRICS.items():
        values = _scalars(acc, TAGS[key][0])
        assert [s for s, _ in values] == [10, 20]
        assert values[0][1] == pytest.approx(value, rel=1e-6)  # float32 in the event file
    assert _scalars(acc, "train/lm_loss")[1][1] == pytest.approx(4.5)
    assert _scalars(acc, "train/loss_scale") == [(20, 2.0)]


def test_log_eval(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_steps=300)
    logger.log_eval(50, 4.2)
    logger.close()
    assert _logged(capsys.readouterr().out) == ["eval step 50/300 | val_loss 4.2000 | val_ppl 66.69"]
    acc = _read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"val/loss", "val/ppl"}
    assert _scalars(acc, "val/loss")[0] == (50, pytest.approx(4.2))
    assert _scalars(acc, "val/ppl")[0] == (50, pytest.approx(math.exp(4.2), rel=1e-6))


def test_penalty_scalars_and_heatmap(tmp_path):
    layers, heads = 3, 5
    per_head = torch.rand(layers, heads, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_head[2, 1] = 5.0  # the maximum: layer 2, head 1
    per_head[0, 3] = -1.0  # the minimum: layer 0, head 3
    per_layer = per_head.sum(dim=1)
    logger = MetricsLogger(str(tmp_path), cell_px=16)
    logger.log_penalty(7, per_layer, per_head)
    logger.close()

    acc = _read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {f"penalty/layer_{i:02d}" for i in range(layers)}
    for i in range(layers):
        assert _scalars(acc, f"penalty/layer_{i:02d}") == [(7, pytest.approx(per_layer[i].item(), rel=1e-6))]
    assert acc.Tags()["images"] == ["penalty/heads_heatmap"]
    (event,) = acc.Images("penalty/heads_heatmap")
    assert event.step == 7 and (event.height, event.width) == (layers * 16, heads * 16)
    image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(float)
    assert image.shape == (layers * 16, heads * 16, 3)
    # every 16x16 block is one flat colour: rows are layers, columns are heads
    cells = image.reshape(layers, 16, heads, 16, 3)
    assert (cells == cells[:, :1, :, :1, :]).all()
    brightness = (cells[:, 0, :, 0, :] * [0.2126, 0.7152, 0.0722]).sum(-1)  # [layers, heads]
    assert np.unravel_index(brightness.argmax(), brightness.shape) == (2, 1)
    assert np.unravel_index(brightness.argmin(), brightness.shape) == (0, 3)
    # brightness never decreases as the value grows (close values may share a colour after uint8 rounding)
    order = np.argsort(per_head.numpy().ravel())
    assert (np.diff(brightness.ravel()[order]) >= 0).all()


def test_colormap_and_image_helpers():
    rgb = colormap(np.array([[0.0, 1.0, float("nan")]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert tuple(rgb[0, 0]) == (68, 1, 84) and tuple(rgb[0, 1]) == (253, 231, 37)  # viridis ends
    assert tuple(rgb[0, 2]) == (128, 128, 128)  # non-finite cells are grey
    assert heatmap_image(np.ones((2, 3)), cell_px=4).shape == (8, 12, 3)  # a constant matrix still renders


def test_disabled_logger_does_nothing(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "off"), enabled=False, tensorboard=True)
    logger.log(1, METRICS)
    logger.log_eval(1, 3.0)
    logger.log_penalty(1, torch.ones(2), torch.ones(2, 2))
    logger.close()
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "off").exists()


def test_stdout_only_without_tensorboard(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "tb"), enabled=True, tensorboard=False)
    logger.log(3, {"lm_loss": 2.0})
    logger.log_penalty(3, torch.ones(2), torch.ones(2, 2))
    logger.close()
    assert _logged(capsys.readouterr().out) == ["step 3 | lm_loss 2.0000"]
    assert not (tmp_path / "tb").exists()


def test_memory_gb_is_positive():
    assert 0.0 < memory_gb() < 1e4


def test_attention_stats_scalars_line_and_entropy_heatmap(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    stats = {"collision": torch.rand(2, 3, generator=g, dtype=torch.float64),
             "entropy": torch.rand(2, 3, generator=g, dtype=torch.float64) * 3,
             "max_logit": torch.randn(2, 3, generator=g, dtype=torch.float64) * 5}
    stats["entropy"][1, 2] = 0.01  # a collapsed head: the darkest cell
    logger = MetricsLogger(str(tmp_path), total_steps=100)
    logger.log_attention(40, stats)
    logger.close()

    c, e, m = (stats[k].numpy() for k in ("collision", "entropy", "max_logit"))
    assert _logged(capsys.readouterr().out) == [
        f"attention step 40/100 | collision {c.mean():.4f} | entropy {e.mean():.3f} (lowest head 0.010) | "
        f"max_logit {m.max():.2f}"]
    acc = _read(tmp_path)
    want = {"attention/collision": c.mean(), "attention/entropy": e.mean(), "attention/entropy_min": 0.01,
            "attention/max_logit": m.max()}
    for layer in range(2):
        want[f"attention/collision/layer_{layer:02d}"] = c[layer].mean()
        want[f"attention/entropy/layer_{layer:02d}"] = e[layer].mean()
        want[f"attention/max_logit/layer_{layer:02d}"] = m[layer].max()
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, value in want.items():
        assert _scalars(acc, tag) == [(40, pytest.approx(float(value), rel=1e-6))], tag
    (event,) = acc.Images("attention/entropy_heatmap")
    image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(float)
    assert image.shape == (2 * 16, 3 * 16, 3)
    brightness = (image[::16, ::16] * [0.2126, 0.7152, 0.0722]).sum(-1)
    assert np.unravel_index(brightness.argmin(), brightness.shape) == (1, 2)
