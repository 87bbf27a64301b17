"""Sampling inputs keep the device and dtype they were asked for.

Found by mutation testing (docs/testing.md) on a CPU-only, float32 suite: ``initial_noise``'s
``noise.to(device)`` as ``noise.to(None)`` passed (x_T would stay on the CPU), and so did
``uncond.to(context.dtype)`` as ``uncond.to(None)`` in the batched guidance forward (a bf16
context joined with a float32 ∅ would be promoted to float32). The ``meta`` device stands in for
an accelerator.
"""

from __future__ import annotations

import torch

from rdm.sampling import guided, initial_noise


def test_initial_noise_is_made_on_the_cpu_and_moved_to_the_device():
    noise, generators = initial_noise([3, 4], (1, 2, 2), device="meta")
    assert noise.device.type == "meta" and noise.shape == (2, 1, 2, 2)
    cpu, _ = initial_noise([3, 4], (1, 2, 2))
    torch.testing.assert_close(
        cpu[1], torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(4))
    )
    assert len(generators) == 2


class DtypeRecorder(torch.nn.Module):
    """ε = x; remembers the dtype of each context it is given; a float32 ∅ of the same shape."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def null_context(self, batch):
        return torch.zeros(batch, 2, 3)  # float32

    def forward(self, x, t, context):
        self.dtypes.append(context.dtype)
        return x


def test_batched_guidance_casts_the_null_context_to_the_contexts_dtype():
    model = DtypeRecorder()
    context = torch.ones(2, 2, 3, dtype=torch.bfloat16)
    guided(model, context, None, 3.0)(torch.zeros(2, 1, 1, 1), torch.tensor(5))
    assert model.dtypes == [torch.bfloat16]  # one batched forward, in the context's dtype


def test_stochastic_noise_is_like_x_in_dtype_and_device():
    """A stochastic sampler's z (``_noise_like``): image i's from generator i, in x's dtype, on
    x's device (``dtype=None`` and ``.to(None)`` survived the float32 CPU suite)."""
    from rdm.sampling import _noise_like

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    z = _noise_like(x, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert z.dtype == torch.float64
    expected = torch.randn(
        (1, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    torch.testing.assert_close(z[1], expected)
    gens = [torch.Generator().manual_seed(1)]
    assert _noise_like(torch.zeros(1, 1, 2, 2, device="meta"), gens).device.type == "meta"
