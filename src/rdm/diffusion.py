"""Noise schedule, what the network predicts, the training loss and classifier-free-guidance dropout.

Forward process (Ho et al. 2020, eq. 4):   x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   ε ~ N(0, I),
with ᾱ_t = ∏_{s ≤ t} (1 − β_s). The RDM objective (paper §3.1) is the simple loss (Ho et al. eq. 14)
conditioned on the neighbour set:

    min_θ  E_{x, ε, t} ‖ε − ε_θ(x_t, t, {φ(y) : y ∈ ξ_k(x, D)})‖²,   t ~ U{0, …, T − 1}.

The network may instead predict v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, eq. 9 in
their notation α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)) or x_0 itself ("sample"); the loss is then the
squared error of that target. All three describe the same pair (x̂_0, ε̂) given x_t
(:func:`split_prediction`), which is what the samplers use. min-SNR-γ weighting (Hang et al.
2023) caps the weight of the low-noise timesteps, SNR_t = ᾱ_t/(1 − ᾱ_t), at γ in x_0 units.

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
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
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

    With ``zero_terminal_snr`` ᾱ_{T−1} = 0: x_{T−1} is exactly the N(0, I) the samplers draw, and
    the model (v or x_0) predicts x̂_0 there without dividing by √ᾱ, so every schedule starts at
    T − 1 (Lin et al. 2024, "sample from the last timestep").
    """
    T = cfg.num_train_timesteps
    if cfg.schedule == "cosine" and not cfg.zero_terminal_snr:
        return round(0.9946 * T) - 1  # discrete timestep n is continuous time (n + 1)/T
    return T - 1


def split_prediction(
    output: torch.Tensor,  # (B, C, H, W) the network's output
    x_t: torch.Tensor,  # (B, C, H, W)
    alpha_bar: float | torch.Tensor,  # ᾱ_t: a number, or (B, 1, 1, 1)
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the network's output, each (B, C, H, W), with x_t = √ᾱ x̂_0 + √(1 − ᾱ) ε̂.

    epsilon: x̂_0 = (x_t − √(1 − ᾱ) ε̂)/√ᾱ (Ho et al. eq. 15); v: x̂_0 = √ᾱ x_t − √(1 − ᾱ) v,
    ε̂ = √ᾱ v + √(1 − ᾱ) x_t (no division: defined at ᾱ = 0, the zero-terminal-SNR top);
    sample: ε̂ = (x_t − √ᾱ x̂_0)/√(1 − ᾱ).
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    sa, s1a = a.sqrt().to(torch.float32), (1 - a).sqrt().to(torch.float32)
    if prediction_type == "epsilon":
        return (x_t - s1a * output) / sa, output
    if prediction_type == "v_prediction":
        return sa * x_t - s1a * output, sa * output + s1a * x_t
    if prediction_type == "sample":
        return output, (x_t - sa * output) / s1a
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def training_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network is trained to output at x_t = √ᾱ x_0 + √(1 − ᾱ) ε (ᾱ (B, 1, 1, 1))."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023, eq. 7 and their Table 1).

    The x_0 error weighted by min(SNR, γ): ‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖² and ‖v − v̂‖² =
    (SNR + 1) ‖x_0 − x̂_0‖², so ε's squared error gets min(SNR, γ)/SNR and v's
    min(SNR, γ)/(SNR + 1) (diffusers' train_text_to_image uses the same two). SNR = 0 (the
    zero-terminal-SNR top) gives weight 0 for x_0 and v; ε is refused with that schedule.
    """
    capped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    if prediction_type == "sample":
        return capped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_loss(
    model,
    x0: torch.Tensor,  # (B, C, H, W) clean images or latents
    context: torch.Tensor,  # (B, k, d) neighbour embeddings
    scheduler,  # DDPMScheduler from make_scheduler (its config holds the prediction type)
    generator: torch.Generator,  # CPU generator: t, ε and the dropout mask come from it only
    p_uncond: float,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error of the prediction target over the batch (a scalar, float32),
    weighted per sample by min-SNR-γ when ``snr_gamma`` is given."""
    from diffusers.training_utils import compute_snr

    batch = x0.shape[0]
    prediction_type = scheduler.config.prediction_type
    # Draw everything on the CPU generator so a step's randomness depends on its seed only.
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    drop = torch.rand(batch, generator=generator) < p_uncond  # whole set -> ∅
    t, eps, drop = t.to(x0.device), eps.to(x0.device), drop.to(x0.device)

    x_t = scheduler.add_noise(x0, eps, t)  # √ᾱ_t x_0 + √(1 − ᾱ_t) ε
    output = model(x_t, t, context, drop_mask=drop)
    if prediction_type == "epsilon" and snr_gamma is None:
        return F.mse_loss(output.float(), eps)  # the paper's loss, exactly
    alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    target = training_target(x0.float(), eps, alpha_bar, prediction_type)
    per_sample = (output.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(
            compute_snr(scheduler, t), snr_gamma, prediction_type
        )
    return per_sample.mean()
