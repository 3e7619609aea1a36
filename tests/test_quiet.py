"""The CLIs hide Megatron's 'Transformer Engine / Apex not installed' warnings, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from data_prep.quiet import quiet_optional_dependency_warnings

ROOT = Path(__file__).resolve().parents[1]
TE_APEX = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
APEX_NORM = "Apex is not installed. Falling back to Torch Norm"


def _shown(message: str, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, UserWarning, "file.py", 1, module=module)
    return bool(caught)


def test_only_megatrons_optional_dependency_warnings_are_hidden():
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert _shown(TE_APEX, "megatron.core.optimizer")  # shown before
        quiet_optional_dependency_warnings()
        assert not _shown(TE_APEX, "megatron.core.optimizer")
        assert not _shown(APEX_NORM, "megatron.core.models.backends")
        assert not _shown("Transformer Engine and Apex are not installed. Falling back to local implementations "
                          "of multi_tensor_applier", "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision")
        # anything else stays visible: other messages from Megatron, the same message from another package
        assert _shown("full scope is deprecated. Use empty cuda_graph_scope", "megatron.core.transformer")
        assert _shown(APEX_NORM, "my_package.norms")
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit(APEX_NORM, DeprecationWarning, "file.py", 1, module="megatron.core")
        assert caught


PROBE = r"""
import sys, traceback, warnings
defaults = list(warnings.filters)
from data_prep.cli import main as prep_main
assert "megatron" not in sys.modules
print("== fpa-prep inspect", file=sys.stderr, flush=True)
code = prep_main(["inspect", sys.argv[1]])  # imports megatron.core (its optimizer warns at import) then fails
assert code == 2 and "megatron.core.optimizer" in sys.modules, code
warnings.filters[:] = defaults  # fpa-train must install its own filters
print("== fpa-train", file=sys.stderr, flush=True)
from fpa_megatron.cli import main as train_main
assert "megatron.core.models.backends" not in sys.modules
try:
    train_main(["--config", "configs/demo_cpu.yaml", "data.mock=true", "data.tokenizer=null",
                "model.vocab_size=512", "logging.dir=" + sys.argv[2]])
except (Exception, SystemExit):
    traceback.print_exc()  # no torchrun environment: init_process_group fails, after the model code imported
assert "megatron.core.models.backends" in sys.modules
print("== end", file=sys.stderr, flush=True)
"""


def test_cli_stderr_keeps_genuine_errors_without_optional_dependency_warnings(tmp_path):
    """One fresh interpreter, two CLIs: `fpa-prep inspect` is the first to import megatron.core (the
    'Transformer Engine and Apex' warnings fire then); the filters are reset, then `fpa-train` imports the
    model code (the 'Apex ... Torch Norm' warnings fire then). Each stage's real error must still show."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "PYTHONWARNINGS")}
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "missing"), str(tmp_path / "runs")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    _, _, rest = res.stderr.partition("== fpa-prep inspect\n")
    prep, _, rest = rest.partition("== fpa-train\n")
    train, end, _ = rest.partition("== end\n")
    assert end, res.stderr
    assert f"fpa-prep inspect: error: not an indexed dataset (missing .bin or .idx): {tmp_path / 'missing'}" in prep
    assert "environment variable RANK expected" in train
    assert "not installed" not in res.stderr and "Falling back" not in res.stderr, res.stderr
