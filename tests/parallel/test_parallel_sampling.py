"""Sampling on several processes (``parallel.sp`` x ``parallel.cfg``) against one process,
under torchrun on CPU with gloo, and the start-up errors of a launch that does not fit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from parallel_testing import TORCHRUN

from stafinetune.commands import eval as eval_command
from stafinetune.commands import sample as sample_command
from stafinetune.config import conf_dir, to_job_config
from stafinetune.errors import UserError
from stafinetune.parallel import World
from stafinetune.parallel.sampling import SampleParallelConfig, sampling_dims

HERE = Path(__file__).parent
PROMPTS = ["a red circle moving right at 3 pixels per frame", "a green diamond"]
# the command on the random tiny Wan at 9 x 48 x 80 pixels: what runs where, not what it draws
COMMAND = ("model=wan_tiny", "data.num_frames=9", "data.height=48", "data.width=80",
           "sample.steps=2", "sample.guidance_scale=3", "sample.device=cpu",
           "sample.warmup=false", "logging.progress=false")  # fmt: skip


def _launch(tmp_path: Path, nproc: int, *args: str) -> dict:
    """``sample_check.py`` under torchrun in ``tmp_path`` (the command's Hydra outputs go to
    ``tmp_path/outputs``); its report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", str(HERE / "sample_check.py"),
         str(tmp_path / "check"), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def _assert_parity(report: dict, layouts: tuple[str, ...]) -> None:
    flavors = ("wan_tiny", "hunyuan_tiny", "wan22_tiny_experts", "wan22_tiny_ti2v")
    assert set(report) == {f"{lay}/{f}" for lay in layouts for f in flavors}
    for case, result in report.items():
        assert result["latents"] < 1e-5, (case, result)  # batch 2 vs 1 and sp: float rounding
        assert result["ranks"] == 0.0, (case, result)  # every rank holds the same latents
        assert result["written"] == [0], (case, result)  # only rank 0 writes


def _one_run_dir(tmp_path: Path, command: str, nproc: int) -> Path:
    """The one run directory of a launch whose ranks' Hydra may have made several."""
    (run,) = (tmp_path / "outputs" / command).glob("*/*")
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [f"rank{r}" for r in range(nproc)]
    assert sorted(p.name for p in run.glob("*.log")) == [
        f"{command}_rank{r}.log" for r in range(nproc)
    ]
    return run


def _prompts(tmp_path: Path, count: int) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:count]) + "\n")
    return f"sample.prompts={path}"


@pytest.mark.slow
def test_sp_and_cfg_sampling_match_one_process_and_rank_0_writes(tmp_path: Path):
    report = _launch(tmp_path, 2, "2x1", "1x2", "--", "sample", "parallel.cfg=2",
                     _prompts(tmp_path, 2), *COMMAND)  # fmt: skip
    _assert_parity(report, ("2x1", "1x2"))
    run = _one_run_dir(tmp_path, "sample", 2)
    samples = json.loads((run / "samples.json").read_text())
    assert samples["parallel"] == {"sp": 1, "cfg": 2} and samples["guidance_scale"] == 3.0
    files = sorted(p.name for p in (run / "videos").iterdir())
    assert files == [r["file"] for r in samples["samples"]] and len(files) == 2


@pytest.mark.slow
def test_sp_times_cfg_on_four_ranks_matches_one_process_and_eval_compares(tmp_path: Path):
    sparse = ("attention.dense_first_steps=1", "attention.window=[2,1,2]")  # 2nd step sparse
    report = _launch(tmp_path, 4, "2x2", "--", "eval", "parallel.sp=2", "parallel.cfg=2",
                     *sparse, _prompts(tmp_path, 1), *COMMAND)  # fmt: skip
    _assert_parity(report, ("2x2",))
    run = _one_run_dir(tmp_path, "eval", 4)
    compare = json.loads((run / "compare.json").read_text())
    dense, sta = compare["models"]["dense"], compare["models"]["sta"]
    assert dense["settings"]["parallel"] == sta["settings"]["parallel"] == {"sp": 2, "cfg": 2}
    # the reference against itself, and STA away from it
    assert dense["mean"]["latent_gap"] == 0.0 and sta["mean"]["latent_gap"] > 0
    assert [len(list((run / m / "videos").iterdir())) for m in ("dense", "sta")] == [1, 1]


def _compose(config: str, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_job_config(compose(config_name=config, overrides=list(overrides)))


def test_a_launch_of_the_wrong_size_is_named_at_start_up(tmp_path: Path):
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"parallel.sp=2 x parallel.cfg=2 needs exactly 4 "
                                         r"process\(es\), but 2 were launched"):  # fmt: skip
        sampling_dims(SampleParallelConfig(sp=2, cfg=2), world)
    with pytest.raises(ValueError, match="sample.device=cuda:0 puts every rank on one GPU"):
        sampling_dims(SampleParallelConfig(sp=1, cfg=2), world, "cuda:0")
    dims = sampling_dims(SampleParallelConfig(sp=1, cfg=2), world, "cuda")
    assert (dims.sp, dims.dp_size, dims.dp_rank, dims.sp_rank) == (1, 2, 0, 0)
    job = _compose("sample", "parallel.sp=2", "sample.device=cpu")
    with pytest.raises(UserError, match=r"needs exactly 2 process\(es\), but 1 were launched"):
        sample_command.run(job, tmp_path / "run")  # in one process, before any model is built
    assert not (tmp_path / "run").exists()


def test_guidance_parallelism_needs_guidance_and_a_compare_run():
    with pytest.raises(ValueError, match="parallel.cfg=2 .* sample.guidance_scale=1 runs no guid"):
        _compose("sample", "parallel.cfg=2")
    with pytest.raises(ValueError, match="parallel.cfg=2 .* sample.guidance_scale=1"):
        _compose("eval", "parallel.cfg=2")
    with pytest.raises(ValueError, match="mode=score samples nothing"):
        _compose("eval", "videos=/x", "parallel.sp=2")
    with pytest.raises(ValueError, match="parallel.cfg must be 1 or 2, got 3"):
        _compose("sample", "parallel.cfg=3", "sample.guidance_scale=2")
    job = _compose("eval", "parallel.cfg=2", "sample.guidance_scale=4")
    assert isinstance(job, eval_command.EvalJobConfig) and job.parallel.processes == 2
