"""What the Triton backend supports; kept apart so dispatch needs no triton import."""

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
