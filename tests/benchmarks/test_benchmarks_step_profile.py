"""The step profiler's buckets: kernel names as the CUDA profiler reports them land in the
right bucket, and a profiled CPU step accounts its matmul and attention time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from step_profile import bucket_of, profile_step, render_breakdown  # noqa: E402


@pytest.mark.parametrize(
    ("name", "bucket"),
    [
        ("_sta_fwd_kernel", "attention"),
        ("_sta_dkdv_kernel", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norm"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "optimizer",
        ),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float4, 2>", "copy/cast"),
        ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copy/cast"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "elementwise"),
        ("aten::mm", "matmul"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernel_names_land_in_their_bucket(name, bucket):
    assert bucket_of(name) == bucket


def test_profiled_cpu_step_counts_matmul_and_attention():
    a = torch.randn(256, 256)
    q = torch.randn(1, 2, 64, 16)

    def step():
        for _ in range(4):
            a @ a
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    prof = profile_step(step, torch.device("cpu"))
    assert prof["wall_ms"] > 0 and "idle_ms" not in prof  # idle: CUDA only
    assert prof["buckets"]["matmul"] > 0 and prof["buckets"]["attention"] > 0
    assert sum(prof["buckets"].values()) <= prof["wall_ms"] * 1.05
    table = render_breakdown([{"suite": "s", "kind": "distill", "policy": "full", "profile": prof}])
    assert table.count("\n") == 2 and "| s distill full |" in table
