"""Samplers checked against a known answer, per-image seeds, classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from rdm.config import DiffusionConfig, preset
from rdm.diffusion import make_scheduler
from rdm.errors import RdmError
from rdm.model import RetrievalUNet
from rdm.sampling import (
    ddim,
    dpm_solver_pp,
    get_sampler,
    guided,
    initial_noise,
    log_snr_timesteps,
    to_uint8,
)

MU, SIGMA = 0.3, 0.5  # data distribution N(μ, σ² I)


def gaussian_eps(cfg: DiffusionConfig):
    """The exact ε(x_t, t) = E[ε | x_t] for Gaussian data: √(1−ᾱ)(x − √ᾱ μ) / (ᾱσ² + 1 − ᾱ)."""
    ac = make_scheduler(cfg).alphas_cumprod.double()

    def denoise(x, t):
        a = ac[int(t)]
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)).float()

    return denoise, ac


def exact_ode_solution(x_start, t_start, ac):
    """The probability-flow ODE keeps z = (x_t − √ᾱ_t μ) / √(ᾱ_t σ² + 1 − ᾱ_t) fixed."""
    a = ac[t_start]
    z = (x_start.double() - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a).sqrt()
    return (MU + SIGMA * z).float()


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
def test_deterministic_samplers_solve_the_gaussian_ode(schedule):
    cfg = DiffusionConfig(schedule=schedule, clip_sample=False)  # the data is not in [-1, 1]
    denoise, ac = gaussian_eps(cfg)
    x_T, _ = initial_noise(range(64), (1, 4, 4))

    x_ddim = ddim(denoise, x_T, cfg, 100, eta=0.0)
    x_dpm = dpm_solver_pp(denoise, x_T, cfg, 20)
    # both start where DDIM-100 / DPM-20 start: t = (steps − 1)·T/steps + 1
    exact_ddim = exact_ode_solution(x_T, 991, ac)
    exact_dpm = exact_ode_solution(x_T, 951, ac)
    assert (x_ddim - exact_ddim).abs().max() < 0.1
    assert (x_dpm - exact_dpm).abs().max() < 0.03  # 20 second-order steps beat 100 first-order
    assert (x_ddim - x_dpm).abs().mean() < 0.03  # the two samplers agree
    assert x_dpm.std().item() == pytest.approx(SIGMA, abs=0.03)


def test_ddim_eta_one_samples_the_gaussian():
    cfg = DiffusionConfig(clip_sample=False)
    denoise, _ = gaussian_eps(cfg)
    x_T, gens = initial_noise(range(256), (1, 4, 4))
    x0 = ddim(denoise, x_T, cfg, 1000, eta=1.0, generators=gens)  # ancestral = DDPM
    assert x0.mean().item() == pytest.approx(MU, abs=0.02)
    assert x0.std().item() == pytest.approx(SIGMA, abs=0.02)


def test_pixel_space_samplers_clip_x0():
    # a denoiser whose x_0 estimates are far outside the pixel range
    def wild(x, t):
        return -5 * x

    x_T, _ = initial_noise(range(4), (3, 4, 4))
    clipped = ddim(wild, x_T, DiffusionConfig(), 10)
    assert clipped.abs().max() <= 1.0 + 1e-6
    assert ddim(wild, x_T, DiffusionConfig(clip_sample=False), 10).abs().max() > 10


def test_log_snr_timesteps():
    ac = make_scheduler(DiffusionConfig()).alphas_cumprod
    ts = log_snr_timesteps(ac, 20)
    assert len(ts) == 20 and ts[0] == 951 and ts[-1] >= 0
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert len(log_snr_timesteps(ac, 50)) <= 50


def tiny_model():
    torch.manual_seed(0)
    return RetrievalUNet(preset("tiny").model).eval()


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("dpm++", 0.0), ("dpm++", 1.0)])
def test_image_depends_on_its_seed_not_on_the_batch(name, eta):
    model, cfg = tiny_model(), DiffusionConfig()
    sampler = get_sampler(name)
    context = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)

    x_T, gens = initial_noise([5, 6, 7], (3, 8, 8))
    batch = sampler(guided(model, context, None, 2.0), x_T, cfg, 4, eta=eta, generators=gens)
    x_T, gens = initial_noise([6], (3, 8, 8))
    alone = sampler(guided(model, context[1:2], None, 2.0), x_T, cfg, 4, eta=eta, generators=gens)
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-5)


def test_ddim_eta_zero_is_deterministic():
    model, cfg = tiny_model(), DiffusionConfig()
    context = torch.randn(2, 4, 16)
    runs = []
    for seeds in ([1, 2], [1, 2], [3, 4]):
        x_T, _ = initial_noise(seeds, (3, 8, 8))
        runs.append(ddim(guided(model, context, None, 1.0), x_T, cfg, 3, eta=0.0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


class Counting(torch.nn.Module):
    """ε(x, t, c) = x + mean(c): easy to check, and counts forward calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def null_context(self, batch):
        return torch.zeros(batch, 2, 3)

    def forward(self, x, t, context):
        self.calls.append(x.shape[0])
        return x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_formula_with_one_batched_forward():
    model, x, t = Counting(), torch.randn(4, 1, 2, 2), torch.tensor(10)
    context = torch.full((4, 2, 3), 1.0)
    eps = guided(model, context, None, 3.0)(x, t)
    assert model.calls == [8]  # conditional and unconditional halves in one forward
    torch.testing.assert_close(eps, x + 3.0 * 1.0)  # ε(∅) + s (ε(c) − ε(∅))

    model.calls.clear()
    torch.testing.assert_close(guided(model, context, None, 1.0)(x, t), x + 1.0)
    torch.testing.assert_close(guided(model, None, None, 5.0)(x, t), x)  # unconditional
    assert model.calls == [4, 4]
    null = torch.full((4, 2, 3), -1.0)  # an explicit ∅ (e.g. zeros for a learned-∅ model)
    torch.testing.assert_close(guided(model, context, null, 2.0)(x, t), x - 1.0 + 2.0 * 2.0)


def test_errors_and_output_conversion():
    with pytest.raises(RdmError, match="unknown sampler 'plms'"):
        get_sampler("plms")
    with pytest.raises(RdmError, match="eta=0.5 with the dpm"):
        dpm_solver_pp(lambda x, t: x, torch.zeros(1, 1, 2, 2), DiffusionConfig(), 2, eta=0.5)
    img = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2))
    assert img.shape == (1, 2, 2, 3) and img.dtype.name == "uint8"
    assert img[0, :, :, 0].ravel().tolist() == [0, 0, 128, 255]
