"""``sampling.sample`` defaults: η = 0 (deterministic) and no progress bar.

Found by mutation testing (docs/testing.md): defaults of η = 1 and ``progress=True`` passed the
suite, since every caller passed both. A library call without them must be the deterministic
ODE sampler and print nothing.
"""

from __future__ import annotations

import torch

from rdm.config import DiffusionConfig
from rdm.sampling import sample


def zero_eps(x, t):
    return torch.zeros_like(x)


def test_sample_defaults_to_deterministic_and_silent(capsys):
    cfg = DiffusionConfig()
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    default = sample("ddim", zero_eps, x_T, cfg, 3)
    torch.manual_seed(2)  # an η > 0 sampler would draw different noise here
    explicit = sample("ddim", zero_eps, x_T, cfg, 3, eta=0.0, progress=False)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert capsys.readouterr().err == ""  # no tqdm bar


def test_sample_passes_eta_to_the_sampler():
    """``sample(..., eta=1)`` is the stochastic sampler (η was once dropped without a failing test)."""
    from rdm.sampling import ddim, default_timesteps

    cfg = DiffusionConfig()
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    got = sample("ddim", zero_eps, x_T, cfg, 3, eta=1.0, generators=gens())
    ts = default_timesteps("ddim", cfg, 3)
    torch.testing.assert_close(got, ddim(zero_eps, x_T, cfg, ts, eta=1.0, generators=gens()))
    assert not torch.allclose(got, sample("ddim", zero_eps, x_T, cfg, 3))  # η = 0 differs
