"""EMA over many updates against an independent recurrence, on both sides of the warm-up cap."""

from __future__ import annotations

import torch
from torch import nn

from stafinetune.training.optim import EMA

DECAY = 0.6  # the warm-up cap (1 + n) / (10 + n) is below it for n <= 12, above from n = 13
UPDATES = 25


def _weights(model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Give the model fresh random weights; return them as float64."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def test_ema_follows_the_capped_recurrence_over_many_updates():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    expected = _weights(model, gen)  # the average starts at the initial weights
    ema = EMA(model, decay=DECAY)
    decays = []
    for n in range(1, UPDATES + 1):
        w = _weights(model, gen)
        d = DECAY if n >= 13 else (1 + n) / (10 + n)  # effective decay of update n
        decays.append(d)
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in expected}
        ema.update(model)
        assert ema.updates == n
        for k, v in expected.items():
            # fp32 shadow after n lerps of O(1) values
            torch.testing.assert_close(ema.shadow[k].double(), v, rtol=0, atol=1e-6, msg=f"n={n}")
    assert min(decays) < 0.2 and decays.count(DECAY) == UPDATES - 12  # both regimes ran


def test_ema_resumes_mid_warmup_with_its_update_count():
    # a restored EMA must continue with the cap of its own update count, not restart it
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 3)
    ema = EMA(model, decay=DECAY)
    for _ in range(5):
        _weights(model, gen)
        ema.update(model)
    restored = EMA(nn.Linear(4, 3), decay=DECAY)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5
    for _ in range(10):
        _weights(model, gen)
        ema.update(model)
        restored.update(model)
        for k in ema.shadow:
            assert torch.equal(restored.shadow[k], ema.shadow[k]), k
