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
