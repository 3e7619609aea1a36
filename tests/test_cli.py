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
