"""Measure the data pipeline on the embedded default and write the numbers as JSON.

    python benchmarks/data_pipeline.py --out data_pipeline.json [data.key=value ...]

Times, in a fresh temporary data root: synthetic generation, decoding + encoding into the cache
(inline and with decode workers), finding the finished cache again, and loader throughput
(batches/s) with 0 and 2 workers. Prints one JSON object; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from stafinetune.data import build_train_loader, prepare_data
from stafinetune.data.preprocess import load_config
from stafinetune.data.sources import build_source


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 3)


def run(overrides: list[str], batches: int = 64) -> dict:
    """Run every measurement in a fresh temporary root; return the numbers."""
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config("synthetic", [f"data.root={root}", *overrides])
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "torch": torch.__version__,
            },
            "clips": cfg.num_clips,
            "generate_s": _timed(lambda: build_source(cfg)),
        }
        for workers in (0, 2):
            variant = replace(cfg, decode_workers=workers, name=f"bench{workers}")
            result[f"encode_s_decode_workers_{workers}"] = _timed(
                lambda v=variant: prepare_data(v, verbose=False)
            )
        result["cached_s"] = _timed(
            lambda: prepare_data(replace(cfg, name="bench0"), verbose=False)
        )
        for workers in (0, 2):
            loader = build_train_loader(
                replace(cfg, name="bench0"), batch_size=4, seed=0, num_workers=workers
            )
            start = time.perf_counter()
            for _ in itertools.islice(iter(loader), batches):
                pass
            result[f"loader_batches_per_s_workers_{workers}"] = round(
                batches / (time.perf_counter() - start), 1
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = run(args.overrides)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
