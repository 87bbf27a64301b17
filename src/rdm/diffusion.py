"""Noise schedule, the ε-prediction loss and classifier-free-guidance dropout.

Forward process (Ho et al. 2020, eq. 4):   x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   ε ~ N(0, I),
with ᾱ_t = ∏_{s ≤ t} (1 − β_s). The RDM objective (paper §3.1) is the simple loss (Ho et al. eq. 14)
conditioned on the neighbour set:

    min_θ  E_{x, ε, t} ‖ε − ε_θ(x_t, t, {φ(y) : y ∈ ξ_k(x, D)})‖²,   t ~ U{0, …, T − 1}.

For classifier-free guidance (Ho & Salimans 2022) the whole neighbour set of a sample is replaced by
the null context ∅ with probability p_uncond, so the same network also learns ε_θ(x_t, t, ∅).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdm.config import DiffusionConfig

# our schedule names -> diffusers' beta_schedule names
_DIFFUSERS_SCHEDULE = {
    "scaled_linear": "scaled_linear",  # LDM's "linear": β linear in √β (the paper's)
    "linear": "linear",
    "cosine": "squaredcos_cap_v2",
}


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """Keyword arguments shared by every diffusers scheduler we build (training and sampling)."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": _DIFFUSERS_SCHEDULE[cfg.schedule],
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "prediction_type": cfg.prediction_type,
    }


def make_scheduler(cfg: DiffusionConfig):
    """The training-time noise schedule (a diffusers ``DDPMScheduler``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(cfg))


def top_timestep(cfg: DiffusionConfig) -> int:
    """The timestep samplers start from, with x_T ~ N(0, I): the top of the schedule.

    T − 1, the last trained timestep, for the linear schedules: q(x_{T−1}) is N(0, I) up to
    √ᾱ_{T−1} = 0.012 (scaled_linear 0.0015 → 0.0195) or 0.005 (linear) times the data, and ᾱ_t
    shrinks smoothly, so the first step's x_0 estimate (which multiplies ε errors by 1/√ᾱ_t) gets
    a weight of only √(ᾱ_{t₁}/ᾱ_{T−1}) ≈ 1.2 in the next x_t.

    For the cosine schedule ᾱ_t → 0 like (T − t)² at the end and its last β is capped at 0.999
    (Nichol & Dhariwal 2021), so ᾱ_{T−1} = 2.4·10⁻⁹ and the first DDIM-50 step from T − 1 would
    weight ε errors by √(ᾱ₉₇₉/ᾱ₉₉₉) ≈ 630. It starts where DPM-Solver ends the continuous cosine
    schedule, t/T = 0.9946 ("T = 1 will have numerical issues", Lu et al. 2022's NoiseScheduleVP):
    timestep 994 of 1000, √ᾱ = 0.008 (a signal level between the two linear schedules' tops).
    """
    T = cfg.num_train_timesteps
    if cfg.schedule == "cosine":
        return round(0.9946 * T) - 1  # discrete timestep n is continuous time (n + 1)/T
    return T - 1


def diffusion_loss(
    model,
    x0: torch.Tensor,  # (B, C, H, W) clean images or latents
    context: torch.Tensor,  # (B, k, d) neighbour embeddings
    scheduler,  # DDPMScheduler from make_scheduler
    generator: torch.Generator,  # CPU generator: t, ε and the dropout mask come from it only
    p_uncond: float,
) -> torch.Tensor:
    """Mean-squared ε-prediction error over the batch (a scalar, float32)."""
    batch = x0.shape[0]
    # Draw everything on the CPU generator so a step's randomness depends on its seed only.
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    drop = torch.rand(batch, generator=generator) < p_uncond  # whole set -> ∅
    t, eps, drop = t.to(x0.device), eps.to(x0.device), drop.to(x0.device)

    x_t = scheduler.add_noise(x0, eps, t)  # √ᾱ_t x_0 + √(1 − ᾱ_t) ε
    eps_hat = model(x_t, t, context, drop_mask=drop)
    return F.mse_loss(eps_hat.float(), eps)
