"""``log_snr_timesteps`` called directly refuses one step more than fits, like ``default_timesteps``.

Found by mutation testing (docs/testing.md): its own bound ``steps <= top + 1`` loosened to
``top + 2`` passed the suite, since every test came through ``default_timesteps``, which checks the
step count first. Called directly with top + 2 steps it would have to repeat a timestep.
"""

from __future__ import annotations

import pytest

from rdm.config import DiffusionConfig
from rdm.diffusion import make_scheduler
from rdm.errors import RdmError
from rdm.sampling import log_snr_timesteps


def test_log_snr_timesteps_bounds():
    ac = make_scheduler(DiffusionConfig()).alphas_cumprod  # (1000,)
    assert log_snr_timesteps(ac, 10, 9) == list(range(9, -1, -1))  # as many steps as fit: all
    with pytest.raises(RdmError, match="steps=11: 1 to 10 distinct timesteps"):
        log_snr_timesteps(ac, 11, 9)
    with pytest.raises(RdmError, match="steps=0"):
        log_snr_timesteps(ac, 0, 9)


def test_uniform_timesteps_bounds_and_two_steps():
    """DDIM's schedule: both ends from 2 steps on (``steps == 1`` special case as ``== 2`` gave
    one timestep for two steps; the parametrised step counts never include 2), and the same bound."""
    from rdm.sampling import uniform_timesteps

    assert uniform_timesteps(999, 1) == [999]
    assert uniform_timesteps(999, 2) == [999, 0]
    assert uniform_timesteps(9, 10) == list(range(9, -1, -1))
    with pytest.raises(RdmError, match="steps=11: 1 to 10 distinct timesteps"):
        uniform_timesteps(9, 11)
