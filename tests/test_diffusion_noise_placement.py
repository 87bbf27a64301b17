"""Where the loss's randomness lives: t, ε and the dropout mask are drawn on the CPU generator in
float32, then moved to the batch's device.

Found by mutation testing (docs/testing.md), all on a CPU-only suite under the float32 default:
``torch.randn(..., dtype=torch.float32)`` with the dtype dropped passed (under a float64 default
ε, x_t and the loss would silently become float64), and so did ``t.to(None)``, ``eps.to(None)``,
``drop.to(None)`` (on a GPU the model would get CPU tensors). The ``meta`` device stands in for an
accelerator: no data, but every op checks that its inputs share a device.
"""

from __future__ import annotations

import pytest
import torch

from rdm.config import DiffusionConfig
from rdm.diffusion import diffusion_loss, make_scheduler


class Recorder(torch.nn.Module):
    """A fake ε-model that remembers its inputs and predicts zeros."""

    def forward(self, x_t, t, context, drop_mask=None):
        self.x_t, self.t, self.drop_mask = x_t, t, drop_mask
        return torch.zeros_like(x_t)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_loss_noise_stays_float32_under_a_float64_default(float64_default):
    scheduler = make_scheduler(DiffusionConfig())
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float32)
    model = Recorder()
    loss = diffusion_loss(model, x0, None, scheduler, torch.Generator().manual_seed(5), 0.0)
    assert model.x_t.dtype == torch.float32
    assert loss.dtype == torch.float32
    # the value: ε_θ = 0, so the loss is the mean of ε², ε replayed from the same generator
    g = torch.Generator().manual_seed(5)
    torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    torch.testing.assert_close(loss, eps.square().mean())


def test_loss_randomness_follows_the_batch_to_its_device():
    scheduler = make_scheduler(DiffusionConfig())
    x0 = torch.zeros(4, 1, 2, 2, device="meta")  # (B, C, H, W) on a non-CPU device
    model = Recorder()
    loss = diffusion_loss(model, x0, None, scheduler, torch.Generator().manual_seed(1), 0.5)
    assert model.x_t.device == model.t.device == model.drop_mask.device == x0.device
    assert loss.device == x0.device and loss.dtype == torch.float32
