"""Silence Megatron-core's import-time notices about optional CUDA libraries that a CPU user cannot act on.

Importing megatron.core without NVIDIA Transformer Engine or Apex issues a `UserWarning` per module
("Transformer Engine and Apex are not installed. Falling back to ...", "Apex is not installed. Falling
back to Torch Norm", and, without absl, "absl.logging is not installed ..."): the fallbacks are the
intended path on CPU. The filters below match only those messages, and only when Megatron's own modules
raise them; every other warning (Megatron's included) is still shown. Call it first thing in a CLI's
main, before anything imports megatron: the warnings fire once, at import. Imports nothing but `warnings`
(cheap for every CLI, torch or not).
"""

from __future__ import annotations

import warnings

# message prefixes (regular expressions, matched at the start of the message)
OPTIONAL_DEPENDENCY_MESSAGES = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to ",
    r"absl\.logging is not installed\. ",
)
# Megatron-core's modules (megatron.core.*, and megatron_fsdp when imported under its own name)
MEGATRON_MODULES = r"megatron"


def quiet_optional_dependency_warnings() -> None:
    """Hide Megatron's 'X is not installed, falling back to Y' warnings in this process (idempotent)."""
    for message in OPTIONAL_DEPENDENCY_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=MEGATRON_MODULES)
