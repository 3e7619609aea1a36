import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (torch does not import triton; megatron-core and deepspeed do)

if not torch.cuda.is_available():
    # Run the fused attention's Triton kernels on CPU tensors, interpreted. Triton reads TRITON_INTERPRET when a
    # function is decorated, and decorates triton.language's own helpers (tl.sum, tl.max) when it is first
    # imported, so this must come before any import of triton: megatron-core and deepspeed import it. (Were
    # triton imported already, the kernels module refuses to load and its tests skip, saying why.)
    os.environ.setdefault("TRITON_INTERPRET", "1")
