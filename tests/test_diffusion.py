"""Noise schedule, ε-prediction loss and guidance dropout."""

from __future__ import annotations

import pytest
import torch

from rdm.config import DiffusionConfig, preset
from rdm.diffusion import diffusion_loss, make_scheduler
from rdm.model import RetrievalUNet


class Recorder(torch.nn.Module):
    """A fake ε-model that remembers its inputs and predicts zeros."""

    def forward(self, x_t, t, context, drop_mask=None):
        self.x_t, self.t, self.context, self.drop_mask = x_t, t, context, drop_mask
        return torch.zeros_like(x_t)


def test_paper_schedule_is_linear_in_sqrt_beta():
    betas = make_scheduler(DiffusionConfig()).betas.double()
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0195)
    mid = ((0.0015**0.5 + 0.0195**0.5) / 2) ** 2  # LDM make_beta_schedule("linear")
    assert (betas[499] + betas[500]).item() / 2 == pytest.approx(mid, rel=1e-3)
    cosine = make_scheduler(DiffusionConfig(schedule="cosine")).alphas_cumprod
    assert cosine[0] > 0.999 and cosine[-1] < 1e-3


def test_loss_is_eps_mse_at_the_forward_process_sample():
    scheduler = make_scheduler(DiffusionConfig())
    x0 = torch.randn(5, 3, 4, 4)
    ctx = torch.randn(5, 4, 8)
    model = Recorder()
    loss = diffusion_loss(model, x0, ctx, scheduler, torch.Generator().manual_seed(3), 0.0)

    # replay the draws: t, then ε, then the dropout mask
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (5,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(model.t, t)
    torch.testing.assert_close(model.x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)  # eq. 4
    torch.testing.assert_close(loss, eps.square().mean())  # ε_θ = 0 -> ‖ε‖²
    assert model.context is ctx and not model.drop_mask.any()


@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_guidance_dropout_rate_drops_whole_sets(p):
    model = Recorder()
    n = 20_000
    x0 = torch.zeros(n, 1, 1, 1)
    loss_args = (x0, torch.zeros(n, 4, 2), make_scheduler(DiffusionConfig()))
    diffusion_loss(model, *loss_args, torch.Generator().manual_seed(0), p)
    assert model.drop_mask.shape == (n,)  # one flag per sample: the whole neighbour set
    assert model.drop_mask.float().mean().item() == pytest.approx(p, abs=0.01)


def test_loss_decreases_on_a_tiny_overfit_batch():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = RetrievalUNet(cfg.model)
    scheduler = make_scheduler(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    ctx = torch.nn.functional.normalize(torch.randn(2, 4, 16, generator=g), dim=-1)
    x_eval, ctx_eval = x0.repeat(32, 1, 1, 1), ctx.repeat(32, 1, 1)

    def eval_loss():  # the same 64 (t, ε) draws before and after
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return diffusion_loss(model, x_eval, ctx_eval, scheduler, g, 0.0).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):  # 0.33x the loss at 40 steps (0.17x at 100): a wide margin
        g = torch.Generator().manual_seed(step)
        loss = diffusion_loss(model, x0.repeat(8, 1, 1, 1), ctx.repeat(8, 1, 1), scheduler, g, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
