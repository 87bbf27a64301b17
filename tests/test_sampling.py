"""Samplers checked against a known answer and diffusers, timestep schedules, callbacks, seeds,
classifier-free guidance."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from rdm.config import DiffusionConfig, preset
from rdm.diffusion import make_scheduler, top_timestep
from rdm.errors import RdmError
from rdm.model import RetrievalUNet
from rdm.sampling import (
    Cancelled,
    ddim,
    default_timesteps,
    dpm_solver_pp,
    get_sampler,
    guided,
    initial_noise,
    log_snr_timesteps,
    sample,
    to_uint8,
)

MU, SIGMA = 0.3, 0.5  # data distribution N(μ, σ² I)
STEPS = [1, 7, 30, 50, 300, 600, 999, 1000]


def gaussian_eps(cfg: DiffusionConfig, bias: torch.Tensor | float = 0.0):
    """The exact ε(x_t, t) = E[ε | x_t] for Gaussian data: √(1−ᾱ)(x − √ᾱ μ) / (ᾱσ² + 1 − ᾱ),
    plus ``bias`` (a stand-in for a trained model's ε error); records the timesteps it is asked."""
    ac = make_scheduler(cfg).alphas_cumprod.double()

    def denoise(x, t):
        denoise.calls.append(int(t))
        a = ac[int(t)]
        return (
            (1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a) + bias
        ).float()

    denoise.calls = []
    return denoise, ac


def standard_normal(n: int) -> torch.Tensor:
    """(n/16, 1, 4, 4) N(0, 1) quantiles in a fixed random order: mean 0 and std 1 up to 1e-3, so
    the tests below measure the sampler, not the luck of a draw (σ/√n would be 0.008 at n = 4096)."""
    x = torch.tensor([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    return x[torch.randperm(n, generator=torch.Generator().manual_seed(0))].view(-1, 1, 4, 4)


def exact_ode_solution(x_start, t_start, ac):
    """The probability-flow ODE keeps z = (x_t − √ᾱ_t μ) / √(ᾱ_t σ² + 1 − ᾱ_t) fixed."""
    a = ac[t_start]
    z = (x_start.double() - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a).sqrt()
    return MU + SIGMA * z


def posterior_mean(x, t, ac):
    """E[x_0 | x_t] = μ + √ᾱ σ² (x_t − √ᾱ μ) / (ᾱσ² + 1 − ᾱ): what one sampler step returns."""
    a = ac[t]
    return MU + a.sqrt() * SIGMA**2 * (x.double() - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)


X_T = standard_normal(4096)


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_deterministic_samplers_solve_the_gaussian_ode(name, steps, schedule):
    """From the top, with exactly `steps` evaluations, to the exact ODE answer (η = 0).

    Tolerances: both samplers are affine maps of x_T here, so the mean is the exact ODE answer's,
    μ − σ√ᾱ_top·μ/√(ᾱ_top σ² + 1 − ᾱ_top) (−0.0018 off μ on scaled_linear: x_T ~ N(0, I) is not
    quite q(x_top)), up to 0.001. DPM-Solver++(2M) is second order: within 2 % of σ and 0.04 of
    the exact solution per value from 7 steps (measured worst: 1.5 % and 0.028, cosine at 20
    steps). DDIM is first order: its std is low by up to 5σ/steps + 0.005 and its error per value
    up to 8/steps + 0.01 (measured: 3.6σ/steps at 50, 0.134 at 50 steps, 0.013 at 1000).
    """
    cfg = DiffusionConfig(schedule=schedule, clip_sample=False)  # the data is not in [-1, 1]
    top = top_timestep(cfg)
    if steps > top + 1:  # the cosine schedule starts at 994: only 995 distinct timesteps
        with pytest.raises(RdmError, match=f"1 to {top + 1} steps.*t = {top}"):
            default_timesteps(name, cfg, steps)
        return
    denoise, ac = gaussian_eps(cfg)
    timesteps = default_timesteps(name, cfg, steps)
    x0 = get_sampler(name)(denoise, X_T, cfg, timesteps).double()

    assert denoise.calls == timesteps and len(timesteps) == steps and timesteps[0] == top
    if steps == 1:  # one step is the posterior mean E[x_0 | x_top]: std √ᾱ_top σ² ≈ 0.003
        torch.testing.assert_close(x0, posterior_mean(X_T, top, ac), atol=1e-4, rtol=0)
        return
    exact = exact_ode_solution(X_T, top, ac)
    assert abs(x0.mean() - exact.mean()) < 1e-3
    assert abs(exact.mean() - MU) < 2.5e-3 and abs(exact.std() - SIGMA) < 1e-3
    if name == "dpm++":
        assert abs(x0.std() - SIGMA) < 0.02 * SIGMA
        assert (x0 - exact).abs().max() < 0.04
    else:
        assert 0 < SIGMA - x0.std() < 5 * SIGMA / steps + 0.005
        assert (x0 - exact).abs().max() < 8 / steps + 0.01


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_every_step_count_starts_at_the_top_with_one_evaluation_per_step(name):
    """(The known-answer test above checks the evaluated timesteps of η = 0 runs.)"""
    cfg = DiffusionConfig()
    assert top_timestep(cfg) == 999  # the paper's scaled_linear: T − 1 (ᾱ = 1.4e-4)
    for steps in STEPS:
        ts = default_timesteps(name, cfg, steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] == (999 if steps == 1 else 0)
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False)), ts
    x_T, gens = initial_noise(range(2), (1, 2, 2))
    for steps in (1, 7, 50):  # the stochastic variants evaluate the same timesteps
        denoise, _ = gaussian_eps(cfg)
        sample(name, denoise, x_T, cfg, steps, eta=1.0, generators=gens, progress=True)
        assert denoise.calls == default_timesteps(name, cfg, steps)


def test_default_timesteps_for_the_paper_step_counts():
    cfg = DiffusionConfig()
    ddim50 = default_timesteps("ddim", cfg, 50)
    assert ddim50[:3] == [999, 979, 958] and ddim50[-3:] == [41, 20, 0]  # round(linspace)
    assert default_timesteps("ddim", cfg, 1000) == list(range(999, -1, -1))
    dpm20 = default_timesteps("dpm++", cfg, 20)
    assert dpm20[:3] == [999, 957, 912] and dpm20[-2:] == [1, 0]
    ac = make_scheduler(cfg).alphas_cumprod.double()
    lam = 0.5 * (ac / (1 - ac)).log()
    steps_in_lam = lam[dpm20[1:]] - lam[dpm20[:-1]]  # uniform in log-SNR where t allows it
    h = (lam[0] - lam[999]) / 19
    assert ((steps_in_lam[:15] - h).abs() < 0.15 * h).all()
    assert log_snr_timesteps(ac.float(), 50, 999) == default_timesteps("dpm++", cfg, 50)
    assert len(set(default_timesteps("dpm++", cfg, 50))) == 50  # none dropped (49 before)
    cosine = DiffusionConfig(schedule="cosine")
    assert top_timestep(cosine) == 994
    assert default_timesteps("dpm++", cosine, 995) == list(range(994, -1, -1))


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_the_top_keeps_model_errors_small(name):
    """A trained model's ε error must not be amplified at the first step.

    x_0 = (x_t − √(1−ᾱ) ε)/√ᾱ divides ε errors by √ᾱ_top; the next x_t multiplies them by
    √ᾱ_{t₁}. With an ε error of 0.01 everywhere (no clipping, as for latents) the output moves by
    ≈ 0.02–0.04 on scaled_linear from T − 1 and on cosine from 994; from the cosine schedule's
    T − 1 (ᾱ = 2.4e-9) it moves by 2.5 (DDIM-50) and 0.14 (DPM++-20).
    """
    steps = {"ddim": 50, "dpm++": 20}[name]
    bias = 0.01 * torch.randn(X_T[:64].shape, generator=torch.Generator().manual_seed(1))
    for schedule in ("scaled_linear", "cosine"):
        cfg = DiffusionConfig(schedule=schedule, clip_sample=False)
        exact, _ = gaussian_eps(cfg)
        wrong, _ = gaussian_eps(cfg, bias.double())
        ts = default_timesteps(name, cfg, steps)
        run = get_sampler(name)
        moved = (run(wrong, X_T[:64], cfg, ts) - run(exact, X_T[:64], cfg, ts)).abs().mean()
        assert moved < 0.05, (schedule, moved)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_callback_reports_each_step_and_can_cancel(name):
    cfg = DiffusionConfig(clip_sample=False)
    denoise, ac = gaussian_eps(cfg)
    x_T, _ = initial_noise(range(3), (1, 4, 4))
    ts = default_timesteps(name, cfg, 6)
    seen = []
    x0 = get_sampler(name)(denoise, x_T, cfg, ts, callback=seen.append)
    assert [(s["i"], s["n"], s["t"]) for s in seen] == [(i, 6, t) for i, t in enumerate(ts)]
    torch.testing.assert_close(seen[0]["x"], x_T)  # x_top is x_T
    for s in seen:  # denoised = (x_t − √(1−ᾱ) ε)/√ᾱ, here the exact posterior mean
        torch.testing.assert_close(
            s["denoised"].double(), posterior_mean(s["x"], s["t"], ac), atol=1e-4, rtol=1e-4
        )
        assert s["x"].shape == s["denoised"].shape == (3, 1, 4, 4)
    torch.testing.assert_close(x0, seen[-1]["denoised"])  # the last step lands on σ = 0

    def cancel_at_2(info):
        if info["i"] == 2:
            raise Cancelled("stop")

    denoise.calls.clear()
    with pytest.raises(Cancelled):
        sample(name, denoise, x_T, cfg, 6, callback=cancel_at_2, progress=True)
    assert denoise.calls == ts[:3]  # no model evaluation after the step that cancelled


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
@pytest.mark.parametrize(
    ("timesteps", "message"),
    [
        ([], "timesteps is empty"),
        ([500, 500], r"timesteps\[1\]=500 is not below timesteps\[0\]=500"),
        ([10, 20], r"timesteps\[1\]=20 is not below .* strictly decreasing"),
        ([1000, 5], r"timesteps\[0\]=1000: .* 0 … 999"),
        ([5, -1], r"timesteps\[1\]=-1"),
        ([5.5, 1], r"timesteps\[0\]=5.5: timesteps are integers"),
        (50, "timesteps=50 is a number.*default_timesteps"),
        (torch.tensor(50), "timesteps=50 is a number"),
        ([3, True], r"timesteps\[1\]=True: timesteps are integers"),
    ],
)
def test_invalid_timesteps_are_refused(name, timesteps, message):
    denoise, _ = gaussian_eps(DiffusionConfig())
    with pytest.raises(RdmError, match=message):
        get_sampler(name)(denoise, torch.zeros(1, 1, 2, 2), DiffusionConfig(), timesteps)
    assert denoise.calls == []


def test_timesteps_may_be_a_tensor_or_an_array():
    import numpy as np

    denoise, _ = gaussian_eps(DiffusionConfig())
    x_T, _ = initial_noise(range(2), (1, 2, 2))
    ref = ddim(denoise, x_T, DiffusionConfig(), [999, 500, 0])
    for ts in (
        torch.tensor([999, 500, 0]),
        np.array([999, 500, 0]),
        list(torch.tensor([999, 500, 0])),
    ):
        torch.testing.assert_close(ddim(denoise, x_T, DiffusionConfig(), ts), ref, rtol=0, atol=0)


def test_step_counts_are_checked():
    for steps in (0, 1001, 2.0, True):
        with pytest.raises(RdmError, match="1 to 1000 steps"):
            default_timesteps("ddim", DiffusionConfig(), steps)
    with pytest.raises(RdmError, match="unknown sampler 'plms'"):
        default_timesteps("plms", DiffusionConfig(), 10)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("eta", "clip"), [(0.0, True), (1.0, True), (1.0, False)])
def test_ddim_matches_diffusers_on_its_timesteps(eta, clip, prediction):
    """Same maths as diffusers' DDIMScheduler where that applies (uniform spacing; diffusers can
    only step by T/steps): LDM's "leading" timesteps 981, 961, …, 1, then ᾱ = 1; with clipping,
    the ε consistent with the clipped x_0 (``use_clipped_model_output=True``), for every
    prediction type."""
    from diffusers import DDIMScheduler

    from rdm.diffusion import scheduler_config

    cfg = DiffusionConfig(clip_sample=clip, prediction_type=prediction)

    def denoise(x, t):  # any nonlinear ε(x, t) whose x_0 leaves [-1, 1] at times
        return torch.sin(3 * x) + 1e-3 * t

    scheduler = DDIMScheduler(
        **scheduler_config(cfg), clip_sample=clip, set_alpha_to_one=True, steps_offset=1
    )
    scheduler.set_timesteps(10)
    x_T, gens = initial_noise([3, 4], (3, 8, 8))
    ref = x_T
    for t in scheduler.timesteps:
        out = scheduler.step(
            denoise(ref, t), t, ref, eta=eta, generator=gens, use_clipped_model_output=True
        )
        ref = out.prev_sample
    x_T, gens = initial_noise([3, 4], (3, 8, 8))
    ours = ddim(denoise, x_T, cfg, scheduler.timesteps.tolist(), eta=eta, generators=gens)
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_stochastic_samplers_sample_the_gaussian(name):
    """η = 1 (DDPM-like DDIM at 1000 steps, SDE-DPM-Solver++ at 300) draws N(μ, σ²): 4096
    values, so the sample mean and std have standard errors 0.008 and 0.006; tolerance 3 of them."""
    cfg = DiffusionConfig(clip_sample=False)
    denoise, _ = gaussian_eps(cfg)
    x_T, gens = initial_noise(range(16), (1, 16, 16))
    steps = {"ddim": 1000, "dpm++": 300}[name]  # (diffusers' step costs 1 ms here)
    x0 = sample(name, denoise, x_T, cfg, steps, eta=1.0, generators=gens)
    assert x0.mean().item() == pytest.approx(MU, abs=0.024)
    assert x0.std().item() == pytest.approx(SIGMA, abs=0.018)


def test_pixel_space_samplers_clip_x0():
    # a denoiser whose x_0 estimates are far outside the pixel range
    def wild(x, t):
        return -5 * x

    x_T, _ = initial_noise(range(4), (3, 4, 4))
    for name in ("ddim", "dpm++"):
        assert sample(name, wild, x_T, DiffusionConfig(), 10).abs().max() <= 1.0 + 1e-6
        assert sample(name, wild, x_T, DiffusionConfig(clip_sample=False), 10).abs().max() > 10


def tiny_model():
    torch.manual_seed(0)
    return RetrievalUNet(preset("tiny").model).eval()


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("dpm++", 0.0), ("dpm++", 1.0)])
def test_image_depends_on_its_seed_not_on_the_batch(name, eta):
    model, cfg = tiny_model(), DiffusionConfig()
    context = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)

    x_T, gens = initial_noise([5, 6, 7], (3, 8, 8))
    batch = sample(name, guided(model, context, None, 2.0), x_T, cfg, 4, eta=eta, generators=gens)
    x_T, gens = initial_noise([6], (3, 8, 8))
    alone = sample(
        name, guided(model, context[1:2], None, 2.0), x_T, cfg, 4, eta=eta, generators=gens
    )
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-5)


def test_ddim_eta_zero_is_deterministic():
    model, cfg = tiny_model(), DiffusionConfig()
    context = torch.randn(2, 4, 16)
    runs = []
    for seeds in ([1, 2], [1, 2], [3, 4]):
        x_T, _ = initial_noise(seeds, (3, 8, 8))
        runs.append(ddim(guided(model, context, None, 1.0), x_T, cfg, [999, 500, 0], eta=0.0))
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
        dpm_solver_pp(lambda x, t: x, torch.zeros(1, 1, 2, 2), DiffusionConfig(), [9, 0], eta=0.5)
    with pytest.raises(RdmError, match="eta=-1 with the ddim"):
        ddim(lambda x, t: x, torch.zeros(1, 1, 2, 2), DiffusionConfig(), [9, 0], eta=-1)
    img = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2))
    assert img.shape == (1, 2, 2, 3) and img.dtype.name == "uint8"
    assert img[0, :, :, 0].ravel().tolist() == [0, 0, 128, 255]
