"""Custom ops and GPU kernels of the rewrite."""

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the 16-bit floating dtypes the GPU kernels serve
