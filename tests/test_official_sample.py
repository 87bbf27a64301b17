"""``rdm sample`` on the imported CompVis release (the fixture's model.ckpt + db parts + nn_memory,
../shared/fixtures/compvis-rdm): the release's conditioning (the raw query embedding first,
``--omit-query``, guidance against the zero context, top-m as ``get_qids`` rounds it, DDIM 100,
η = 0, s = 2.0) and rdm's own samplers, in every mode.

The release's context builders are re-implemented here in numpy from its code
(``MinimalRETRODiffusion.sample_with_query`` / ``sample_from_rdata`` / ``get_qids`` and
``DatasetBuilder.search_k_nearest`` at commit 1017f2b; the fixture's searcher is brute force
over the normalised rows) and compared with what rdm builds. Text and image queries use a tiny
random open_clip model with d = 16 saved to disk (the release's CLIP cannot be downloaded); the
run and database then record its identity instead of the release's."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdm import conditioning as C
from rdm.cli import main
from rdm.database import Database
from rdm.errors import RdmError
from rdm.pseudo_query import candidates

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "compvis-rdm"
PARTS = [FIXTURE / "db" / "40x16-part_1.npz", FIXTURE / "db" / "40x16-part_2.npz"]
NN_MEMORY = FIXTURE / "db" / "nn_memory.p"
TINY_CFG = {  # open_clip CLIP with the fixture's d = 16 (ViT-B/32's 512 in the release)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PREPROCESS = {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
K = 4

pytestmark = pytest.mark.skipif(
    not (FIXTURE / "model.ckpt").is_file(), reason=f"fixture {FIXTURE} not present"
)


# --- the release's context builders, from its code -------------------------------------------------


def release_embeddings() -> np.ndarray:
    """``DatasetBuilder.data_pool['embedding']``: the parts in part-number order, float16."""
    return np.concatenate([np.load(p)["embedding"] for p in PARTS])  # (80, 16)


def release_search(q: np.ndarray, k: int) -> np.ndarray:
    """``search_batched(q / |q|)`` of the fixture's brute-force dot-product searcher over the
    normalised database: rows (B, k), best first."""
    xb = release_embeddings().astype(np.float64)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    q = np.asarray(q, np.float64)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ xb.T  # (B, 80)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def release_query_context(q_raw: np.ndarray, k: int, omit_query: bool) -> np.ndarray:
    """``sample_with_query(query_embedded=True, normalize=False)``: ``r_emb`` are the k stored
    rows found for the query; the context is ``r_emb`` (``omit_query``) or ``[q_emb, r_emb[:, :k
    − 1]]`` with ``q_emb`` the query as CLIP gave it. (B, k, d) float32."""
    r_emb = release_embeddings()[release_search(q_raw, k)].astype(np.float32)
    if omit_query:
        return r_emb
    return np.concatenate([q_raw[:, None].astype(np.float32), r_emb[:, : k - 1]], axis=1)


def release_top_m(memsize: float) -> np.ndarray:
    """``get_qids``: the candidates are ``nn_memory[: int(memsize * len(nn_memory))]``."""
    with open(NN_MEMORY, "rb") as f, warnings.catch_warnings():  # trusted: plain pickle
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.26's numpy.core names
        nn_memory = pickle.load(f)["nn_memory"]
    return nn_memory[: int(memsize * len(nn_memory))]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The fixture imported as a user would: the run and database record the release's CLIP."""
    from rdm.official.checkpoint import import_checkpoint
    from rdm.official.db_import import import_database

    root = tmp_path_factory.mktemp("release")
    run = import_checkpoint(FIXTURE / "model.ckpt", FIXTURE / "config.yaml", root / "run").out
    db = import_database(PARTS, root / "db", nn_memory=NN_MEMORY, progress=False)
    return {"run": run, "db": db}


@pytest.fixture(scope="module")
def with_encoder(tmp_path_factory):
    """The same run and database recording a tiny random open_clip encoder (d = 16, the
    release's query preprocessing), so that text and image queries can be encoded."""
    import open_clip

    from rdm.encoders import load_encoder, save_local_dir
    from rdm.official.checkpoint import import_checkpoint
    from rdm.official.db_import import import_database

    root = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    enc_dir = save_local_dir(
        open_clip.CLIP(**TINY_CFG), TINY_CFG, PREPROCESS, root / "clip", arch="rdm-test-tiny16"
    )
    encoder = load_encoder(f"{enc_dir}#preprocess=release")
    run = import_checkpoint(
        FIXTURE / "model.ckpt", FIXTURE / "config.yaml", root / "run", encoder=encoder.identity
    ).out
    db = import_database(PARTS, root / "db", encoder=encoder, nn_memory=NN_MEMORY, progress=False)
    image = root / "query.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 28, 3), dtype=np.uint8)).save(image)
    return {"run": run, "db": db, "encoder": encoder, "image": image, "root": root}


@pytest.fixture
def captured(monkeypatch):
    """Every Conditioning the CLI builds, and the sampler / guidance arguments it samples with
    (the real functions still run)."""
    import rdm.sampling

    got: dict[str, list] = {"cond": [], "sample": [], "guided": []}
    for name in ("image_context", "text_context", "pseudo_query_context", "class_pool_context"):
        real = getattr(C, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            cond = _real(*args, **kwargs)
            got["cond"].append((_name, kwargs, cond))
            return cond

        monkeypatch.setattr(C, name, wrapper)
    real_sample, real_guided = rdm.sampling.sample, rdm.sampling.guided

    def sample(sampler, denoise, x_T, diffusion_cfg, steps, **kwargs):
        got["sample"].append({"sampler": sampler, "steps": steps, "eta": kwargs["eta"]})
        return real_sample(sampler, denoise, x_T, diffusion_cfg, steps, **kwargs)

    def guided(model, context, null=None, scale=1.0, *args, **kwargs):
        got["guided"].append({"model": model, "context": context, "null": null, "scale": scale})
        return real_guided(model, context, null, scale, *args, **kwargs)

    monkeypatch.setattr(rdm.sampling, "sample", sample)
    monkeypatch.setattr(rdm.sampling, "guided", guided)
    return got


def sample_cli(run, db, out, *mode, n=2, steps=("--steps", "1")) -> int:
    argv = ["sample", str(run), "--db", str(db), *mode, "-n", str(n), *steps]
    return main([*argv, "--out", str(out)])


# --- text and image queries: the raw query embedding first ----------------------------------------


def test_text_query_is_the_first_context_vector_raw_as_the_release_feeds_it(
    with_encoder, captured, tmp_path
):
    enc = with_encoder["encoder"]
    args = (with_encoder["run"], with_encoder["db"])
    assert sample_cli(*args, tmp_path / "a", "--text", "a red square") == 0
    _, kwargs, cond = captured["cond"][-1]
    q_raw = enc.encode_texts(["a red square"], unit=False)  # (1, 16): clip.encode_text
    assert abs(float(np.linalg.norm(q_raw)) - 1) > 0.1  # the raw features are not unit norm
    expected = release_query_context(q_raw, K, omit_query=False)[0]  # (4, 16)
    assert cond.context.shape == (2, K, 16)
    np.testing.assert_allclose(cond.context[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cond.context[1], cond.context[0])
    assert cond.rows[0] == release_search(q_raw, K)[0, : K - 1].tolist()
    assert len(list((tmp_path / "a").glob("sample-*.png"))) == 2

    # --omit-query: the k stored rows found for the text, no text token
    assert sample_cli(*args, tmp_path / "b", "--text", "a red square", "--omit-query") == 0
    cond = captured["cond"][-1][2]
    np.testing.assert_array_equal(cond.context[0], release_query_context(q_raw, K, True)[0])
    # --text-mode text: the release's --only_caption (k_nn = 1), the raw text embedding alone
    assert sample_cli(*args, tmp_path / "c", "--text", "a red square", "--text-mode", "text") == 0
    cond = captured["cond"][-1][2]
    np.testing.assert_allclose(cond.context, np.repeat(q_raw[None], 2, 0), rtol=1e-6, atol=1e-6)


def test_image_query_is_the_first_context_vector_raw(with_encoder, captured, tmp_path):
    from rdm.data.images import decode_image

    enc = with_encoder["encoder"]
    args = (with_encoder["run"], with_encoder["db"])
    image = with_encoder["image"]
    assert sample_cli(*args, tmp_path / "a", "--image", str(image)) == 0
    cond = captured["cond"][-1][2]
    q_raw = enc.encode_images([decode_image(image).convert("RGB")], unit=False)  # (1, 16)
    assert abs(float(np.linalg.norm(q_raw)) - 1) > 0.1
    np.testing.assert_allclose(
        cond.context[0], release_query_context(q_raw, K, False)[0], rtol=1e-6, atol=1e-6
    )
    assert sample_cli(*args, tmp_path / "b", "--image", str(image), "--omit-query") == 0
    cond = captured["cond"][-1][2]
    np.testing.assert_array_equal(cond.context[0], release_query_context(q_raw, K, True)[0])
    assert len(list((tmp_path / "b").glob("sample-*.png"))) == 2


def test_class_pool_mode_samples_from_the_imported_model(with_encoder, captured, tmp_path):
    args = (with_encoder["run"], with_encoder["db"])
    assert sample_cli(*args, tmp_path, "--class-pool", "a dog", "--pool-size", "8") == 0
    cond = captured["cond"][-1][2]
    pool = release_search(with_encoder["encoder"].encode_texts(["a dog"]), 8)[0]
    assert all(set(r) <= set(pool.tolist()) and len(set(r)) == K for r in cond.rows)
    np.testing.assert_array_equal(cond.context, release_embeddings()[np.array(cond.rows)])
    assert (tmp_path / "grid.png").is_file()


def test_a_run_of_rdm_keeps_rdms_unit_query_and_neighbour_defaults(
    with_encoder, captured, tmp_path
):
    """Only an imported run (official.json) gets the release's conditioning."""
    plain = tmp_path / "plain-run"
    shutil.copytree(with_encoder["run"], plain)
    (plain / "official.json").unlink()
    assert sample_cli(plain, with_encoder["db"], tmp_path / "a", "--text", "a red square") == 0
    q = with_encoder["encoder"].encode_texts(["a red square"])  # unit norm
    cond = captured["cond"][-1][2]
    np.testing.assert_array_equal(cond.context[0], release_query_context(q, K, True)[0])
    args = ["--text", "a red square", "--text-mode", "text+neighbors"]
    assert sample_cli(plain, with_encoder["db"], tmp_path / "b", *args) == 0
    cond = captured["cond"][-1][2]
    np.testing.assert_allclose(np.linalg.norm(cond.context[0, 0]), 1.0, rtol=1e-5)


def test_raw_query_needs_an_encoder_that_gives_raw_features(release):
    from fakes_retrieval import ProjectionEncoder

    db = Database.open(release["db"])
    with pytest.raises(RdmError, match="only unit-norm embeddings.*--encoder SPEC"):
        C.text_context(db, ProjectionEncoder(16), K, "a dog", 1, raw_query=True)


# --- unconditional: pseudo-queries from nn_memory ---------------------------------------------------


@pytest.mark.parametrize("m", [0.1, 0.2, 8 / 55, 0.5, 1.0])
def test_top_m_floor_keeps_the_releases_candidates(release, m):
    nn = Database.open(release["db"]).root / "neighbors-train.safetensors"
    from rdm.neighbors import load_neighbors

    prob = load_neighbors(nn).pq_prob
    rows, weights = candidates(prob, m, rounding="floor")
    np.testing.assert_array_equal(rows, release_top_m(m))
    assert weights is None  # uniform within the top-m, the release's default
    ceil_rows, _ = candidates(prob, m)  # rdm's default is unchanged
    assert len(ceil_rows) == int(np.ceil(m * 55))


def test_top_m_floor_differs_from_ceil_where_the_release_rounds_down(release):
    """0.1 · 55 = 5.5: the release keeps 5, rdm's ceil 6."""
    from rdm.neighbors import load_neighbors

    prob = load_neighbors(release["db"] / "neighbors-train.safetensors").pq_prob
    assert len(release_top_m(0.1)) == 5
    assert len(candidates(prob, 0.1, rounding="floor")[0]) == 5
    assert len(candidates(prob, 0.1)[0]) == 6
    # 0.01 (rdm_sample.py's default) of 55 keeps no row in the release (its np.random.choice
    # then fails); rdm says so
    with pytest.raises(RdmError, match=r"keeps int\(0.01 × 55\) = 0 .*at least 1/55"):
        candidates(prob, 0.01, rounding="floor")
    with pytest.raises(RdmError, match="rounding 'round'"):
        candidates(prob, 0.5, rounding="round")


def test_unconditional_context_is_what_sample_from_rdata_builds(release, captured, tmp_path):
    args = ["--unconditional", "--top-m", "0.1"]
    assert sample_cli(release["run"], release["db"], tmp_path, *args, n=6) == 0
    _, kwargs, cond = captured["cond"][-1]
    assert kwargs["top_m_rounding"] == "floor"
    picks = np.array(cond.query_rows)  # x̃ ~ uniform over nn_memory[:5] (ceil: [:6])
    assert set(picks.tolist()) <= set(release_top_m(0.1).tolist())
    emb = release_embeddings()
    nns = release_search(emb[picks].astype(np.float32), K)  # search_batched(q / |q|, k_nn)
    np.testing.assert_array_equal(np.array(cond.rows), nns)
    np.testing.assert_array_equal(cond.context, emb[nns].astype(np.float32))  # stored, as fed
    # a run of rdm keeps rdm's rounding unless asked
    plain = tmp_path / "plain"
    shutil.copytree(release["run"], plain)
    (plain / "official.json").unlink()
    assert sample_cli(plain, release["db"], tmp_path / "p", *args, n=1) == 0
    assert captured["cond"][-1][1]["top_m_rounding"] == "ceil"
    assert sample_cli(plain, release["db"], tmp_path / "q", *args, "--top-m-rounding", "floor") == 0
    assert captured["cond"][-1][1]["top_m_rounding"] == "floor"


def test_the_reference_context_gives_the_reference_eps_through_the_imported_pair(release):
    """reference.safetensors: the release's context for DB rows nn_ids, fed to the EMA UNet."""
    from safetensors.torch import load_file

    from rdm.checkpoint import load_run

    ref = load_file(str(FIXTURE / "reference.safetensors"))
    context = Database.open(release["db"]).vectors(ref["nn_ids"].numpy())  # (2, 4, 16)
    np.testing.assert_array_equal(context, ref["context"].numpy())
    model, _ = load_run(release["run"])
    with torch.no_grad():
        eps = model(ref["x_t"], ref["t"], torch.from_numpy(context))
    assert float((eps - ref["eps_ema"]).abs().max()) <= 1e-4


# --- the release's sampler defaults, guidance and rdm's samplers ------------------------------------


def test_release_defaults_ddim_100_eta_0_guidance_2_against_zero_context(
    release, captured, tmp_path, monkeypatch
):
    import rdm.sampling

    # the defaults are checked without running 100 steps: the sampler returns x_T
    monkeypatch.setattr(rdm.sampling, "get_sampler", lambda name: lambda d, x, *a, **kw: x)
    args = ["--unconditional", "--top-m", "0.5"]
    assert sample_cli(release["run"], release["db"], tmp_path, *args, n=1, steps=()) == 0
    assert captured["sample"] == [{"sampler": "ddim", "steps": 100, "eta": 0.0}]
    (g,) = captured["guided"]
    assert g["scale"] == 2.0 and g["null"] is None  # None: the model's own ∅ ...
    null = g["model"].null_context(3)
    assert torch.equal(null, torch.zeros(3, K, 16))  # ... the release's all-zero (B, k, d)


def test_guided_denoiser_is_the_releases_cfg_with_zeros(release):
    """p_sample_ddim: e = e_u + s (e_c − e_u), e_u from the all-zero context."""
    from safetensors.torch import load_file

    from rdm.checkpoint import load_run
    from rdm.sampling import guided

    ref = load_file(str(FIXTURE / "reference.safetensors"))
    model, _ = load_run(release["run"])
    x, t, ctx = ref["x_t"][:1], ref["t"][1], ref["context"][:1]
    with torch.no_grad():
        got = guided(model, ctx, None, 2.0)(x, t)
        e_c = model.unet(x, t, encoder_hidden_states=ctx).sample
        e_u = model.unet(x, t, encoder_hidden_states=torch.zeros(1, K, 16)).sample
        text_only = guided(model, ctx[:, :1], None, 2.0)(x, t)  # a (1, d) context: 1 zero token
        e_c1 = model.unet(x, t, encoder_hidden_states=ctx[:, :1]).sample
        e_u1 = model.unet(x, t, encoder_hidden_states=torch.zeros(1, 1, 16)).sample
    torch.testing.assert_close(got, e_u + 2.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    # zero keys and values (to_k / to_v have no bias): any number of zero tokens is the same ∅
    torch.testing.assert_close(e_u1, e_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_only, e_u1 + 2.0 * (e_c1 - e_u1), rtol=1e-5, atol=1e-5)


def test_dpm_solver_pp_on_the_imported_model_is_the_guided_ode_solution(
    release, tmp_path, captured
):
    from rdm.checkpoint import load_run
    from rdm.model import decode, load_vae
    from rdm.sampling import default_timesteps, dpm_solver_pp, initial_noise, to_uint8

    args = ["--unconditional", "--top-m", "0.5", "--sampler", "dpm++", "--seed", "5"]
    assert (
        sample_cli(release["run"], release["db"], tmp_path, *args, n=1, steps=("--steps", "4")) == 0
    )
    assert captured["sample"][-1] == {"sampler": "dpm++", "steps": 4, "eta": 0.0}
    steps = 4
    cond = captured["cond"][-1][2]
    model, cfg = load_run(release["run"])
    x_T, _ = initial_noise([5], (3, 8, 8))
    ctx = torch.from_numpy(cond.context)

    def by_hand(x, t):  # the release's guidance: e_u(zeros) + 2 (e_c − e_u)
        e_c = model.unet(x, t, encoder_hidden_states=ctx).sample
        e_u = model.unet(x, t, encoder_hidden_states=torch.zeros_like(ctx)).sample
        return e_u + 2.0 * (e_c - e_u)

    with torch.no_grad():
        ts = default_timesteps("dpm++", cfg.diffusion, steps)
        x0 = dpm_solver_pp(by_hand, x_T, cfg.diffusion, ts)
        pixels = to_uint8(decode(load_vae(cfg.model), x0, cfg.model))[0]
    written = np.asarray(Image.open(tmp_path / "sample-00005.png"))
    assert np.abs(written.astype(int) - pixels.astype(int)).max() <= 1  # float ties in rounding


# --- without the release's CLIP weights -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "image"])
def test_text_and_image_queries_ask_for_the_clip_weights(release, tmp_path, capsys, mode):
    query = ["--text", "a dog"] if mode == "text" else ["--image", str(tmp_path / "q.png")]
    Image.new("RGB", (8, 8)).save(tmp_path / "q.png")
    assert sample_cli(release["run"], release["db"], tmp_path / "out", *query) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "rdm encoder convert-openai" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--unconditional", "--omit-query"], "--omit-query applies to --image and --text"),
        (["--text", "x", "--omit-query", "--text-mode", "text"], "--text-mode text keeps it"),
        (["--image", "q.png", "--omit-query", "--include-query"], "contradict each other"),
    ],
)
def test_omit_query_conflicts_are_refused(release, tmp_path, capsys, extra, message):
    assert sample_cli(release["run"], release["db"], tmp_path / "o", *extra) == 2
    assert message in capsys.readouterr().err
