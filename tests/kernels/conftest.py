"""Kernel tests run the triton kernels in triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, i.e. when
``sta_kernels.kernels.triton_sta`` is first imported; ``sta_kernels.api`` imports it lazily
(through ``sta_kernels.ops``), so setting the variable here, at collection time, is early
enough for the whole session.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device() -> torch.device:
    """The device the triton backend runs on here (CUDA, or CPU through the interpreter)."""
    from sta_kernels.kernels import triton_sta

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not triton_sta.is_interpreter():
        pytest.skip("triton_sta was imported before TRITON_INTERPRET=1 could be set")
    return torch.device("cpu")
