"""Flow-matching sampler: schedule and exactness on a model with a known velocity field."""

import pytest
import torch
from torch import nn

from stafinetune.diffusion.sampling import flow_sigmas, sample_latents, to_uint8_video


def test_schedule_endpoints_and_shift():
    s = flow_sigmas(4)
    assert s.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > s[1:-1]).all()
    with pytest.raises(ValueError, match="at least 1 step"):
        flow_sigmas(0)


class _ExactVelocity(nn.Module):
    """Predicts v = noise - x0 exactly for a fixed target x0 (so Euler is exact)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.steps: list[int] = []

    def forward(self, x, timestep, text, text_mask, pooled=None, *, step_index=None):
        sigma = timestep[0] / 1000.0
        self.steps.append(step_index)
        # x = (1 - sigma) x0 + sigma n  =>  n = (x - (1 - sigma) x0) / sigma
        noise = (x - (1 - sigma) * self.x0) / sigma
        return noise - self.x0


def test_euler_recovers_the_target_and_passes_step_indices():
    x0 = torch.randn(2, 4, 3, 2, 2)
    model = _ExactVelocity(x0)
    out = sample_latents(
        model,
        torch.randn_like(x0),
        torch.zeros(2, 3, 8),
        torch.ones(2, 3, dtype=torch.bool),
        steps=5,
        shift=2.0,
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert model.steps == [0, 1, 2, 3, 4]


def test_uint8_video_layout():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    out = to_uint8_video(video)
    assert out.shape == (4, 1, 1, 3) and out.dtype == torch.uint8
    assert out[:, 0, 0, 0].tolist() == [0, 128, 255, 255]
