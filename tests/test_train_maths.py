"""Known answers for the training loop's small maths: EMA, its decay warm-up, the LR schedule,
gradient clipping, the per-step generator, and that train() applies each of them."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import rdm.train
from rdm.config import TrainConfig, preset
from rdm.train import InMemoryDataset, ema_decay_at, ema_update, lr_at, step_generator, train


def test_ema_update_is_a_lerp_towards_the_model():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in model.parameters():
            p.fill_(3.0)
    ema_update(ema, model, decay=0.9)
    # θ_ema ← 0.9 · 1 + 0.1 · 3 = 1.2 (an inverted update would give 2.8)
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.2))
    for p in model.parameters():  # the model itself is untouched
        torch.testing.assert_close(p, torch.full_like(p, 3.0))


def test_ema_update_copies_buffers():
    ema, model = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    model.running_mean.fill_(5.0)
    ema_update(ema, model, decay=0.99)
    torch.testing.assert_close(ema.running_mean, torch.full((2,), 5.0))


@pytest.mark.parametrize(
    "step, decay, expected",
    [(0, 0.999, 0.1), (1, 0.999, 2 / 11), (90, 0.999, 91 / 100), (10**6, 0.999, 0.999)],
)
def test_ema_decay_warm_up(step, decay, expected):
    assert ema_decay_at(step, decay) == pytest.approx(expected)


def test_lr_warm_up_then_constant():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(10_000, cfg) == pytest.approx(1e-3)
    assert lr_at(3, replace(cfg, warmup_steps=0)) == pytest.approx(1e-3)


def test_step_generator_depends_on_seed_step_and_rank_only():
    def draw(*key):
        return torch.rand(4, generator=step_generator(*key))

    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    for other in ((1, 5, 0), (0, 6, 0), (0, 5, 1)):
        assert not torch.equal(draw(0, 5, 0), draw(*other))


def _tiny(tmp_path, **train_kw):
    cfg = preset("tiny")
    cfg.train = replace(cfg.train, checkpoint_every=1000, keep_last=1, **train_kw)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    contexts = torch.nn.functional.normalize(torch.randn(8, 4, 16, generator=g), dim=-1)
    return cfg, InMemoryDataset(images, contexts)


def test_train_applies_lr_schedule_ema_and_clipping(tmp_path, monkeypatch):
    """Spy on one real train() run: every step's LR is lr_at(step), the EMA after each step is
    the lerp of the previous EMA towards the new weights with ema_decay_at(step), and gradients
    reach the optimizer clipped to grad_clip."""
    cfg, data = _tiny(tmp_path, steps=3, warmup_steps=2, lr=1e-2, grad_clip=1e-3, ema_decay=0.5)
    seen = []
    real_update = rdm.train.ema_update

    def spy_update(ema, model, decay):
        before = copy.deepcopy(ema.state_dict())
        real_update(ema, model, decay)
        seen.append(
            (before, copy.deepcopy(model.state_dict()), copy.deepcopy(ema.state_dict()), decay)
        )

    monkeypatch.setattr(rdm.train, "ema_update", spy_update)
    norms, lrs = [], []
    real_step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    train(cfg, tmp_path / "run", data, progress=False)

    assert lrs == pytest.approx([lr_at(s, cfg.train) for s in (1, 2, 3)])  # 5e-3, 1e-2, 1e-2
    assert max(norms) <= 1e-3 * (1 + 1e-4)  # clipped to grad_clip
    assert [d for *_, d in seen] == pytest.approx([ema_decay_at(s, 0.5) for s in (1, 2, 3)])
    for before, model, after, decay in seen:
        for name, value in after.items():
            expected = decay * before[name] + (1 - decay) * model[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
