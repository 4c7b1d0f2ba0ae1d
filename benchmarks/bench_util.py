"""What the speed benchmarks share: the run's environment, step timing, a time budget, output.

Imported by the scripts next to it (run as ``python benchmarks/<name>.py``, which puts this
folder on ``sys.path``). Timing uses CUDA events on a GPU and ``perf_counter`` on the CPU
(where the scripts' ``--smoke`` runs only check that every path works).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions and the UTC date of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_device(smoke: bool, script: str) -> torch.device:
    """The CPU for ``--smoke`` runs, else the GPU (exits with a message naming ``script`` when
    there is none)."""
    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU (or --smoke for a CPU check)")
    return device


def args_record(args: Any) -> dict[str, Any]:
    """The parsed command-line arguments as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def describe_environment(env: dict[str, Any]) -> str:
    """One line for the tables: device, torch, triton, date."""
    return f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:16]}Z"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU, wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(time_call(fn, device) for _ in range(iters))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since the last ``reset_peak`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock budget of a run: rows started after it ran out are recorded as skipped,
    so one call on a lent GPU always finishes with whatever it measured."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.elapsed() > self.seconds


def run_guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """``fn()``'s row, or a row with the error (out of memory, a failing kernel) instead:
    one bad configuration must not lose the others' numbers."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (record any failure, measure the other rows)
        free_memory(device)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"error": f"{type(err).__name__}: {first[:300]}"}


def write_results(out: Path, name: str, payload: dict[str, Any], table: str) -> None:
    """``out/name.json`` and ``out/name.md`` (the table ``update_docs.py`` splices into the docs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(table.rstrip() + "\n")
    print(table)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` for None / NaN."""
    if value is None or value != value:
        return missing
    return format(value, spec)


def sdpa_priority(device: torch.device, order: str) -> contextlib.AbstractContextManager:
    """The dense baseline's SDPA backend order (``stafinetune.models.cost_table``'s rule),
    imported on use so that kernel benchmarks do not load the framework."""
    from stafinetune.models.cost_table import sdpa_priority as framework_rule

    return framework_rule(device, order)
