"""Prediction types (ε, v, x_0), min-SNR-γ weighting, zero terminal SNR and grey models: checked
against diffusers and closed forms, and each sampler against the Gaussian known answer whatever
the network predicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_sampling import MU, SIGMA, X_T, exact_ode_solution, gaussian_eps

from rdm.config import ConfigError, DiffusionConfig, ModelConfig, preset
from rdm.diffusion import (
    diffusion_loss,
    make_scheduler,
    min_snr_weights,
    split_prediction,
    top_timestep,
    training_target,
)
from rdm.model import RetrievalUNet, decode, encode
from rdm.sampling import default_timesteps, denoised, get_sampler, sample, to_uint8

TYPES = ["epsilon", "v_prediction", "sample"]


def draws(seed=0, shape=(6, 2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_v_target_is_diffusers_velocity():
    x0, eps = draws()
    scheduler = make_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = training_target(x0, eps, a, "v_prediction")
    torch.testing.assert_close(v, scheduler.get_velocity(x0, eps, t), atol=1e-6, rtol=0)
    assert torch.equal(training_target(x0, eps, a, "epsilon"), eps)
    assert torch.equal(training_target(x0, eps, a, "sample"), x0)


@pytest.mark.parametrize("prediction", TYPES)
@pytest.mark.parametrize("alpha_bar", [0.9991, 0.5, 0.012**2])
def test_split_prediction_inverts_the_target(prediction, alpha_bar):
    """The exact target at x_t = √ᾱ x_0 + √(1 − ᾱ) ε gives back (x_0, ε), for every type."""
    x0, eps = draws(1)
    a = torch.tensor(alpha_bar, dtype=torch.float64)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    out = training_target(x0, eps, a.float(), prediction)
    x0_hat, eps_hat = split_prediction(out, x_t, alpha_bar, prediction)
    # ε-prediction divides by √ᾱ = 0.012 at the top, x_0-prediction by √(1 − ᾱ) = 0.03 at the
    # bottom: float32 round-off grows by that factor there
    amplified = (prediction, alpha_bar < 0.01) in (("epsilon", True), ("sample", False))
    tol = 1e-4 if amplified and alpha_bar != 0.5 else 2e-6
    torch.testing.assert_close(x0_hat, x0, atol=tol, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=tol, rtol=0)


def test_v_prediction_is_defined_at_zero_snr():
    """ᾱ = 0: x_t = ε, v = −x_0; x̂_0 = −v and ε̂ = x_t without dividing by anything."""
    x0, eps = draws(2)
    x0_hat, eps_hat = split_prediction(-x0, eps, 0.0, "v_prediction")
    assert torch.equal(x0_hat, x0) and torch.equal(eps_hat, eps)


def test_min_snr_weights_known_answer():
    """Hang et al. 2023 with γ = 5: min(SNR, 5)/SNR for ε, min(SNR, 5)/(SNR + 1) for v."""
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    v = min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51]))
    eps = min_snr_weights(snr[1:], 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "sample"), torch.tensor([0.0, 0.5, 5.0, 5.0])
    )


class Affine(torch.nn.Module):
    """A 'network' whose output is a fixed function of x_t and t, to check the loss by hand."""

    def forward(self, x, t, context, drop_mask=None):
        return 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", TYPES)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_the_weighted_error_of_the_target(prediction, gamma):
    """diffusion_loss draws t, ε, mask from the generator in that order; recompute it by hand."""
    from diffusers.training_utils import compute_snr

    cfg = DiffusionConfig(prediction_type=prediction)
    scheduler = make_scheduler(cfg)
    x0 = draws(3, (8, 1, 4, 4))[0].clamp(-1, 1)
    loss = diffusion_loss(
        Affine(), x0, None, scheduler, torch.Generator().manual_seed(7), 0.0, gamma
    )

    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}
    err = (0.5 * x_t + 1e-3 * t.view(-1, 1, 1, 1) - target[prediction]).pow(2).mean((1, 2, 3))
    if gamma is not None:
        snr = compute_snr(scheduler, t)
        base = torch.minimum(snr, torch.full_like(snr, gamma))
        err = err * base / {"epsilon": snr, "v_prediction": snr + 1, "sample": 1}[prediction]
    assert loss.item() == pytest.approx(err.mean().item(), rel=1e-5)


def test_zero_terminal_snr_schedule():
    cfg = DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    ac = make_scheduler(cfg).alphas_cumprod
    assert ac[-1].item() == 0.0 and ac[0].item() > 0.99  # pure noise at the top only
    assert top_timestep(cfg) == 999
    cosine = dataclasses.replace(cfg, schedule="cosine")
    assert top_timestep(cosine) == 999  # no 1/√ᾱ amplification when x̂_0 is predicted
    for name in ("ddim", "dpm++"):
        steps = default_timesteps(name, cfg, 20)
        assert steps[0] == 999 and steps[-1] == 0 and len(set(steps)) == 20
    with pytest.raises(ConfigError, match="zero_terminal_snr.*v_prediction"):
        DiffusionConfig(zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="prediction_type='x0'"):
        DiffusionConfig(prediction_type="x0")


def as_prediction(denoise_eps, ac, prediction):
    """The exact Gaussian ε denoiser re-expressed as the network output of ``prediction``."""

    def denoise(x, t):
        eps = denoise_eps(x, t).double()
        a = ac[int(t)]
        if prediction == "epsilon":
            return eps.float()
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        if prediction == "sample":
            return x0.float()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    return denoise


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_samplers_do_not_depend_on_the_parameterisation(name, prediction):
    """The same exact model written as ε, v or x_0 gives the same samples (η = 0, no clipping)."""
    eps_cfg = DiffusionConfig(clip_sample=False)
    denoise, ac = gaussian_eps(eps_cfg)
    cfg = dataclasses.replace(eps_cfg, prediction_type=prediction)
    ref = sample(name, denoise, X_T, eps_cfg, 20)
    ours = sample(name, as_prediction(denoise, ac, prediction), X_T, cfg, 20)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_zero_terminal_snr_samplers_solve_the_gaussian_ode(name):
    """From pure noise at ᾱ_999 = 0 with the exact v model, to the exact ODE answer from there."""
    cfg = DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True, clip_sample=False)
    ac = make_scheduler(cfg).alphas_cumprod.double()

    def denoise(
        x, t
    ):  # exact v = √ᾱ ε − √(1 − ᾱ) x_0 with E[x_0 | x_t], E[ε | x_t] of the Gaussian
        a = ac[int(t)]
        x = x.double()
        var = a * SIGMA**2 + 1 - a
        x0 = MU + a.sqrt() * SIGMA**2 * (x - a.sqrt() * MU) / var
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / var
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    x0 = sample(name, denoise, X_T, cfg, 50).double()
    exact = exact_ode_solution(X_T, 999, ac)  # = μ + σ x_T: x_T is exactly q(x_999)
    torch.testing.assert_close(exact, MU + SIGMA * X_T.double())
    assert abs(x0.mean() - MU) < 2e-3
    assert abs(x0.std() - SIGMA) < {"ddim": 0.06, "dpm++": 0.01}[name]


@pytest.mark.parametrize("prediction", TYPES)
def test_clipping_keeps_the_step_consistent(prediction):
    """Clipped x̂_0 and the returned ε̂ still satisfy x_t = √ᾱ x̂_0 + √(1 − ᾱ) ε̂ (the step stays on
    the line through x_t and x̂_0), and nothing changes where x̂_0 is already in [-1, 1]."""
    cfg = DiffusionConfig(prediction_type=prediction)
    x = torch.linspace(-3, 3, 24).view(1, 1, 4, 6)
    out = 1.5 * torch.sin(2 * x)
    a = 0.3
    x0, eps = denoised(x, out, a, cfg)
    assert x0.abs().max() <= 1 and (x0.abs() == 1).any()  # some values were clipped
    torch.testing.assert_close(a**0.5 * x0 + (1 - a) ** 0.5 * eps, x, atol=1e-5, rtol=0)
    raw_x0, raw_eps = split_prediction(out, x, a, prediction)
    inside = raw_x0.abs() < 1
    torch.testing.assert_close(eps[inside], raw_eps[inside], atol=1e-5, rtol=0)
    assert not torch.allclose(eps, raw_eps)


def test_grey_models_encode_luma_and_write_grey_rgb():
    cfg = ModelConfig(**{**dataclasses.asdict(preset("tiny").model), "in_channels": 1})
    rgb = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    grey = encode(None, rgb, cfg)
    assert grey.shape == (2, 1, 2, 2)
    torch.testing.assert_close(grey, torch.full((2, 1, 2, 2), 0.299 - 0.587))
    same = torch.full((1, 3, 2, 2), 0.25)
    torch.testing.assert_close(encode(None, same, cfg), torch.full((1, 1, 2, 2), 0.25))
    pixels = to_uint8(decode(None, grey, cfg))
    assert pixels.shape == (2, 2, 2, 3) and (pixels == pixels[..., :1]).all()
    model = RetrievalUNet(cfg)
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([3, 4]), torch.zeros(2, 4, 16))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match="in_channels=2.*3 \\(RGB\\) or 1"):
        ModelConfig(in_channels=2)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_v_model_clipping_bounds_the_output(name):
    def wild(x, t):
        return -5 * x

    cfg = DiffusionConfig(prediction_type="v_prediction")
    x = sample(name, wild, X_T[:4], cfg, 10)
    assert x.abs().max() <= 1 + 1e-6
    assert get_sampler(name) is not None


def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch):
    import rdm.train

    cpu = torch.device("cpu")
    monkeypatch.setattr(rdm.train, "_cpu_flags", lambda: {"avx512f", "avx2"})
    assert rdm.train.resolve_precision("auto", cpu) == "no"
    monkeypatch.setattr(rdm.train, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert rdm.train.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(rdm.train, "_cpu_flags", lambda: {"amx_bf16"})
    assert rdm.train.resolve_precision("auto", cpu) == "bf16"
    assert rdm.train.resolve_precision("no", cpu) == "no"
    assert rdm.train.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(rdm.train, "_cpu_flags", lambda: set())
    assert rdm.train.resolve_precision("auto", cpu) == "no"
    with pytest.raises(ConfigError, match="'auto', 'bf16' or 'no'"):
        dataclasses.replace(preset("tiny").train, mixed_precision="fp16")


def test_grey_samples_stored_as_rgb_are_read_as_grey_and_colour_is_refused():
    import numpy as np

    from rdm.evaluation.images import ImageFormatError, View, require_view

    view = View(resolution=4, channels=1)
    grey = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    as_rgb = np.repeat(grey, 3, axis=-1)
    assert np.array_equal(require_view(as_rgb, view, "the samples"), grey)
    assert np.array_equal(require_view(grey, view, "the samples"), grey)
    tinted = as_rgb.copy()
    tinted[0, 0, 0, 2] ^= 1
    with pytest.raises(ImageFormatError, match="have colour"):
        require_view(tinted, view, "the samples")
    with pytest.raises(ImageFormatError, match="32x32 grey"):
        require_view(grey, View(resolution=32, channels=1), "the samples")


def test_guidance_rescale_matches_diffusers():
    """CFG rescale φ against Lin et al. 2024 §3.4 (diffusers' rescale_noise_cfg, which needs
    transformers to import, so written out here) on the same conditional/null outputs."""
    from rdm.errors import RdmError
    from rdm.sampling import guided

    class TwoOutputs(torch.nn.Module):
        def null_context(self, batch):
            return torch.zeros(batch, 1, 2)

        def forward(self, x, t, context):  # conditional: 3x + context, null: x
            return x * (1 + 2 * context[:, :1, :1, None].ne(0)) + context.sum((1, 2)).view(
                -1, 1, 1, 1
            )

    x = torch.linspace(-2, 2, 2 * 1 * 3 * 3).view(2, 1, 3, 3)
    ctx = torch.ones(2, 1, 2)
    model, t = TwoOutputs(), torch.tensor(5)
    out_c, out_u = model(x, t, ctx), model(x, t, torch.zeros(2, 1, 2))
    plain = out_u + 4.0 * (out_c - out_u)
    torch.testing.assert_close(guided(model, ctx, None, 4.0)(x, t), plain)

    def rescale_noise_cfg(cfg, cond, guidance_rescale):  # eqs. 15-17: per-image std ratio
        dims = list(range(1, cfg.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)
        return guidance_rescale * cfg * ratio + (1 - guidance_rescale) * cfg

    for phi in (0.0, 0.7, 1.0):
        want = rescale_noise_cfg(plain, out_c, guidance_rescale=phi)
        torch.testing.assert_close(guided(model, ctx, None, 4.0, phi)(x, t), want)
    assert not torch.allclose(guided(model, ctx, None, 4.0, 0.7)(x, t), plain)
    with pytest.raises(RdmError, match="rescale 1.5 must lie in \\[0, 1\\]"):
        guided(model, ctx, None, 4.0, 1.5)
