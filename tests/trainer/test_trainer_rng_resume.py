"""Global RNG states travel through a real checkpoint: after a resumed run, python's, numpy's,
torch's (and CUDA's) generators continue exactly as after an uninterrupted run."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stafinetune.config import JobConfig
from stafinetune.data import build_train_loader
from stafinetune.training.trainer import Trainer

STEPS, STOP = 2, 1


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _draw() -> dict[str, list[float]]:
    """The next numbers of each global generator (advances them)."""
    out = {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(3).tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.rand(3, device="cuda").tolist()
    return out


@pytest.fixture(scope="module")
def continuations(
    tiny_job: Callable[..., JobConfig], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, dict[str, list[float]]]]:
    """What each global generator yields after an uninterrupted run of STEPS steps and after
    a run stopped at STOP and resumed in a "new process" (generators seeded differently)."""

    def job() -> JobConfig:
        return tiny_job(f"train.steps={STEPS}", "train.ckpt_every=0", "distill=none")

    def start(run_dir: Path) -> Trainer:
        _seed_all(1)
        trainer = Trainer(job(), run_dir)
        # code between set-up and training draws from every generator (Trainer seeds torch
        # itself, so without this a lost torch state would go unnoticed)
        _draw()
        return trainer

    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    tmp = tmp_path_factory.mktemp("rng")
    start(tmp / "straight").fit()
    straight = _draw()
    first = start(tmp / "resumed").fit(until_step=STOP)
    assert first.step == STOP and first.last_checkpoint is not None
    _seed_all(2)  # a new process: nothing carries over but the checkpoint
    second = Trainer(job(), tmp / "resumed")
    assert second.step == STOP
    second.fit()
    resumed = _draw()
    yield {"straight": straight, "resumed": resumed}
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.random.set_rng_state(saved[2])


@pytest.mark.parametrize("generator", ["python", "numpy", "torch"])
def test_cpu_generators_continue_after_resume(
    continuations: dict[str, dict[str, list[float]]], generator: str
):
    assert continuations["resumed"][generator] == continuations["straight"][generator]


def test_cuda_generator_continues_after_resume(continuations: dict[str, dict[str, list[float]]]):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA generator state is not saved")
    assert continuations["resumed"]["cuda"] == continuations["straight"]["cuda"]


def test_iterating_the_loader_leaves_the_global_torch_generator_alone(
    tiny_job: Callable[..., JobConfig],
):
    # the trainer iterates its loader afresh after every resume: a draw from torch's global
    # generator there would shift the restored state (DataLoader's worker base seed did)
    loader = build_train_loader(tiny_job().data, batch_size=4, seed=0)
    before = torch.random.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.random.get_rng_state(), before)


def _saved_python_state(checkpoint: Path) -> object:
    from stafinetune.training.checkpoint import load_tree

    return load_tree(checkpoint / f"rank_{0:05d}")["rng"]["python"]


def test_python_random_state_of_a_resumed_run_equals_the_uninterrupted_ones(
    tiny_job: Callable[..., JobConfig], tmp_path: Path
):
    # separate processes start from different OS entropy: so do these three "processes"
    def job() -> JobConfig:
        return tiny_job(f"train.steps={2 * STOP}", f"train.ckpt_every={STOP}", "distill=none")

    saved = random.getstate()
    try:
        random.seed(101)
        straight = Trainer(job(), tmp_path / "straight").fit()
        straight_state = random.getstate()
        random.seed(202)
        first = Trainer(job(), tmp_path / "resumed").fit(until_step=STOP)  # killed after N
        assert first.last_checkpoint is not None
        random.seed(303)
        resumed = Trainer(job(), tmp_path / "resumed")
        assert resumed.step == STOP
        result = resumed.fit()
        assert random.getstate() == straight_state
        assert _saved_python_state(result.last_checkpoint) == _saved_python_state(
            straight.last_checkpoint
        )
    finally:
        random.setstate(saved)
