"""Silence third-party notices that a user cannot act on, and nothing else.

Importing megatron.core without NVIDIA Transformer Engine or Apex issues a `UserWarning` per module
("Transformer Engine and Apex are not installed. Falling back to ...", "Apex is not installed. Falling
back to Torch Norm", and, without absl, "absl.logging is not installed ..."): the fallbacks are the
intended path on CPU. The filters below match only those messages, and only when Megatron's own modules
raise them; every other warning (Megatron's included) is still shown. Call it first thing in a CLI's
main, before anything imports megatron: the warnings fire once, at import. Imports nothing but `os` and
`warnings` (cheap for every CLI, torch or not). `quiet_training_notices` adds what a training run prints
beyond that: DeepSpeed's accelerator guess and torch's deprecation of the collective DeepSpeed's ZeRO calls.
"""

from __future__ import annotations

import os
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


# torch 2.13 deprecates the collective that DeepSpeed 0.19's ZeRO all-gathers its partitions with; raised through
# torch's c10d logging wrapper on every rank at the first step (DeepSpeed's to change, not the user's)
DEPRECATED_COLLECTIVE_MESSAGE = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
TORCH_C10D_WRAPPER = r"torch\.distributed\.c10d_logger"


def quiet_training_notices() -> None:
    """What fpa-train adds to `quiet_optional_dependency_warnings`: without CUDA, tell DeepSpeed it runs on
    the CPU (it would guess so and warn "Setting accelerator to CPU" on every rank), and hide torch's
    deprecation of DeepSpeed's all-gather. Call before deepspeed is imported; DS_ACCELERATOR set by the
    user wins."""
    quiet_optional_dependency_warnings()
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVE_MESSAGE, category=FutureWarning,
                            module=TORCH_C10D_WRAPPER)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
