"""The conditional UNet, its null context, the baseline, the latent-space autoencoder, configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rdm.config import ConfigError, RunConfig, preset
from rdm.model import (
    RetrievalUNet,
    VaeError,
    count_parameters,
    decode,
    encode,
    load_vae,
    preset_parameter_counts,
    vae_settings,
)


def tiny_model(**changes) -> RetrievalUNet:
    torch.manual_seed(0)
    return RetrievalUNet(replace(preset("tiny").model, **changes))


def inputs(batch=3, k=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.nn.functional.normalize(torch.randn(batch, k, d, generator=g), dim=-1)
    return x, t, context


def test_forward_shape_and_context_matters():
    model = tiny_model()
    x, t, c = inputs()
    eps = model(x, t, c)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    other = model(x, t, torch.roll(c, 1, dims=0))  # another sample's neighbours
    assert not torch.allclose(eps, other)


def test_neighbour_set_is_permutation_invariant():
    # no positional encoding on the neighbour tokens: the order of the set does not matter
    model = tiny_model()
    x, t, c = inputs()
    torch.testing.assert_close(model(x, t, c), model(x, t, c.flip(1)), atol=1e-5, rtol=1e-5)


def test_head_count_and_cross_attention_projection():
    cfg = replace(preset("tiny").model, block_out_channels=(8, 32), head_dim=8, norm_num_groups=4)
    model = RetrievalUNet(cfg)
    attn2 = {n: m for n, m in model.unet.named_modules() if n.endswith("attn2")}
    assert attn2, "no cross-attention layers"
    for name, m in attn2.items():
        assert m.heads == 32 // 8, name  # heads = channels / head_dim, not head_dim
        # the only learned map from the database space: to_k / to_v, d -> channels, no bias
        assert m.to_k.in_features == cfg.context_dim and m.to_k.out_features == 32
        assert m.to_k.bias is None and m.to_v.bias is None
    assert cfg.heads == (1, 4)


def test_baseline_ignores_context():
    model = tiny_model(baseline=True)
    x, t, c = inputs()
    a = model(x, t, c)
    b = model(x, t, torch.randn_like(c))
    assert torch.equal(a, b)
    assert torch.equal(a, model(x, t, None))
    assert count_parameters(model) == count_parameters(tiny_model())  # same network


def test_null_context_learned_and_zeros():
    learned = tiny_model()
    assert isinstance(learned.null, torch.nn.Parameter) and learned.null.shape == (4, 16)
    zeros = tiny_model(null_context="zeros")
    assert "null" not in dict(zeros.named_parameters()) and torch.equal(
        zeros.null, torch.zeros(4, 16)
    )
    assert zeros.null_context(2).shape == (2, 4, 16)

    x, t, c = inputs()
    drop = torch.tensor([True, False, True])
    dropped = learned(x, t, c, drop_mask=drop)
    torch.testing.assert_close(dropped[0], learned(x, t, None)[0])
    torch.testing.assert_close(dropped[1], learned(x, t, c)[1])
    # the learned ∅ receives gradient only through dropped samples
    learned(x, t, c, drop_mask=drop).square().mean().backward()
    assert learned.null.grad is not None and learned.null.grad.abs().sum() > 0
    learned.zero_grad()
    learned(x, t, c, drop_mask=torch.zeros(3, dtype=torch.bool)).square().mean().backward()
    assert learned.null.grad.abs().sum() == 0


def test_parameter_counts_per_preset():
    counts = preset_parameter_counts(["tiny", "small"])
    assert counts["tiny"] < 100_000
    assert 2_000_000 < counts["small"] < 10_000_000


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    cfg = preset("small")
    cfg.to_json(tmp_path / "config.json")
    assert RunConfig.from_json(tmp_path / "config.json") == cfg
    d = cfg.to_dict()
    d["model"]["head_channels"] = 32
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) head_channels"):
        RunConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="divisible by head_dim"):
        replace(preset("tiny").model, block_out_channels=(8, 18))
    latent = replace(preset("tiny").model, latent=True, vae_path="vae", in_channels=4)
    with pytest.raises(ConfigError, match="clip_sample.*false for a latent model"):
        replace(preset("tiny"), model=latent)


def test_latent_model_with_saved_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    settings = vae_settings(tmp_path / "vae")
    assert settings == {
        "latent": True,
        "vae_path": str(tmp_path / "vae"),
        "in_channels": 4,
        "latent_downsample": 2,
        "vae_scale_factor": 0.5,
        "first_stage": "kl",
    }
    cfg = replace(preset("tiny").model, resolution=16, **settings)
    loaded = load_vae(cfg)
    assert not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = encode(loaded, images, cfg, torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        eps = RetrievalUNet(cfg)(z, torch.tensor([5, 500]), torch.randn(2, 4, 16))
    assert eps.shape == z.shape
    assert decode(loaded, z, cfg).shape == images.shape
    # the scale factor is applied on the way in and undone on the way out
    unscaled = replace(cfg, vae_scale_factor=1.0)
    z1 = encode(loaded, images, unscaled, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, 0.5 * z1)
    torch.testing.assert_close(decode(loaded, z, cfg), decode(loaded, z1, unscaled))

    with pytest.raises(VaeError, match="in_channels=4 but the model config says 3"):
        load_vae(replace(cfg, in_channels=3))
    with pytest.raises(VaeError, match="not an AutoencoderKL directory"):
        vae_settings(tmp_path)


def test_pixel_space_needs_no_autoencoder():
    cfg = preset("tiny").model
    assert load_vae(cfg) is None
    x = torch.randn(1, 3, 8, 8)
    assert encode(None, x, cfg) is x and decode(None, x, cfg) is x
