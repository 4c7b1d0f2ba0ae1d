"""Probe: few-step students on the embedded default, several settings at once (GPU or CPU).

Runs ``python -m stafinetune train`` once per setting (``logging=none``, its own run
directory), several at a time, and prints each run's last validation: the student's motion
direction / speed error, dynamic degree and PSNR / SSIM against the teacher's 20-step video.

    python notes/probes/fewstep_sweep.py --out /tmp/sweep --jobs 6 --steps 300 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BASE = ["logging=none", "logging.progress=false", "attention.dense_first_steps=0",
        "train.export=false", "train.ckpt_every=0", "train.log_every=10"]
SETTINGS = {
    "dmd2": ["distill=dmd2"],
    "dmd2_b0": ["distill=dmd2", "train.betas=[0.0,0.999]"],
    "dmd2_lr1e-4": ["distill=dmd2", "train.lr=1e-4"],
    "dmd2_full_critic": ["distill=dmd2", "distill.fewstep.critic_attention=full"],
    "dmd2_ratio2": ["distill=dmd2", "distill.fewstep.critic_ratio=2"],
    "dmd2_euler": ["distill=dmd2", "distill.fewstep.stochastic=false"],
    "dmd2_aux_out": ["distill=dmd2", "distill.w_out=1.0", "distill.w_attn=1.0"],
    "traj": ["distill=trajectory"],
    "traj_lr1e-4": ["distill=trajectory", "train.lr=1e-4"],
    "traj_aux": ["distill=trajectory", "distill.w_attn=1.0"],
}
KEYS = ("val/student/motion_direction_error_deg", "val/student/motion_speed_error",
        "val/student/dynamic_degree", "val/student/psnr", "val/student/ssim",
        "val/teacher/motion_direction_error_deg")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=4, help="validation videos")
    parser.add_argument("--only", default="", help="comma-separated setting names")
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    args = parser.parse_args()
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",")]
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "stafinetune", "train", *BASE, *SETTINGS[name],
                   f"train.steps={args.steps}", f"train.val_every={max(args.steps // 3, 1)}",
                   f"train.num_samples={args.samples}", f"train.device={args.device}",
                   f"hydra.run.dir={args.out / name}", *args.extra]
            log = open(args.out / f"{name}.log", "w")  # noqa: SIM115
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                             time.time())
        time.sleep(2)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            rows = []
            metrics = args.out / name / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            vals = [r for r in rows if "val/student/motion_direction_error_deg" in r]
            results[name] = {
                "rc": proc.returncode, "seconds": round(time.time() - start, 1),
                "history": [{k: round(r[k], 3) for k in (*KEYS, "step") if k in r} for r in vals],
            }
            print(name, json.dumps(results[name]), flush=True)
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'setting':<18} {'rc':>3} {'sec':>6} " + " ".join(f"{k.split('/')[-1][:14]:>14}" for k in KEYS))
    for name, res in results.items():
        last = res["history"][-1] if res["history"] else {}
        print(f"{name:<18} {res['rc']:>3} {res['seconds']:>6} "
              + " ".join(f"{last.get(k, float('nan')):>14.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
