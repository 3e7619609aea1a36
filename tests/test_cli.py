"""`fpa-train` rejects a bad config with one clear message and exit status 2, before any process group."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = dict(os.environ, WORLD_SIZE="2")
    return subprocess.run([sys.executable, "-m", "fpa_megatron.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_value_is_named_and_nothing_starts(tmp_path):
    result = _cli("--config", "configs/demo_cpu.yaml", "data.mock=true", "data.tokenizer=null",
                  "model.vocab_size=512", "model.num_attention_heads=3", f"logging.dir={tmp_path}")
    assert result.returncode == 2
    assert "config error" in result.stderr and "model.num_attention_heads=3" in result.stderr
    assert not any(tmp_path.iterdir())  # no run directory, no checkpoint, no process group


def test_unknown_key_is_rejected():
    result = _cli("--config", "configs/demo_cpu.yaml", "model.num_heads=4")
    assert result.returncode == 2 and "model.num_heads" in result.stderr and "unknown key" in result.stderr


def test_check_only_prints_the_run_directory_or_the_one_error_line(tmp_path):
    """What the launchers run before torchrun: the whole check for WORLD_SIZE ranks, and nothing started."""
    ok = ("--config", "configs/demo_cpu.yaml", "data.mock=true", "data.tokenizer=null", "model.vocab_size=512",
          f"logging.dir={tmp_path}")
    result = _cli("--check-only", *ok)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{tmp_path / 'demo_cpu'}\n", "")
    result = _cli("--check-only", *ok, "train.global_batch_size=15")  # 15 is not a multiple of 8 x 2 ranks
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("fpa-train: config error: ") and result.stderr.count("\n") == 1
    assert "train.global_batch_size=15" in result.stderr
    assert not any(tmp_path.iterdir())
