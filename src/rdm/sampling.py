"""Samplers with one signature, their default timestep schedules, and classifier-free guidance.

Every sampler is a plain function (k-diffusion's shape: the schedule is an argument, progress goes
through a callback)

    sampler(denoise, x_T, diffusion_cfg, timesteps, *, eta=0.0, generators=None, callback=None) -> x_0

- ``denoise(x_t, t)`` is any network output in the parameterisation ``diffusion_cfg.prediction_type``
  names (ε, v or x_0; :func:`rdm.diffusion.split_prediction` turns it into the pair (x̂_0, ε̂)).
  The sampler never knows what the condition is: retrieved neighbours, a text embedding or
  nothing reach it only through ``denoise``, which :func:`guided` builds from a model, a context
  and a guidance scale.
- Clipping (``diffusion_cfg.clip_sample``, pixel models) is the same in every sampler and for
  every prediction type: x̂_0 is clipped to [-1, 1] and the step continues from the clipped x̂_0
  and the noise consistent with it and x_t, ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t) (guided-diffusion's
  DDIM; diffusers' DDIMScheduler with ``use_clipped_model_output=True``). DPM-Solver++ is written
  in x̂_0 alone, so clipping x̂_0 is all it needs. Keeping the unclipped ε̂ beside a clipped x̂_0
  (diffusers' DDIM default) moves x_s off the line through x_t and x̂_0.
- ``timesteps`` are the training timesteps at which ``denoise`` is evaluated, once each: a
  non-empty, strictly decreasing sequence of ints in 0 … T − 1 (checked; an :class:`RdmError` says
  what is wrong). After the last one the sampler steps to the clean image (ᾱ = 1, σ = 0).
  :func:`default_timesteps` makes the schedule for a step count; :func:`sample` does both.
- ``callback(info)`` (``Callback``) is called once per model evaluation, after ``denoise``, with
  ``{"i": step index 0 … n − 1, "n": n, "t": the int timestep, "x": the current x_t (B, C, H, W),
  "denoised": the predicted x_0 (B, C, H, W), clipped like the sampler clips it}``. It may raise
  (e.g. :class:`Cancelled`) to stop the work: no further model evaluation happens, and the
  exception propagates to the caller. A server shows progress and cancels requests this way.

The default schedules (:func:`default_timesteps`) give exactly ``steps`` strictly decreasing
timesteps for every allowed step count and start at the *top of the schedule*,
:func:`rdm.diffusion.top_timestep`: t = T − 1 for the linear schedules (the paper's scaled_linear
0.0015 → 0.0195 among them), t = 994 of 1000 for the cosine schedule; ``steps`` may be 1 … top + 1
(1000 or 995), more is refused. At the top q(x_t) is N(0, I), what x_T is drawn from, up to
√ᾱ_top = 0.012 (scaled_linear), 0.005 (linear) or 0.008 (cosine) times the data: pushed through
the exact probability-flow ODE that shifts the output mean by σ_data·√ᾱ_top·μ_data (0.0018 for the
test's N(0.3, 0.5²) data). Starting lower treats pure noise as a partly denoised image: at
t = 599, where "leading" spacing put 600 steps, √ᾱ ≈ 0.22. Starting at the cosine schedule's
T − 1 (ᾱ = 2.4·10⁻⁹, its last β capped at 0.999) would let the first x_0 estimate, which divides
ε errors by √ᾱ_t, multiply them by ≈ 630 in x_{t₁} (see ``top_timestep``; tested).

- ``ddim`` (Song et al. 2021, eq. 12): timesteps uniform in t from the top to 0 inclusive,
  round(linspace(top, 0, steps)) (improved-diffusion's respacing; LDM's 1, 1 + T/steps, … never
  reached the top). DDIM is first order (it is DPM-Solver-1, Lu et al. 2022 §3.3): on the
  Gaussian known answer its output std is low by ≈ 3.5·σ/steps on scaled_linear (7 % at 50 steps).
  One step, [top], returns E[x_0 | x_T], a posterior mean with almost no spread
  (std √ᾱ_top·σ²/1 = 0.003 for σ = 0.5): one step is not a sample, for either sampler.
- ``dpm_solver_pp`` (DPM-Solver++(2M), Lu et al. 2022): uniform in log-SNR λ = ½ log(ᾱ/(1 − ᾱ))
  from λ_top to λ_0 (the DPM-Solver paper's "logSNR" spacing; diffusers' spacings end at
  t ≈ T/steps and jump to σ = 0 from there, which returns an over-smoothed posterior mean).
  Where one integer timestep is wider than a grid step (near t = 0) consecutive timesteps are
  used, so none is repeated or dropped. Second order: within 2 % of the data's std from 7 steps.

Seeds are per image: :func:`initial_noise` makes one ``torch.Generator`` per image; image i's
initial noise and any stochastic-sampler noise come from generator i alone, so image i is the same
whether it is generated alone or in a batch.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rdm.config import DiffusionConfig
from rdm.diffusion import make_scheduler, scheduler_config, split_prediction, top_timestep
from rdm.errors import RdmError

#: denoise(x_t (B, C, H, W), t (scalar int tensor)) -> the network's ε, v or x_0 (B, C, H, W) float32
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: callback({"i", "n", "t", "x", "denoised"}) after each model evaluation; may raise to stop
Callback = Callable[[dict], None]


class Cancelled(RdmError):
    """Raised by a sampling callback to cancel the work (the sampler lets it propagate)."""


def initial_noise(
    seeds: Sequence[int], shape: Sequence[int], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T ~ N(0, I) of shape (len(seeds), *shape), one CPU generator per image, and the generators."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return noise.to(device), generators


def guided(
    model,
    context: torch.Tensor | None,
    null: torch.Tensor | None = None,
    scale: float = 1.0,
    rescale: float = 0.0,
) -> Denoiser:
    """ε = ε(∅) + s · (ε(c) − ε(∅)) (Ho & Salimans 2022), with one batched forward.

    The same combination of v or x_0 outputs is the same guidance: at fixed (x_t, t) ε̂ and x̂_0
    are affine in the output with coefficients that do not depend on the condition.

    ``model(x, t, context)`` is a :class:`rdm.model.RetrievalUNet`; ``context`` (B, k, d) or None
    (unconditional); ``null`` (B, k', d) defaults to the model's own ∅. s = 1 is plain conditional
    sampling and needs one half-size forward; s = 0 is unconditional.

    ``rescale`` φ (Lin et al. 2024, §3.4, "CFG rescale"): the guided output g is pulled towards
    g · std(out_c)/std(g) (per image), g ← φ · g · std(out_c)/std(g) + (1 − φ) · g, which undoes
    the over-exposure a large s gives; φ = 0 is plain guidance (diffusers' rescale_noise_cfg).
    """
    if not 0.0 <= rescale <= 1.0:
        raise RdmError(f"guidance rescale {rescale} must lie in [0, 1] (0: off; 0.7 is usual)")

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = model.null_context(x.shape[0]) if null is None else null
        if context is None or scale == 0.0:
            return model(x, t, uncond).float()
        if scale == 1.0:
            return model(x, t, context).float()
        if context.shape == uncond.shape:
            both = model(torch.cat([x, x]), t, torch.cat([context, uncond.to(context.dtype)]))
            out_c, out_u = both.float().chunk(2)
        else:  # different set sizes (e.g. text + neighbours) cannot share one batch
            out_c, out_u = model(x, t, context).float(), model(x, t, uncond).float()
        out = out_u + scale * (out_c - out_u)
        if rescale == 0.0:
            return out
        dims = list(range(1, out.ndim))
        rescaled = out * (out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        return rescale * rescaled + (1 - rescale) * out

    return denoise


# --- timestep schedules ----------------------------------------------------------------------------


def default_timesteps(sampler: str, diffusion_cfg: DiffusionConfig, steps: int) -> list[int]:
    """Exactly ``steps`` strictly decreasing timesteps for ``sampler``, the first the top.

    The top is :func:`rdm.diffusion.top_timestep`: T − 1, or 994 of 1000 for the cosine schedule.
    """
    get_sampler(sampler)  # unknown names fail here, with the list of known ones
    top = _check_steps(steps, diffusion_cfg)
    if sampler == "ddim":
        return uniform_timesteps(top, steps)
    return log_snr_timesteps(make_scheduler(diffusion_cfg).alphas_cumprod, steps, top)


def uniform_timesteps(top: int, steps: int) -> list[int]:
    """round(linspace(top, 0, steps)): both ends; spacing top/(steps − 1) ≥ 1, so all distinct."""
    if not 1 <= steps <= top + 1:
        raise RdmError(f"steps={steps}: 1 to {top + 1} distinct timesteps fit in {top} … 0")
    if steps == 1:
        return [top]
    return [int(t) for t in np.linspace(top, 0, steps).round()]


def log_snr_timesteps(alphas_cumprod: torch.Tensor, steps: int, top: int) -> list[int]:
    """``steps`` strictly decreasing timesteps from ``top`` to 0, uniform in λ_t = ½ log(ᾱ_t/(1 − ᾱ_t)).

    Each next timestep is the one whose λ is nearest to an equal share of the λ interval still to
    cover, kept below the previous one and high enough to leave a timestep for every later step.
    Where λ varies smoothly this is the nearest timestep to a uniform λ grid; where one integer
    timestep spans more than a grid step (near t = 0: λ₀ = 3.25, λ₁ = 2.9 on the paper's schedule)
    the steps fall on consecutive timesteps, instead of repeating or dropping one.
    """
    if not 1 <= steps <= top + 1:
        raise RdmError(f"steps={steps}: 1 to {top + 1} distinct timesteps fit in {top} … 0")
    # ᾱ = 0 (zero terminal SNR) has λ = −∞: floor it where DPM-Solver's scheduler does, 2⁻²⁴
    ac = np.clip(alphas_cumprod.double().numpy(), 2.0**-24, None)
    lam = 0.5 * np.log(ac / (1 - ac))  # (T,), strictly decreasing in t
    timesteps = [top]
    for i in range(1, steps):
        prev, left = timesteps[-1], steps - i  # `left` steps still to place, prev > … > 0
        target = lam[prev] + (lam[0] - lam[prev]) / left
        t = int(np.abs(lam[:prev] - target).argmin())  # nearest below prev
        timesteps.append(max(t, left - 1))  # leave room for the `left - 1` after it
    return timesteps


def check_timesteps(timesteps: Sequence[int], diffusion_cfg: DiffusionConfig) -> list[int]:
    """The timesteps as a list of ints, or an RdmError saying what is wrong with them."""
    T = diffusion_cfg.num_train_timesteps
    if hasattr(timesteps, "tolist"):  # a tensor or an array
        timesteps = timesteps.tolist()
    if isinstance(timesteps, numbers.Number):
        raise RdmError(
            f"timesteps={timesteps!r} is a number; samplers take the list of timesteps to evaluate: "
            "pass rdm.sampling.default_timesteps(sampler, cfg, steps), or call "
            "rdm.sampling.sample(sampler, ..., steps)"
        )
    values = []
    for i, t in enumerate(timesteps):
        try:  # ints, numpy ints and integer 0-d tensors; not floats or bools
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise RdmError(f"timesteps[{i}]={t!r}: timesteps are integers in 0 … {T - 1}") from None
        if not 0 <= t < T:
            raise RdmError(f"timesteps[{i}]={t}: timesteps are the training timesteps 0 … {T - 1}")
        if values and t >= values[-1]:
            raise RdmError(
                f"timesteps[{i}]={t} is not below timesteps[{i - 1}]={values[-1]}: timesteps "
                "must be strictly decreasing (from noisy to clean, one model evaluation each)"
            )
        values.append(t)
    if not values:
        raise RdmError("timesteps is empty: give at least one timestep to evaluate the model at")
    return values


def _check_steps(steps: int, cfg: DiffusionConfig) -> int:
    """The top timestep, once ``steps`` is known to fit between it and 0 (one evaluation each)."""
    top = top_timestep(cfg)
    if (
        isinstance(steps, bool)
        or not isinstance(steps, numbers.Integral)
        or not 1 <= steps <= top + 1
    ):
        raise RdmError(
            f"steps={steps!r}: sample with 1 to {top + 1} steps, one model evaluation per "
            f"timestep from the top of the {cfg.schedule} schedule, t = {top}, down to 0"
        )
    return top


# --- samplers --------------------------------------------------------------------------------------


def denoised(
    x: torch.Tensor, output: torch.Tensor, a_t: float, cfg: DiffusionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) at ᾱ_t from the network's output; with ``cfg.clip_sample`` x̂_0 is clipped to
    [-1, 1] and ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t) is the noise consistent with the clipped x̂_0."""
    x0, eps = split_prediction(output, x, a_t, cfg.prediction_type)
    if not cfg.clip_sample:
        return x0, eps
    x0 = x0.clamp(-1, 1)
    return x0, (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)


def _noise_like(x: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """N(0, I) like x; image i's from generators[i] (as diffusers' randn_tensor draws it)."""
    if generators is None:
        return torch.randn(x.shape, dtype=x.dtype).to(x.device)
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generators]
    ).to(x.device)


@torch.no_grad()
def ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    diffusion_cfg: DiffusionConfig,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) through ``timesteps``; η = 0 is deterministic, η = 1 DDPM-like.

    From t to the next timestep s (after the last one: ᾱ_s = 1, the clean image)

        x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε + σ z,   σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s),

    with (x̂_0, ε̂) from :func:`denoised` (x̂_0 clipped for pixel models, ε̂ consistent with it):
    diffusers' DDIMScheduler with ``use_clipped_model_output=True``, which this matches.
    """
    ts = check_timesteps(timesteps, diffusion_cfg)
    if eta < 0:
        raise RdmError(f"eta={eta} with the ddim sampler: use 0 (deterministic) to 1 (DDPM-like)")
    ac = make_scheduler(diffusion_cfg).alphas_cumprod.double().tolist()  # the training ᾱ_t
    x = x_T
    for i, t in enumerate(ts):
        output = denoise(x, torch.tensor(t, device=x.device))
        x0, eps = denoised(x, output, ac[t], diffusion_cfg)
        if callback is not None:
            callback({"i": i, "n": len(ts), "t": t, "x": x, "denoised": x0})
        a_t, a_s = ac[t], ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, generators)
    return x


@torch.no_grad()
def dpm_solver_pp(
    denoise: Denoiser,
    x_T: torch.Tensor,
    diffusion_cfg: DiffusionConfig,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) through ``timesteps``; η = 0 solves the ODE, η = 1 the SDE.

    diffusers' ``DPMSolverMultistepScheduler`` with the given timesteps, first order at the first
    and the last step (to σ = 0), x_0 clipped to [-1, 1] for pixel models (its thresholding with
    ``sample_max_value = 1`` is plain clipping); it converts ε / v / x_0 outputs itself.
    """
    from diffusers import DPMSolverMultistepScheduler

    ts = check_timesteps(timesteps, diffusion_cfg)
    if eta not in (0.0, 1.0):
        raise RdmError(
            f"eta={eta} with the dpm++ sampler: use 0 (ODE solver) or 1 (SDE-DPM-Solver++)"
        )
    scheduler = DPMSolverMultistepScheduler(
        **scheduler_config(diffusion_cfg),
        algorithm_type="dpmsolver++" if eta == 0.0 else "sde-dpmsolver++",
        solver_order=2,
        thresholding=diffusion_cfg.clip_sample,  # with sample_max_value 1: clip x_0 to [-1, 1]
        sample_max_value=1.0,
    )
    with warnings.catch_warnings():  # diffusers calls np.array on a tensor (numpy 2 notice)
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(timesteps=ts, device=x_T.device)
    ac = scheduler.alphas_cumprod.double().tolist()
    x = x_T
    for i, t in enumerate(scheduler.timesteps):  # = ts, one model evaluation each
        output = denoise(x, t)
        if callback is not None:
            x0, _ = denoised(x, output, ac[ts[i]], diffusion_cfg)
            callback({"i": i, "n": len(ts), "t": ts[i], "x": x, "denoised": x0})
        x = scheduler.step(output, t, x, generator=generators).prev_sample
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "dpm++": dpm_solver_pp}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise RdmError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def sample(
    sampler: str,
    denoise: Denoiser,
    x_T: torch.Tensor,
    diffusion_cfg: DiffusionConfig,
    steps: int,
    *,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``sampler`` through :func:`default_timesteps` (``steps`` model evaluations from T − 1).

    ``progress`` shows a tqdm bar (one tick per model evaluation); ``callback`` is called after it.
    """
    from tqdm.auto import tqdm

    run = get_sampler(sampler)
    timesteps = default_timesteps(sampler, diffusion_cfg, steps)
    with tqdm(total=steps, desc=f"{sampler}-{steps}", disable=not progress, leave=False) as bar:

        def tick(info: dict) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        return run(
            denoise, x_T, diffusion_cfg, timesteps, eta=eta, generators=generators, callback=tick
        )


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3); grey (B, 1, H, W) gives R = G = B."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (to_unit(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
