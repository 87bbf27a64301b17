"""The inference pipeline: load / save / call. A tiny encoder saved to disk, a folder source split
into a database and a training set, neighbours and a few training steps give a real run; a fake
model with a known answer (the exact ε for a point mass) checks that guidance, options and
callbacks reach the sampler; ``rdm sample`` and the README's Python snippet run end to end."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_db_cli import colour_squares, tiny_encoder_dir

import rdm.checkpoint
import rdm.sampling
from rdm import conditioning as C
from rdm.cli import main
from rdm.config import preset
from rdm.data import open_source
from rdm.database import Database, build_database
from rdm.diffusion import make_scheduler
from rdm.encoders import load_encoder
from rdm.errors import IdentityMismatch, RdmError
from rdm.neighbors import compute_neighbors, load_neighbors
from rdm.pipeline import RDMPipeline
from rdm.sampling import to_uint8
from rdm.train import RetrievalDataset, train

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    images = colour_squares(root / "images", 40, size=12)
    enc_dir = tiny_encoder_dir(root / "enc", seed=0)
    encoder = load_encoder(str(enc_dir))
    source = open_source(str(images))
    db_dir = build_database(source, "db", encoder, root / "db", progress=False)
    db = Database.open(db_dir)
    nn_path = compute_neighbors(db, source, "train", encoder, k=6, progress=False)

    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, context_dim=db.dim, k=3)
    cfg.train = dataclasses.replace(cfg.train, steps=3, checkpoint_every=3)
    dataset = RetrievalDataset(
        source, "train", db, load_neighbors(nn_path), k=3, resolution=cfg.model.resolution
    )
    for key, value in dataset.provenance().items():
        setattr(cfg, key, value)
    cfg.data = dataclasses.replace(
        cfg.data, source=source.spec, db=str(db_dir), neighbors=str(nn_path)
    )
    train(cfg, root / "run", dataset, progress=False)
    return {"root": root, "images": images, "enc": enc_dir, "db": db_dir, "run": root / "run"}


@pytest.fixture(scope="module")
def pipe(world):
    return RDMPipeline.from_pretrained(world["run"], world["db"])


def test_image_query_retrieves_its_own_colour(pipe, world):
    image = Image.open(world["images"] / "01.png")  # a green square
    cond = C.image_context(pipe.db, pipe.encoder, pipe.k, image, 1)
    captions = [pipe.db.captions[r] for r in cond.rows[0]]
    assert captions.count("a green square") >= 2


# --- a fake model with a known answer -------------------------------------------------------------


class PointMass(torch.nn.Module):
    """The exact ε for data concentrated at one image μ(c): ε = (x_t − √ᾱ_t μ(c)) / √(1 − ᾱ_t).

    An exact sampler returns μ(c); ε is affine in μ, so guidance ε_u + s(ε_c − ε_u) is the exact
    ε of μ_u + s(μ_c − μ_u), and that is what the sample must be. μ depends on the mean context
    token (any k'), through a fixed random (3, d) matrix; |μ| ≤ 0.12 keeps s ≤ 3 inside [-1, 1].
    """

    def __init__(self, cfg):
        super().__init__()
        self.abar = make_scheduler(cfg.diffusion).alphas_cumprod
        self.w = torch.randn(3, cfg.model.context_dim, generator=torch.Generator().manual_seed(0))
        self.null = torch.full((cfg.model.k, cfg.model.context_dim), 0.3)
        self.calls = 0

    def null_context(self, batch: int) -> torch.Tensor:
        return self.null.expand(batch, -1, -1)

    def mu(self, context: torch.Tensor) -> torch.Tensor:  # (B, k', d) -> (B, 3, 1, 1)
        return 0.12 * torch.tanh(context.float().mean(1) @ self.w.T)[:, :, None, None]

    def forward(self, x, t, context):
        self.calls += 1
        a = self.abar[int(t)]
        return (x - a.sqrt() * self.mu(context)) / (1 - a).sqrt()


@pytest.fixture
def fake(world):
    """A pipeline around :class:`PointMass` with the run's database; 8 px pixel space, k = 3."""
    cfg = preset("tiny")
    db = Database.open(world["db"])
    cfg.model = dataclasses.replace(cfg.model, context_dim=db.dim, k=3)
    return RDMPipeline(PointMass(cfg), cfg, db)


def random_conditioning(n: int, k: int, d: int, seed: int = 0) -> C.Conditioning:
    rng = np.random.default_rng(seed)
    ctx = rng.standard_normal((n, k, d)).astype(np.float32)
    return C.Conditioning(ctx, [[]] * n, ["random"] * n)


def expected_sample(model: PointMass, cond: C.Conditioning, scale: float, size: int) -> np.ndarray:
    """μ_u + s(μ_c − μ_u) as the uint8 images the pipeline returns, (B, H, W, 3)."""
    ctx = torch.from_numpy(cond.context)
    mu_c, mu_u = model.mu(ctx), model.mu(model.null_context(len(cond)))
    x0 = (mu_u + scale * (mu_c - mu_u)).expand(-1, -1, size, size)
    return to_uint8(x0).astype(int)


@pytest.mark.parametrize("k_ctx", [3, 1])  # the null context's size, and text mode's single token
@pytest.mark.parametrize("scale", [2.5, 0.5])
def test_the_guidance_scale_reaches_the_denoiser(fake, monkeypatch, k_ctx, scale):
    """ε at scale s equals ε_u + s(ε_c − ε_u) computed by hand, and every option is passed on."""
    seen = {}

    def recorder(sampler, denoise, x_T, diffusion_cfg, steps, *, eta, generators, **kw):
        t = torch.tensor(500)
        seen.update(sampler=sampler, steps=steps, eta=eta, n_gen=len(generators), x=x_T)
        seen["eps"] = denoise(x_T, t)
        return x_T.clamp(-1, 1)

    monkeypatch.setattr(rdm.sampling, "sample", recorder)
    cond = random_conditioning(2, k_ctx, fake.db.dim)
    fake(cond, [0, 1], sampler="dpm++", steps=7, eta=1.0, guidance_scale=scale, progress=False)
    x, t, m = seen["x"], torch.tensor(500), fake.model
    eps_c = m(x, t, torch.from_numpy(cond.context))
    eps_u = m(x, t, m.null_context(2))
    torch.testing.assert_close(seen["eps"], eps_u + scale * (eps_c - eps_u))
    assert not torch.allclose(seen["eps"], eps_c)  # s ≠ 1 is not plain conditional sampling
    assert (seen["sampler"], seen["steps"], seen["eta"], seen["n_gen"]) == ("dpm++", 7, 1.0, 2)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("k_ctx", [3, 1])
def test_samples_move_with_the_guidance_scale_as_predicted(fake, sampler, k_ctx):
    """Through the real samplers: the sample at scale s is μ_u + s(μ_c − μ_u) (to one uint8 level),
    so s = 0, 1, 3 give the unconditional, conditional and extrapolated images."""
    cond = random_conditioning(3, k_ctx, fake.db.dim, seed=1)
    size = fake.config.model.resolution
    results = {}
    for scale in (0.0, 1.0, 3.0):
        images = fake(
            cond, [5, 6, 7], sampler=sampler, steps=4, guidance_scale=scale, progress=False
        )
        results[scale] = np.stack([np.asarray(im) for im in images]).astype(int)
        expected = expected_sample(fake.model, cond, scale, size)
        assert np.abs(results[scale] - expected).max() <= 1, scale
    # the predicted way: sample(3) − sample(1) = 2 · (sample(1) − sample(0))
    diff = (results[3.0] - results[1.0]) - 2 * (results[1.0] - results[0.0])
    assert np.abs(diff).max() <= 4 and np.abs(results[3.0] - results[1.0]).max() > 10


def test_unset_options_come_from_the_runs_sample_config(fake):
    fake.config.sample = dataclasses.replace(fake.config.sample, guidance_scale=2.5, steps=3)
    cond = random_conditioning(2, 3, fake.db.dim, seed=2)
    steps = []
    images = fake(cond, callback=lambda info: steps.append(info["i"]), progress=False)
    got = np.stack([np.asarray(im) for im in images]).astype(int)
    assert np.abs(got - expected_sample(fake.model, cond, 2.5, 8)).max() <= 1
    assert steps == [0, 1, 2]


def test_callback_sees_every_step_of_every_batch(fake):
    cond = random_conditioning(3, 3, fake.db.dim, seed=3)
    infos = []
    fake(cond, [0, 1, 2], steps=4, guidance_scale=2.0, batch_size=2, callback=infos.append)
    assert [(d["batch"], d["i"]) for d in infos] == [(b, i) for b in (0, 1) for i in range(4)]
    assert {(d["n"], d["batches"]) for d in infos} == {(4, 2)}
    ts = [int(d["t"]) for d in infos[:4]]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 4
    assert infos[0]["x"].shape == (2, 3, 8, 8) and infos[-1]["x"].shape == (1, 3, 8, 8)
    # the point mass is predicted exactly at every step: denoised = μ_u + s(μ_c − μ_u)
    m, ctx = fake.model, torch.from_numpy(cond.context[2:])
    mu_g = m.mu(m.null_context(1)) + 2.0 * (m.mu(ctx) - m.mu(m.null_context(1)))
    torch.testing.assert_close(infos[-1]["denoised"], mu_g.expand(1, 3, 8, 8), atol=1e-4, rtol=0)


def test_raising_cancelled_in_the_callback_stops_the_work(fake):
    from rdm.sampling import Cancelled

    def cancel(info):
        if info["i"] == 1:
            raise Cancelled("stop")

    cond = random_conditioning(4, 3, fake.db.dim)
    with pytest.raises(Cancelled):
        fake(cond, [0, 1, 2, 3], steps=5, guidance_scale=1.0, batch_size=2, callback=cancel)
    assert fake.model.calls == 2  # s = 1: one forward per step, stopped after the second step


# --- the real run ---------------------------------------------------------------------------------


def test_image_i_depends_only_on_seeds_i(pipe):
    cond = C.pseudo_query_context(pipe.db, pipe.k, 4, prob=pipe.pseudo_query_prob, seed=0)
    kw = dict(steps=3, sampler="ddim", eta=1.0, guidance_scale=2.0, progress=False)
    seeds = [7, 8, 9, 10]
    runs = [pipe(cond, seeds, batch_size=b, **kw) for b in (4, 3, 1)]
    arrays = [np.stack([np.asarray(im) for im in run]) for run in runs]
    assert np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[0], arrays[2])
    other = np.stack([np.asarray(im) for im in pipe(cond, [7, 8, 99, 10], **kw)])
    same = [np.array_equal(other[i], arrays[0][i]) for i in range(4)]
    assert same == [True, True, False, True]
    assert runs[0][0].size == (8, 8)
    default = pipe(cond, None, **kw)  # default seeds: the run's sample seed + i
    s = pipe.config.sample.seed
    expected = pipe(cond, list(range(s, s + 4)), **kw)
    assert [np.asarray(a).tobytes() for a in default] == [np.asarray(b).tobytes() for b in expected]


def test_weights_model_and_ema_load_their_own_tensors(world, tmp_path):
    pipes = {
        w: RDMPipeline.from_pretrained(world["run"], world["db"], weights=w)
        for w in ("model", "ema")
    }
    files = {w: load_file(str(world["run"] / f"{w}.safetensors")) for w in ("model", "ema")}
    for w, p in pipes.items():
        state = p.model.state_dict()
        assert all(torch.equal(state[name], t) for name, t in files[w].items())
    differ = [n for n, t in files["model"].items() if not torch.equal(t, files["ema"][n])]
    assert differ  # the EMA is not the trained weights after a few steps
    # saved, the weights sampled from load back (their checksum recorded afresh)
    saved = pipes["model"].save_pretrained(tmp_path / "saved")
    assert same_weights(pipes["model"], RDMPipeline.from_pretrained(saved, world["db"]))


def test_swapping_in_a_database_of_another_encoder_is_refused(world, tmp_path):
    other = load_encoder(str(tiny_encoder_dir(tmp_path / "other", seed=1)))
    other_db = build_database(
        open_source(str(world["images"])), "db", other, tmp_path / "db2", progress=False
    )
    with pytest.raises(IdentityMismatch) as err:
        RDMPipeline.from_pretrained(world["run"], other_db)
    assert str(other_db) in str(err.value) and str(world["run"]) in str(err.value)


def test_swapping_in_a_database_of_the_same_encoder_works(world, tmp_path):
    encoder = load_encoder(str(world["enc"]))
    swapped = build_database(
        open_source(str(world["images"])), "all", encoder, tmp_path / "all", progress=False
    )
    pipe = RDMPipeline.from_pretrained(world["run"], swapped)
    assert len(pipe.db) == 40 and pipe.pseudo_query_prob is None
    with pytest.raises(RdmError, match="rdm db neighbors"):
        C.pseudo_query_context(pipe.db, pipe.k, 2, prob=pipe.pseudo_query_prob)
    cond = C.pseudo_query_context(pipe.db, pipe.k, 2, prob=None, uniform=True)
    assert cond.context.shape == (2, 3, pipe.db.dim)


def same_weights(a: RDMPipeline, b: RDMPipeline) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_save_pretrained_round_trip(pipe, world, tmp_path):
    out = pipe.save_pretrained(tmp_path / "saved")
    again = RDMPipeline.from_pretrained(out, world["db"])
    assert same_weights(pipe, again) and again.config == pipe.config
    assert pipe.save_pretrained(out) == out  # overwriting works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_a_failed_save_leaves_the_old_directory_intact(pipe, world, tmp_path, monkeypatch):
    out = pipe.save_pretrained(tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(module, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rdm.checkpoint, "save_weights", broken)
    with pytest.raises(RdmError, match="saved"):
        pipe.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary debris
    assert same_weights(pipe, RDMPipeline.from_pretrained(out, world["db"]))


def test_the_old_directory_is_replaced_only_once_the_new_one_is_complete(
    pipe, world, tmp_path, monkeypatch
):
    """Deleting the old directory fails half-way (a permission error after one file): the
    directory at ``out`` is still a complete, loadable pipeline (the new one)."""
    out = pipe.save_pretrained(tmp_path / "saved")
    real_rmtree = shutil.rmtree

    def flaky_rmtree(path, *args, **kwargs):
        if Path(path) == out:
            (out / "ema.safetensors").unlink()
            raise OSError(13, "Permission denied")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", flaky_rmtree)
    pipe.save_pretrained(out)
    monkeypatch.undo()
    assert same_weights(pipe, RDMPipeline.from_pretrained(out, world["db"]))


def test_readme_python_snippet_runs_as_written(world, tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    snippet = text.split("In Python, the same pipeline:")[1].split("```python\n")[1]
    snippet = snippet.split("```")[0]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fm-run").symlink_to(world["run"])
    (tmp_path / "runs" / "fm-db").symlink_to(world["db"])
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {})
    written = [p for p in tmp_path.iterdir() if p.suffix == ".png"]
    assert len(written) == 1 and Image.open(written[0]).size[0] > 8 * 8


def test_cli_sample_writes_pngs_and_a_grid(world, tmp_path, capsys):
    base = ["sample", str(world["run"]), "--db", str(world["db"]), "-n", "2", "--steps", "2"]
    for i, mode in enumerate(
        (
            ["--image", str(world["images"] / "03.png")],
            ["--text", "a blue square", "--text-mode", "text"],
            ["--unconditional", "--top-m", "0.5"],
            ["--class-pool", "a grey square", "--pool-size", "5"],
        )
    ):
        out = tmp_path / f"out{i}"
        assert main([*base, *mode, "--out", str(out)]) == 0
        assert (out / "grid.png").is_file() and len(list(out.glob("sample-*.png"))) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--image", "."], "is a directory"),
        (["--text", "  "], "empty"),
        (["--class-pool", "x", "--pool-size", "1"], "--pool-size"),
        (["--unconditional", "--top-m", "2"], "--top-m"),
    ],
)
def test_cli_bad_input_gets_a_clear_error(world, tmp_path, capsys, extra, message):
    args = ["sample", str(world["run"]), "--db", str(world["db"]), "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_run_directory_that_is_not_one(world, tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--unconditional", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_checks_the_output_before_loading_anything(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # under a regular file: cannot be created
    assert main(["sample", str(tmp_path / "no-run"), "--unconditional", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "Traceback" not in err
