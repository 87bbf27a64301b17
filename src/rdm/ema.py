"""Exponential moving averages of the weights, and their warm-up schedules.

A run keeps one EMA (``ema.safetensors``, what the sampler uses) with LDM's warm-up and may keep
further ones (``train.ema_extra``, each ``ema-<name>.safetensors``) to compare schedules on the
same trajectory at no extra training cost. After update ``step`` (1, 2, ...)::

    θ_ema ← β · θ_ema + (1 − β) · θ

with β from the spec:

- ``ldm:D``       β = min(D, (1 + step) / (10 + step)): LDM's LitEma (the main EMA's rule,
  D = ``train.ema_decay``);
- ``power:P``     β = min(0.9999, 1 − (1 + s)^−P) with s = step − 1 and β = 0 at s = 0: diffusers'
  EMAModel with ``use_ema_warmup=True`` (inv_gamma 1, P = 2/3 its default, 3/4 for short runs);
- ``halflife:H``  β = 0.5^(B / h), h = min(H, 0.05 · images seen before the update): EDM's
  (Karras et al. 2022) half-life of H training images with its ramp-up, B images per step.

Short runs are where the choice shows: at 600 steps the main EMA's warm-up (β ≈ 0.985 there)
matters more than its nominal decay 0.999.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rdm.errors import RdmError

POWER_MAX_DECAY = 0.9999  # diffusers EMAModel's default `decay`, the cap of the power warm-up
EDM_RAMPUP = 0.05  # EDM's ema_rampup: the half-life is at most this share of the images seen


class EmaSpecError(RdmError, ValueError):
    """An EMA spec that cannot be parsed; the message says the accepted forms."""


@dataclass(frozen=True)
class EmaSpec:
    kind: str  # "ldm", "power" or "halflife"
    value: float  # D, P or H

    @classmethod
    def parse(cls, spec: str) -> EmaSpec:
        kind, _, value = spec.partition(":")
        forms = "use 'ldm:DECAY' (0 < DECAY < 1), 'power:P' (P > 0) or 'halflife:IMAGES' (> 0)"
        try:
            number = float(value)
        except ValueError:
            raise EmaSpecError(f"EMA spec {spec!r}: {forms}") from None
        if kind not in ("ldm", "power", "halflife") or not math.isfinite(number) or number <= 0:
            raise EmaSpecError(f"EMA spec {spec!r}: {forms}")
        if kind == "ldm" and not number < 1:
            raise EmaSpecError(f"EMA spec {spec!r}: {forms}")
        return cls(kind, number)

    @property
    def name(self) -> str:
        """File-name form: ``power:0.75`` -> ``ema-power-0.75`` (weights ``ema-power-0.75``)."""
        return f"ema-{self.kind}-{self.value:g}"

    def decay(self, step: int, batch_images: int) -> float:
        """β of update ``step`` (1-based); ``batch_images``: images per step over all processes."""
        if self.kind == "ldm":
            return ema_decay_at(step, self.value)
        if self.kind == "power":
            s = step - 1  # diffusers counts updates from 0 and copies the weights at the first
            return 0.0 if s <= 0 else min(POWER_MAX_DECAY, 1.0 - (1.0 + s) ** -self.value)
        seen = (step - 1) * batch_images  # EDM's cur_nimg at the update
        halflife = min(self.value, seen * EDM_RAMPUP)
        return 0.0 if halflife <= 0 else 0.5 ** (batch_images / halflife)


def ema_decay_at(step: int, decay: float) -> float:
    """Short memory at the start so the EMA does not average in the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ; buffers are copied."""
    ema_p = list(ema.parameters())
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def extra_names(specs: list[str]) -> list[str]:
    """The weights names of ``train.ema_extra`` (checked: parseable and distinct)."""
    names = [EmaSpec.parse(s).name for s in specs]
    if len(set(names)) != len(names):
        raise EmaSpecError(f"train.ema_extra {specs} names the same EMA twice")
    return names
