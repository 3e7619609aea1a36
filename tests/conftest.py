import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (torch does not import triton; megatron-core and deepspeed do)

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when a kernel is decorated (triton 3.x), so this must precede the import of
    # fpa_megatron.model.triton_attention_kernels: it then runs the fused attention kernels on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
