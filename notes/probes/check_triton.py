"""GPU correctness of the triton backend at one geometry, in a process of its own (a lab
probe: the product's checks are tests/kernels and benchmarks/attention.py's).

Runs forward and backward with CUDA_LAUNCH_BLOCKING-friendly synchronisation after each
kernel and compares against flex STA (large shapes) or the fp64 reference (small shapes),
printing relative errors and the compiler's resource report.

    PYTHONPATH=kernels python notes/probes/check_triton.py --canvas 30,48,80 --heads 2
"""

from __future__ import annotations

import argparse
import math

import torch

from sta_kernels import sliding_tile_attention
from sta_kernels.triton_sta import kernel_resources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas", default="12,16,16")
    parser.add_argument("--tile", default="6,8,8")
    parser.add_argument("--window", default="3,3,3")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    canvas = tuple(int(x) for x in args.canvas.split(","))
    tile = tuple(int(x) for x in args.tile.split(","))
    window = tuple(int(x) for x in args.window.split(","))
    seq = math.prod(canvas)
    shape = (1, seq, args.heads, args.head_dim)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(canvas=canvas, tile=tile, window=window)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_tile_attention(*leaves, backend="triton", **kw)
    torch.cuda.synchronize()
    print("forward ok", kernel_resources())
    grads = torch.autograd.grad(o, leaves, do)
    torch.cuda.synchronize()
    print("backward ok", kernel_resources())
    ref_backend = "reference" if seq <= 4096 else "flex"
    dtype = torch.float64 if ref_backend == "reference" else torch.bfloat16
    ref_leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    ref = sliding_tile_attention(*ref_leaves, backend=ref_backend, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.to(dtype))
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads), strict=True):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        print(f"{name}: rel err vs {ref_backend} {err:.2e}")


if __name__ == "__main__":
    main()
