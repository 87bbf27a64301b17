"""``guided(model, context)`` without a scale is plain conditional sampling: s = 1, one forward.

Found by mutation testing (docs/testing.md): a default of s = 2 passed the whole suite, since every
caller passed a scale. A library user calling ``guided(model, context)`` gets ε(c) itself.
"""

from __future__ import annotations

import torch

from rdm.sampling import guided


class Counting(torch.nn.Module):
    """ε = x + mean(context): known answers for ε(c) and ε(∅); counts the forward batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def null_context(self, batch):
        return torch.zeros(batch, 2, 3)

    def forward(self, x, t, context):
        self.calls.append(x.shape[0])
        return x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_default_scale_is_plain_conditional_sampling():
    model, x, t = Counting(), torch.randn(3, 1, 2, 2), torch.tensor(7)
    context = torch.full((3, 2, 3), 2.0)
    eps = guided(model, context)(x, t)
    torch.testing.assert_close(eps, x + 2.0)  # ε(c); s = 2 would give x + 4
    assert model.calls == [3]  # one forward, conditional half only
