"""Learning-rate schedule, EMA and trainable-parameter selection."""

import pytest
import torch
from torch import nn

from stafinetune.diffusion.flow_matching import add_noise, sample_sigmas, velocity_target
from stafinetune.training.optim import EMA, lr_lambda, select_trainable


def test_schedule_warmup_then_cosine_to_floor():
    f = lambda s: lr_lambda(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert lr_lambda(50, warmup=0, total=100, schedule="constant", min_ratio=0.0) == 1.0


def test_ema_tracks_weights_and_roundtrips():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    target = nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


def test_ema_update_formula():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)
    assert ema.shadow["weight"].item() == pytest.approx(1.0 - d)


def test_select_trainable_attention_only():
    model = nn.ModuleDict({"attn1": nn.Linear(2, 2), "ffn": nn.Linear(2, 2)})
    names = select_trainable(model, "attention")
    assert names == ["attn1.weight", "attn1.bias"]
    assert not model["ffn"].weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(model, "nothing_here")
    with pytest.raises(ValueError, match="not a valid regex"):
        select_trainable(model, "(")


def test_flow_matching_interpolation():
    x0, noise = torch.ones(2, 1, 1, 1, 1), torch.zeros(2, 1, 1, 1, 1)
    sigma = torch.tensor([0.25, 1.0])
    xt = add_noise(x0, noise, sigma)
    assert xt.flatten().tolist() == [0.75, 0.0]
    assert torch.equal(velocity_target(x0, noise), -x0)
    torch.manual_seed(0)
    s = sample_sigmas(1000, sampling="logit_normal", shift=3.0)
    assert 0 < s.min() and s.max() < 1 and s.mean() > 0.5  # shift moves mass to high noise
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas(4, sampling="beta", shift=1.0)
