import pytest
import torch
from torch import nn

from ddpdiff.ema import EMA


def test_ema_starts_as_exact_copy_and_follows_the_decay():
    model = nn.Linear(4, 2)
    ema = EMA(model, decay=0.9)
    for p, q in zip(model.parameters(), ema.model.parameters()):
        assert torch.equal(p, q) and not q.requires_grad
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1000)
    for b, p, q in zip(before, model.parameters(), ema.model.parameters()):
        torch.testing.assert_close(q, 0.9 * b + 0.1 * p)


def test_decay_warms_up_to_its_configured_value():
    ema = EMA(nn.Linear(1, 1), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.999
    assert all(ema.decay_at(s) <= ema.decay_at(s + 1) for s in range(0, 20000, 97))
