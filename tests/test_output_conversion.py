"""[-1, 1] images to [0, 1] and uint8 clamp both ends: a sampler's x_0 may overshoot [-1, 1].

Found by mutation testing (docs/testing.md): ``clamp(0, 1)`` loosened to ``clamp(0, None)`` or
``clamp(0, 2)`` passed the whole suite (no test fed values above 1), and uint8 of an overshoot
would wrap around (300 -> 44): white highlights turned dark.
"""

from __future__ import annotations

import numpy as np
import torch

from rdm.sampling import to_uint8, to_unit


def test_to_unit_maps_and_clamps_both_ends():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 1.5, 3.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0, 1.0])
    torch.testing.assert_close(to_unit(x), expected)


def test_to_uint8_saturates_an_overshoot():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.4, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)  # (1, 1, 6, 3)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 128, 255, 255, 255])
