"""What a newcomer sees: a real 2-rank `fpa-train` under torchrun prints only the project's own lines (no
third-party notice a user cannot act on, no C++ build), and commands import only what their input needs."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

from fpa_megatron.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
# the run log's format (fpa_megatron/run_log.py): time, rank, message
OWN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank \d+\] ")


def test_training_prints_only_its_own_lines_and_builds_no_cpp(tmp_path):
    """torchrun, 2 ranks, ZeRO-1, mock data. TORCH_EXTENSIONS_DIR is empty, so a JIT build of any DeepSpeed op
    would compile there (and print 'built successfully'); nothing is compiled and every line is a log line."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "PYTHONWARNINGS", "DS_ACCELERATOR")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "fpa_megatron.cli", "--config", "configs/demo_cpu.yaml",
               "data.mock=true", "data.tokenizer=null", "model.vocab_size=512", "model.num_layers=2",
               "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
               "model.max_position_embeddings=32", "train.steps=2", "train.eval_interval=0",
               "train.global_batch_size=4", "train.micro_batch_size=2", "logging.attention_stats_interval=0",
               "logging.tensorboard=false", "checkpoint.save_at_end=false", f"logging.dir={tmp_path / 'runs'}",
               f"data.cache_dir={tmp_path / 'cache'}"]
    res = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    foreign = [line for line in lines if not OWN_LINE.match(line)]
    assert not foreign, "lines that are not the run log's:\n" + "\n".join(foreign)
    assert any("done: 2 steps" in line for line in lines), output
    assert not any(extensions.iterdir()), list(extensions.iterdir())  # no op was compiled


HEAVY = ("torch", "megatron", "deepspeed", "transformers")
PROBE = r"""
import importlib, sys
module, function = sys.argv[1].split(":")
try:
    getattr(importlib.import_module(module), function)(["--help"])
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
else:
    raise AssertionError(f"{sys.argv[1]} --help did not exit")
print(" ".join(sorted({m.split('.')[0] for m in sys.modules})))
"""


def console_scripts() -> dict[str, str]:
    """name -> module:function of every console script in setup.cfg (read with the standard library's parser)."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def test_help_imports_no_heavy_library():
    """`--help` of every CLI parses its arguments without importing torch, Megatron, DeepSpeed or transformers
    (what made `fpa-reshard --help` take seconds and print Megatron's warnings): each `--help` stays well
    under a second."""
    scripts = console_scripts()
    assert len(scripts) == 10 and "fpa-train" in scripts, scripts
    for module in scripts.values():
        res = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, (module, res.stderr)
        imported = set(res.stdout.split("\n")[-2].split())
        assert not imported & set(HEAVY), (module, sorted(imported & set(HEAVY)))
        assert "Transformer Engine" not in res.stderr, (module, res.stderr)
