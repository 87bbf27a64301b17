"""Importing the official CompVis RDM checkpoint (rdm.official.checkpoint, ``rdm import
checkpoint``): the fixture made by the official code with random weights must be reproduced.

Tolerance: max |diff| <= 1e-4 in float32 on CPU against ``reference.safetensors`` (the fixture's
EXPECTED.md §5 observed 1.3e-6 to 2.3e-6; every negative control there is off by > 0.1)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from collections import OrderedDict

import pytest
import torch
import yaml

from rdm.cli import main
from rdm.errors import RdmError

FIXTURE = pathlib.Path(
    os.environ.get(
        "RDM_COMPVIS_FIXTURE",
        pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "compvis-rdm",
    )
)
pytestmark = pytest.mark.skipif(
    not (FIXTURE / "model.ckpt").is_file(), reason=f"fixture {FIXTURE} not present"
)
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from rdm.official.checkpoint import import_checkpoint

    out = tmp_path_factory.mktemp("official") / "run"
    report = import_checkpoint(FIXTURE / "model.ckpt", FIXTURE / "config.yaml", out, weights="both")
    assert report.weights == ("ema", "model")
    assert report.stubbed == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    # PROVENANCE.md: UNet 357,219 parameters, VQ 217,182
    assert (report.unet_parameters, report.first_stage_parameters) == (357_219, 217_182)
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- the converted model reproduces the official outputs ----------------------------------------


@pytest.mark.parametrize(
    ("weights", "ref", "other"), [("ema", "eps_ema", "eps_raw"), ("model", "eps_raw", "eps_ema")]
)
def test_unet_reproduces_the_official_eps(run_dir, reference, weights, ref, other):
    from rdm.checkpoint import load_run

    model, _ = load_run(run_dir, weights=weights)
    with torch.no_grad():
        eps = model(reference["x_t"], reference["t"], reference["context"])  # (2, 3, 8, 8)
    assert _max_diff(eps, reference[ref]) <= TOL
    assert _max_diff(eps, reference[other]) > 0.1  # the other weight set: it took the right one


def test_first_stage_decodes_through_the_quantiser_and_encodes(run_dir, reference):
    from rdm.checkpoint import load_run
    from rdm.model import decode, encode, load_vae

    _, cfg = load_run(run_dir)
    vae = load_vae(cfg.model)
    assert type(vae).__name__ == "VQModel" and vae.config.scaling_factor == 1.0
    images = decode(vae, reference["latents"], cfg.model)  # (2, 3, 16, 16)
    assert _max_diff(images, reference["decoded"]) <= TOL
    assert _max_diff(images, reference["decoded_no_quant"]) > 0.1  # quantised, not skipped
    latents = encode(vae, reference["images"], cfg.model)  # (2, 3, 8, 8), before quantisation
    assert _max_diff(latents, reference["encoded"]) <= TOL


def test_schedule_config_and_diffusers_layout(run_dir, reference):
    from rdm.checkpoint import load_run
    from rdm.diffusion import make_scheduler
    from rdm.encoders import release_identity

    model, cfg = load_run(run_dir)
    alphas = make_scheduler(cfg.diffusion).alphas_cumprod
    assert _max_diff(alphas, reference["alphas_cumprod"]) <= 1e-6  # LDM "linear" = scaled_linear
    assert cfg.diffusion.schedule == "scaled_linear" and cfg.diffusion.prediction_type == "epsilon"
    assert not cfg.diffusion.clip_sample
    m = cfg.model
    assert (m.latent, m.first_stage, m.vae_scale_factor, m.latent_downsample) == (
        True,
        "vq",
        1.0,
        2,
    )
    assert (m.k, m.context_dim, m.null_context, m.in_channels, m.resolution) == (
        4,
        16,
        "zeros",
        3,
        16,
    )
    # the release's sampler: DDIM 100 steps, η = 0, guidance 2.0
    s = cfg.sample
    assert (s.sampler, s.steps, s.eta, s.guidance_scale) == ("ddim", 100, 0.0, 2.0)
    assert cfg.train.ema_decay == 0.9999 and cfg.train.p_uncond == 0.0
    # EXPECTED.md §2: the verified diffusers config (attention_head_dim holds head COUNTS)
    expected = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 32],
        "layers_per_block": 1,
        "cross_attention_dim": 16,
        "attention_head_dim": [4, 4],
        "transformer_layers_per_block": 1,
        "use_linear_projection": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "act_fn": "silu",
        "downsample_padding": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "resnet_time_scale_shift": "default",
        "upcast_attention": False,
        "only_cross_attention": False,
        "center_input_sample": False,
    }
    conf = model.unet.config
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in conf.items() if k in expected}
    assert got == expected
    vq = json.loads((run_dir / "first_stage" / "config.json").read_text())
    assert vq["_class_name"] == "VQModel"
    assert (vq["num_vq_embeddings"], vq["vq_embed_dim"], vq["scaling_factor"]) == (64, 3, 1.0)
    assert cfg.encoder == release_identity(16)  # OpenAI CLIP ViT-B/32 QuickGELU, d = 16 here
    official = json.loads((run_dir / "official.json").read_text())
    assert official["weights"] == ["ema", "model"] and official["ema_num_updates"] == 2
    assert official["stubbed_globals"] == [
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    ]


def test_guidance_runs_against_the_zero_context(run_dir, reference):
    """rdm_sample.py's unconditional context is all zeros of shape (B, k, d)."""
    from rdm.checkpoint import load_run

    model, _ = load_run(run_dir)
    x, t = reference["x_t"], reference["t"]
    with torch.no_grad():
        e_null = model(x, t, None)
        e_zero = model.unet(x, t, encoder_hidden_states=torch.zeros(2, 4, 16)).sample
        e_cond = model(x, t, reference["context"])
    assert torch.equal(e_null, e_zero)
    assert _max_diff(e_null, e_cond) > 0.1


def test_moved_run_finds_its_first_stage(run_dir, tmp_path, monkeypatch):
    import shutil

    from rdm.checkpoint import load_run
    from rdm.model import load_vae

    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir, moved)
    monkeypatch.chdir(tmp_path)
    _, cfg = load_run(moved)
    assert pathlib.Path(cfg.model.vae_path) == moved / "first_stage"
    assert type(load_vae(cfg.model)).__name__ == "VQModel"


# --- the imported run samples through the pipeline and the CLI -----------------------------------


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    """A d = 16 rdm database (the fixture's context dimension)."""
    from fakes_retrieval import ProjectionEncoder, TinySource

    from rdm.database import build_database

    root = tmp_path_factory.mktemp("db")
    return build_database(TinySource(24), "all", ProjectionEncoder(16), root / "db", progress=False)


def test_pipeline_and_rdm_sample_load_the_imported_run(run_dir, tiny_db, tmp_path):
    from fakes_retrieval import ProjectionEncoder

    from rdm import conditioning as C
    from rdm.database import Database
    from rdm.errors import IdentityMismatch
    from rdm.official.checkpoint import import_checkpoint
    from rdm.pipeline import RDMPipeline

    # the run records the release's encoder by default; a database of another one is refused
    with pytest.raises(IdentityMismatch, match="ViT-B-32-quickgelu"):
        RDMPipeline.from_pretrained(run_dir, tiny_db)
    run = tmp_path / "run"
    identity = Database.open(tiny_db).identity
    assert identity == ProjectionEncoder(16).identity
    import_checkpoint(FIXTURE / "model.ckpt", FIXTURE / "config.yaml", run, encoder=identity)

    pipe = RDMPipeline.from_pretrained(run, tiny_db)
    assert type(pipe.vae).__name__ == "VQModel"
    cond = C.pseudo_query_context(pipe.db, pipe.k, 2, prob=None, uniform=True, seed=0)
    images = pipe(cond, [0, 1], steps=2, progress=False)
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    again = pipe(cond, [0, 1], steps=2, progress=False)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]

    out = tmp_path / "samples"
    argv = ["sample", str(run), "--db", str(tiny_db), "--unconditional", "--uniform"]
    assert main([*argv, "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("sample-*.png")) == [
        "sample-00000.png",
        "sample-00001.png",
    ]


def test_cli_import_says_what_it_stubbed(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["import", "checkpoint", str(FIXTURE / "model.ckpt"), "--config"]
    assert main([*argv, str(FIXTURE / "config.yaml"), "--out", str(out), "--weights", "model"]) == 0
    text = capsys.readouterr().out
    assert "stubbed (not imported, not run) 1 global(s)" in text
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in text
    assert "raw (model.diffusion_model.*) -> model.safetensors" in text
    assert "--weights model" in text
    assert "encoder recorded: ViT-B-32-quickgelu:openai#preprocess=release" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "first_stage",
        "model.safetensors",
        "official.json",
    ]
    # a second import onto the same directory is refused, naming it
    assert main([*argv, str(FIXTURE / "config.yaml"), "--out", str(out)]) == 2
    assert f"--out {out} exists and is not empty" in capsys.readouterr().err


# --- bad input: one clear RdmError naming the file ------------------------------------------------


def _state():
    from rdm.official.unpickle import load_lightning_checkpoint

    return load_lightning_checkpoint(FIXTURE / "model.ckpt")[0]["state_dict"]


def _save_ckpt(path: pathlib.Path, state: dict, **extra) -> pathlib.Path:
    torch.save({"epoch": 0, "state_dict": OrderedDict(state), **extra}, path)
    return path


def _config(tmp_path: pathlib.Path, edit) -> pathlib.Path:
    cfg = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    edit(cfg["model"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _import(ckpt, config, out, **kw):
    from rdm.official.checkpoint import import_checkpoint

    return import_checkpoint(ckpt, config, out, **kw)


def test_checkpoint_of_another_architecture(tmp_path):
    state = _state()
    ldm = {**state, "cond_stage_model.transformer.weight": torch.zeros(2)}  # a text-to-image LDM
    path = _save_ckpt(tmp_path / "ldm.ckpt", ldm)
    with pytest.raises(RdmError, match=rf"checkpoint {path} holds weights of another architecture"):
        _import(path, FIXTURE / "config.yaml", tmp_path / "out")
    classifier = {"fc.weight": torch.zeros(3, 3)}
    path = _save_ckpt(tmp_path / "classifier.ckpt", classifier)
    with pytest.raises(RdmError, match=rf"checkpoint {path} is not an RDM checkpoint"):
        _import(path, FIXTURE / "config.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["params"]["unet_config"]["params"].update(model_channels=64),
            "does not fit config",
        ),
        (
            lambda m: m["params"]["unet_config"]["params"].update(num_res_blocks=2),
            "does not have the layout|does not fit",
        ),
        (
            lambda m: m["params"]["unet_config"]["params"].update(context_dim=32),
            "does not fit config",
        ),
        (
            lambda m: m["params"]["first_stage_config"]["params"].update(n_embed=128),
            "does not fit config",
        ),
        (
            lambda m: m["params"].update(linear_end=0.012),
            "noise schedule .* differs from checkpoint",
        ),
        (lambda m: m["params"].update(timesteps=500), "trained with 1000 timesteps"),
    ],
)
def test_config_that_does_not_match_the_checkpoint(tmp_path, edit, message):
    config = _config(tmp_path, edit)
    with pytest.raises(RdmError, match=message) as info:
        _import(FIXTURE / "model.ckpt", config, tmp_path / "out")
    assert str(FIXTURE / "model.ckpt") in str(info.value) or str(config) in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(target="ldm.models.diffusion.ddpm.LatentDiffusion"), "model.target"),
        (
            lambda m: m["params"]["unet_config"]["params"].update(transformer_depth=2),
            "transformer_depth",
        ),
        (
            lambda m: m["params"]["unet_config"]["params"].update(use_scale_shift_norm=True),
            "use_scale_shift_norm",
        ),
        (
            lambda m: m["params"]["unet_config"]["params"].update(foo=1),
            "keys rdm does not know \\(foo\\)",
        ),
        (
            lambda m: m["params"]["unet_config"]["params"].pop("num_head_channels"),
            "num_heads, not num_head_channels",
        ),
        (
            lambda m: m["params"]["first_stage_config"].update(
                target="ldm.models.autoencoder.AutoencoderKL"
            ),
            "VQModelInterface",
        ),
        (
            lambda m: m["params"]["retrieval_encoder_cfg"].update(target="rdm.modules.x.Learned"),
            "retrieval_encoder_cfg",
        ),
    ],
)
def test_config_rdm_does_not_convert(tmp_path, edit, message):
    config = _config(tmp_path, edit)
    with pytest.raises(RdmError, match=rf"config {config}.*{message}"):
        _import(FIXTURE / "model.ckpt", config, tmp_path / "out")


def test_truncated_checkpoint_and_bad_config_files(tmp_path):
    data = (FIXTURE / "model.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(RdmError, match=rf"checkpoint {cut} cannot be read .*truncated"):
        _import(cut, FIXTURE / "config.yaml", tmp_path / "out")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(RdmError, match=rf"config {bad_yaml} is not valid YAML"):
        _import(FIXTURE / "model.ckpt", bad_yaml, tmp_path / "out")
    with pytest.raises(RdmError, match=rf"config {tmp_path / 'none.yaml'} does not exist"):
        _import(FIXTURE / "model.ckpt", tmp_path / "none.yaml", tmp_path / "out")


class TouchOnLoad:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_disallowed_global_is_stubbed_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = _save_ckpt(tmp_path / "evil.ckpt", _state(), callbacks={"x": TouchOnLoad(target)})
    report = _import(path, FIXTURE / "config.yaml", tmp_path / "out")
    assert not target.exists()
    assert "pathlib.Path" in report.stubbed
    # a stub where a weight should be is refused by name
    state = _state()
    state["model.diffusion_model.out.2.bias"] = TouchOnLoad(target)
    path = _save_ckpt(tmp_path / "evil-weight.ckpt", state)
    with pytest.raises(
        RdmError,
        match=rf"checkpoint {path}: entries model.diffusion_model.out.2.bias are not tensors",
    ):
        _import(path, FIXTURE / "config.yaml", tmp_path / "out2")
    assert not target.exists()


def test_ema_missing_suggests_the_raw_weights(tmp_path):
    state = {k: v for k, v in _state().items() if not k.startswith("model_ema.")}
    path = _save_ckpt(tmp_path / "no-ema.ckpt", state)
    with pytest.raises(RdmError, match=rf"checkpoint {path} has no EMA copy .*--weights model"):
        _import(path, FIXTURE / "config.yaml", tmp_path / "out")
    report = _import(path, FIXTURE / "config.yaml", tmp_path / "out", weights="model")
    assert report.weights == ("model",)


def test_release_files_without_the_guidance_vector_import(tmp_path, reference):
    """EXPECTED.md §7.9: the release config ignores unconditional_guidance_vex; files may lack it."""
    from rdm.checkpoint import load_run

    state = {k: v for k, v in _state().items() if k != "unconditional_guidance_vex"}
    path = _save_ckpt(tmp_path / "no-vex.ckpt", state)
    _import(path, FIXTURE / "config.yaml", tmp_path / "out")
    model, _ = load_run(tmp_path / "out")
    with torch.no_grad():
        eps = model(reference["x_t"], reference["t"], reference["context"])
    assert _max_diff(eps, reference["eps_ema"]) <= TOL


def test_pickle_payload_file_is_not_a_plain_pickle_ckpt(tmp_path):
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    with pytest.raises(RdmError, match=rf"checkpoint {path} is a plain pickle stream"):
        _import(path, FIXTURE / "config.yaml", tmp_path / "out")
