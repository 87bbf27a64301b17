"""The release's encoder: OpenAI CLIP under QuickGELU, OpenAI's TorchScript files converted once,
and the CompVis RDM release's query preprocessing, with tiny random open_clip models saved to disk
in OpenAI's formats and loaded back through the real path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rdm import encoders
from rdm.encoders import (
    OPENAI_MEAN,
    OPENAI_STD,
    RELEASE_RESIZE,
    EncoderSpecError,
    convert_openai_checkpoint,
    identity_fingerprint,
    load_encoder,
    parse_spec,
    release_identity,
    release_resize,
    save_local_dir,
)
from rdm.io import sha256_file

ARCH = "rdm-test-tiny"  # GELU, like open_clip's plain ViT-B-32
QUICK = "rdm-test-tiny-quickgelu"  # QuickGELU, like ViT-B-32-quickgelu
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class _Archive(torch.nn.Module):
    """A module tree holding a state dict as buffers: traced, it is a TorchScript archive with
    OpenAI's layout (its state dict keys, fp16 weights, input_resolution / context_length /
    vocab_size entries)."""

    def forward(self, x):
        return x


def _openai_style_archive(state: dict, path) -> None:
    root = _Archive()
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, torch.nn.Module())
            module = getattr(module, p)
        module.register_buffer(leaf, tensor.half() if tensor.is_floating_point() else tensor)
    for key, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.trace(root, torch.zeros(1)), str(path))


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """One tiny QuickGELU CLIP as an OpenAI-style TorchScript file, plus its weights in fp16."""
    import open_clip

    root = tmp_path_factory.mktemp("openai")
    for name, cfg in ((ARCH, TINY_CFG), (QUICK, {**TINY_CFG, "quick_gelu": True})):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(QUICK)
    # OpenAI's files hold fp16 weights: the reference model holds the same rounded values
    state = {
        k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    model.load_state_dict(state)
    _openai_style_archive(state, root / "tiny-openai.pt")
    return {"root": root, "pt": root / "tiny-openai.pt", "model": model.eval(), "state": state}


@pytest.fixture(scope="module")
def converted(openai_files, tmp_path_factory):
    """The archive converted with its sha256 known as one of OpenAI's releases."""
    sha = sha256_file(openai_files["pt"])
    out = tmp_path_factory.mktemp("converted") / "tiny-openai.safetensors"
    with pytest.MonkeyPatch.context() as patch:  # only while converting
        patch.setattr(encoders, "openai_checkpoints", lambda: {sha: QUICK})
        return convert_openai_checkpoint(openai_files["pt"], out)


def pixels(n: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def reference_embeddings(model, x: torch.Tensor) -> np.ndarray:
    """open_clip's own forward on preprocessed (B, 3, S, S) input, unit rows."""
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()


# ---- QuickGELU ----------------------------------------------------------------------------------


def test_openai_tag_under_plain_arch_is_refused_naming_the_quickgelu_arch():
    with pytest.raises(EncoderSpecError, match="QuickGELU.*use 'ViT-B-32-quickgelu:openai'"):
        parse_spec("ViT-B-32:openai")
    parsed = parse_spec("ViT-B-32-quickgelu:openai")
    assert parsed.weights == "openai" and parsed.arch == "ViT-B-32-quickgelu"
    # other tags trained with GELU stay as they are
    assert parse_spec("ViT-B-32:laion2b_s34b_b79k").weights is None


def test_openai_torchscript_file_is_refused_with_the_conversion_command(openai_files):
    pt = openai_files["pt"]
    with pytest.raises(EncoderSpecError, match="TorchScript.*rdm encoder convert-openai") as info:
        load_encoder(f"{ARCH}:{pt}")
    assert str(pt) in str(info.value) and f"{QUICK}:" in str(info.value)


def test_converted_openai_file_needs_quickgelu_and_then_computes_open_clips_features(
    openai_files, converted
):
    with pytest.raises(EncoderSpecError, match=f"QuickGELU.*use '{QUICK}:{converted}'"):
        load_encoder(f"{ARCH}:{converted}")
    enc = load_encoder(f"{QUICK}:{converted}")
    assert enc.identity["weights"] == "openai" and enc.identity["arch"] == QUICK

    x = pixels()
    ours = enc.encode_images(x)
    x_pre = encoders.preprocess(torch.from_numpy(x), enc.preprocess_cfg)
    np.testing.assert_allclose(ours, reference_embeddings(openai_files["model"], x_pre), atol=1e-5)
    # the same weights under GELU (what plain ViT-B-32 does with OpenAI weights) differ
    import open_clip

    gelu = open_clip.create_model(ARCH)
    gelu.load_state_dict(openai_files["state"])
    assert np.abs(reference_embeddings(gelu.eval(), x_pre) - ours).max() > 1e-3


def test_conversion_of_an_unknown_file_does_not_claim_openai_weights(openai_files, tmp_path):
    out = convert_openai_checkpoint(openai_files["pt"], tmp_path / "other.safetensors")
    meta = encoders.checkpoint_metadata(out)
    assert meta["rdm_source_sha256"] == sha256_file(openai_files["pt"])
    assert encoders.META_WEIGHTS not in meta
    enc = load_encoder(f"{ARCH}:{out}")  # not recognised: no QuickGELU guard, no name
    assert "weights" not in enc.identity


def test_conversion_refuses_a_plain_state_dict_and_a_missing_file(openai_files, tmp_path):
    torch.save(openai_files["state"], tmp_path / "plain.pt")
    with pytest.raises(EncoderSpecError, match="not a TorchScript archive.*ARCH:FILE"):
        convert_openai_checkpoint(tmp_path / "plain.pt", tmp_path / "x.safetensors")
    with pytest.raises(EncoderSpecError, match="does not exist"):
        convert_openai_checkpoint(tmp_path / "nope.pt", tmp_path / "x.safetensors")


def test_a_converted_file_edited_since_is_other_weights(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(str(converted))
    state["logit_scale"] = state["logit_scale"] + 1
    edited = tmp_path / "edited.safetensors"
    save_file(state, str(edited), metadata=encoders.checkpoint_metadata(converted))
    enc = load_encoder(f"{QUICK}:{edited}")
    assert "weights" not in enc.identity
    assert "changed since it was converted" in capsys.readouterr().err


def test_named_weights_pair_by_name_not_by_the_copys_checksum(converted):
    ident = load_encoder(f"{QUICK}:{converted}#preprocess=release").identity
    other_copy = {**ident, "weights_sha256": "0" * 64, "spec": "elsewhere"}
    assert identity_fingerprint(other_copy) == identity_fingerprint(ident)
    unnamed = {k: v for k, v in other_copy.items() if k != "weights"}
    assert identity_fingerprint(unnamed) != identity_fingerprint({**unnamed, "weights_sha256": "1"})
    # the identity written without weights has the fields a genuine load computes
    expected = {**release_identity(32), "arch": QUICK, "image_size": 32}
    assert identity_fingerprint(expected) == identity_fingerprint(ident)
    assert identity_fingerprint(release_identity(32)) != identity_fingerprint(release_identity(16))


# ---- the release's preprocessing ---------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights (B, 4) for taps at -1, 0, 1, 2 (PyTorch's a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_align_corners(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Reference 1-D bicubic resampling with align_corners=True, border taps clamped."""
    n = x.shape[axis]
    src = np.arange(out) * (n - 1) / (out - 1)
    i0 = np.floor(src).astype(int)
    w = _cubic_weights(src - i0)  # (out, 4)
    taps = np.clip(i0[:, None] + np.arange(-1, 3), 0, n - 1)  # (out, 4)
    moved = np.moveaxis(x, axis, -1)
    y = (moved[..., taps] * w).sum(-1)
    return np.moveaxis(y, -1, axis)


def test_release_resize_is_an_uncropped_bicubic_squash_without_antialias():
    x = pixels(2, h=13, w=29, seed=3)
    cfg = {"size": 9}
    ours = release_resize(torch.from_numpy(x), cfg).numpy()  # (2, 3, 9, 9)
    ref = x.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1
    ref = _bicubic_align_corners(_bicubic_align_corners(ref, 9, 2), 9, 3)
    np.testing.assert_allclose(ours, (ref + 1) / 2, atol=1e-5)
    # no crop: the corners are the image's corners
    np.testing.assert_allclose(ours[:, :, 0, 0], x[:, 0, 0].astype(np.float32) / 255, atol=1e-6)
    np.testing.assert_allclose(ours[:, :, -1, -1], x[:, -1, -1] / 255, atol=1e-6)
    # at the target size the image is passed through (kornia's shortcut)
    same = release_resize(torch.from_numpy(pixels(1, 9, 9)), cfg).numpy()
    np.testing.assert_allclose(same[0], pixels(1, 9, 9)[0].transpose(2, 0, 1) / 255, atol=1e-6)


def test_release_preprocessing_is_an_encoder_option_recorded_in_the_identity(
    openai_files, converted
):
    plain = load_encoder(f"{QUICK}:{converted}")
    release = load_encoder(f"{QUICK}:{converted}#preprocess=release")
    ident = release.identity
    assert ident["spec"] == f"{QUICK}:{converted}#preprocess=release"
    assert ident["resize"] == RELEASE_RESIZE and plain.identity["resize"] != RELEASE_RESIZE
    assert ident["mean"] == list(OPENAI_MEAN) and ident["std"] == list(OPENAI_STD)
    assert identity_fingerprint(ident) != identity_fingerprint(plain.identity)

    x = pixels(2, h=24, w=60, seed=5)  # wide: centre crop and squash see different pixels
    x_pre = (
        release_resize(torch.from_numpy(x), {"size": 32}) - torch.tensor(OPENAI_MEAN)[:, None, None]
    ) / torch.tensor(OPENAI_STD)[:, None, None]
    expected = reference_embeddings(openai_files["model"], x_pre.float())
    np.testing.assert_allclose(release.encode_images(x), expected, atol=1e-5)
    assert np.abs(plain.encode_images(x) - expected).max() > 1e-3


def test_unknown_preprocessing_option_is_refused():
    with pytest.raises(
        EncoderSpecError, match="unknown preprocessing 'kornia'.*#preprocess=release"
    ):
        parse_spec("ViT-B-32-quickgelu:openai#preprocess=kornia")


def test_release_preprocessing_reloads_from_a_local_dir_spec(openai_files, tmp_path):
    out = save_local_dir(
        openai_files["model"],
        {**TINY_CFG, "quick_gelu": True},
        {"size": 32},
        tmp_path / "d",
        arch=QUICK,
    )
    enc = load_encoder(f"{out}#preprocess=release")
    again = load_encoder(enc.identity["spec"])  # the recorded spec loads the same encoder
    assert identity_fingerprint(again.identity) == identity_fingerprint(enc.identity)
    assert again.identity["resize"] == RELEASE_RESIZE


def test_raw_features_are_the_unit_ones_before_normalising(converted):
    """The release feeds a query's raw CLIP feature to its model: ``unit=False`` gives it."""
    enc = load_encoder(f"{QUICK}:{converted}#preprocess=release")
    x = pixels(2)
    for raw, unit in (
        (enc.encode_images(x, unit=False), enc.encode_images(x)),
        (enc.encode_texts(["a dog", "a cat"], unit=False), enc.encode_texts(["a dog", "a cat"])),
    ):
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        assert raw.dtype == np.float32 and np.abs(norms - 1).min() > 1e-2
        np.testing.assert_allclose(raw / norms, unit, atol=1e-6)
