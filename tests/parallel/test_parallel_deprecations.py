"""The sequence-parallel collectives call no API that torch deprecates: a deprecated call
warned on every step of every ``parallel.sp > 1`` run (torch 2.13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# a one-process gloo group, in its own process so the test session keeps no process group
SCRIPT = """
import json, os, warnings
import torch, torch.distributed as dist
from stafinetune.parallel.sequence import SequenceParallel, gather_along

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = torch.randn(4, 3, 2, 8, requires_grad=True)  # (b, s, h, d)
    sp = SequenceParallel(dist.group.WORLD, size=1, rank=0)
    y = gather_along(x, 1, dist.group.WORLD)
    z = sp.heads_to_seq(sp.seq_to_heads(y, 3), 3)
    z.sum().backward()
dist.destroy_process_group()
print(json.dumps([f"{w.category.__name__}: {w.message}" for w in caught
                  if issubclass(w.category, (DeprecationWarning, FutureWarning))]))
"""


def test_sequence_parallel_collectives_raise_no_deprecation_warning():
    from stafinetune.parallel.world import _free_port

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PORT": str(_free_port())},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
