"""Importing the CompVis RDM release's database (``.npz`` parts, ``nn_memory``) and precomputed
``.npy`` + parquet embeddings, on the fixture made by the official code
(../shared/fixtures/compvis-rdm, see its EXPECTED.md §6) and on small synthetic files."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rdm import conditioning as C
from rdm import index as faiss_index
from rdm.cli import main
from rdm.database import Database, verify
from rdm.db_build import build_and_save_index
from rdm.encoders import identity_fingerprint, release_identity
from rdm.errors import RdmError
from rdm.neighbors import load_neighbors
from rdm.official import db_import
from rdm.official.db_import import DbImportError, import_database, import_nn_memory
from rdm.pseudo_query import candidates

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "compvis-rdm"
DB = FIXTURE / "db"
PARTS = [DB / "40x16-part_1.npz", DB / "40x16-part_2.npz"]
NN_MEMORY = DB / "nn_memory.p"

pytestmark = pytest.mark.skipif(not DB.is_dir(), reason=f"fixture {FIXTURE} is not here")


def fixture_arrays() -> dict[str, np.ndarray]:
    """The parts in part-number order, read with numpy (the reference)."""
    parts = [np.load(p) for p in PARTS]
    return {
        k: np.concatenate([p[k] for p in parts]) for k in ("embedding", "img_id", "patch_coords")
    }


def reference_nn_memory() -> dict:
    with open(NN_MEMORY, "rb") as f:  # the fixture is trusted: plain pickle as the reference
        return pickle.load(f)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The fixture's parts given in glob order (part_2 first, as the official loader saw them)."""
    out = tmp_path_factory.mktemp("official") / "db"
    return import_database(PARTS[::-1], out, nn_memory=NN_MEMORY, progress=False)


# ---- the fixture --------------------------------------------------------------------------------


def test_parts_import_exactly_in_part_number_order(imported):
    db = Database.open(imported)
    ref = fixture_arrays()
    assert db.count == 80 and db.dim == 16
    assert db.embeddings.dtype == np.float16
    np.testing.assert_array_equal(db.embeddings, ref["embedding"])  # bit-exact, not renormalised
    table = db.metadata
    np.testing.assert_array_equal(table.column("img_id").to_numpy(), ref["img_id"])
    coords = np.array(table.column("patch_coords").to_pylist())
    np.testing.assert_array_equal(coords, ref["patch_coords"])
    np.testing.assert_array_equal(db.ids, np.arange(80))
    assert db.keys[40] == "40x16-part_2:0"
    m = db.manifest
    assert [p["file"] for p in m["import"]["parts"]] == ["40x16-part_1.npz", "40x16-part_2.npz"]
    assert m["import"]["order"] == "number" and m["unit_norm"] is False
    assert verify(imported) == []
    assert "rdm db import" in db.rebuild_hint() and "part_1.npz" in db.rebuild_hint()


def test_the_reference_context_is_the_stored_rows_as_the_release_fed_them(imported):
    from safetensors.torch import load_file as load_torch

    ref = load_torch(str(FIXTURE / "reference.safetensors"))
    nn_ids = ref["nn_ids"].numpy()  # (2, 4) rows in part-number order
    context = Database.open(imported).vectors(nn_ids)  # (2, 4, 16) float32
    np.testing.assert_array_equal(context, ref["context"].numpy())


def test_without_encoder_the_release_identity_is_recorded(imported):
    db = Database.open(imported)
    assert db.identity == release_identity(16)
    assert identity_fingerprint(db.identity) == identity_fingerprint(release_identity(16))


def test_order_given_keeps_the_command_line_order(tmp_path):
    out = import_database(PARTS[::-1], tmp_path / "db", order="given", progress=False)
    db = Database.open(out)
    np.testing.assert_array_equal(db.embeddings[:40], np.load(PARTS[1])["embedding"])
    assert db.manifest["import"]["order"] == "given"
    assert (
        db.fingerprint
        != Database.open(import_database(PARTS, tmp_path / "db2", progress=False)).fingerprint
    )  # other rows under the same ids: another database


def test_search_is_cosine_over_the_unnormalised_vectors(imported):
    db = Database.open(imported)
    xb = db.embeddings.astype(np.float32)
    unit = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    xq = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    D, I = db.search(xq, 5)  # noqa: E741 (FAISS's names)
    q = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    exact = q @ unit.T  # (20, 80) cosines
    kth = np.sort(exact, axis=1)[:, -5]
    assert (np.take_along_axis(exact, I, 1) >= kth[:, None] - 1e-5).all()  # ties tolerated
    np.testing.assert_allclose(D, np.take_along_axis(exact, I, 1), atol=1e-5)
    # inner products with the stored vectors would rank differently (the norms are ~3..6)
    assert (np.argsort(-(q @ xb.T), axis=1)[:, :5] != I).any()


def test_an_approximate_index_short_answer_falls_back_to_exact_cosine(imported, monkeypatch):
    db = Database.open(imported)
    real = faiss_index.search

    def short(index, xq, k):  # FAISS pads an answer it cannot fill with row -1
        D, I = real(index, xq, k)  # noqa: E741
        I[0, -1], D[0, -1] = -1, -3.4e38
        return D, I

    monkeypatch.setattr(faiss_index, "search", short)
    xq = db.vectors([7, 30])
    D, I = db.search(xq, 4)  # noqa: E741
    unit = db.embeddings.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    expected = np.argsort(-(unit[[7, 30]] @ unit.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(I, expected)
    assert I[0, 0] == 7 and D[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_unit_rows_reads_any_rows_of_several_parts_normalised():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, 6)).astype(np.float16) * 5 for n in (7, 5))
    view = faiss_index.UnitRows([a, b])
    full = np.concatenate([a, b]).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    assert view.shape == (12, 6) and len(view) == 12
    np.testing.assert_allclose(view[3:10], full[3:10], rtol=1e-6)
    np.testing.assert_allclose(view[np.array([11, 0, 6, 7])], full[[11, 0, 6, 7]], rtol=1e-6)


def test_an_approximate_index_over_unit_rows_answers_cosine(tmp_path):
    rng = np.random.default_rng(2)
    parts = [(rng.standard_normal((300, 8)) * rng.uniform(1, 9, (300, 1))).astype(np.float16)
             for _ in range(2)]  # fmt: skip
    budget = 600 * 8 * 4 - 1  # below a flat index: IVF-PQ with float16 re-ranking
    info = build_and_save_index(tmp_path, faiss_index.UnitRows(parts), budget, progress=False)
    assert info["type"] == "ivfpq" and info["recall_at_k"] >= 0.95
    index = faiss_index.load_index(
        tmp_path / "index.faiss", faiss_index.IndexSpec("ivfpq", info["params"])
    )
    full = np.concatenate(parts).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    xq = rng.standard_normal((50, 8)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    _, I = faiss_index.search(index, xq, 4)  # noqa: E741
    cos = xq @ full.T
    kth = np.sort(cos, axis=1)[:, -4]
    recall = (np.take_along_axis(cos, I, 1) >= kth[:, None] - 1e-3).mean()
    assert recall >= 0.9  # against brute-force cosine, not inner products with the raw rows


def test_parts_are_streamed_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(db_import, "READ_ROWS", 7)  # 40 rows: blocks of 7, the last of 5
    out = import_database(PARTS, tmp_path / "db", progress=False)
    np.testing.assert_array_equal(Database.open(out).embeddings, fixture_arrays()["embedding"])


def test_memory_holds_one_block_not_the_parts(tmp_path, monkeypatch):
    import tracemalloc

    rng = np.random.default_rng(3)
    rows, d = 16000, 256  # a part's float16 embeddings: 8 MB
    for n in (1, 2, 3):
        emb = rng.standard_normal((rows, d)).astype(np.float16)
        np.savez(tmp_path / f"{rows}x{d}-part_{n}.npz", embedding=emb, img_id=np.arange(rows))
    import_database(PARTS[:1], tmp_path / "warm", progress=False)  # imports done: not counted
    peak = {}

    def measured(out, xb, budget, progress):  # the parts phase ends where the index starts
        peak["bytes"] = tracemalloc.get_traced_memory()[1]
        return real(out, xb, budget, progress)

    real = db_import.build_and_save_index
    monkeypatch.setattr(db_import, "build_and_save_index", measured)
    monkeypatch.setattr(db_import, "READ_ROWS", 500)
    tracemalloc.start()
    try:
        import_database(sorted(tmp_path.glob("*.npz")), tmp_path / "db", progress=False)
    finally:
        tracemalloc.stop()
    # one block (256 KB, its float32 norms) and a 1 MB hashing buffer, not a part (8 MB)
    assert peak["bytes"] < rows * d * 2 / 3, peak


def test_rerun_does_nothing_and_other_inputs_are_refused(imported, capsys):
    before = (imported / "manifest.json").read_text()
    import_database(PARTS, imported, nn_memory=NN_MEMORY, progress=False)
    assert "nothing to do" in capsys.readouterr().err
    assert (imported / "manifest.json").read_text() == before
    with pytest.raises(DbImportError, match="already holds a database made from other inputs"):
        import_database(PARTS[:1], imported, progress=False)


def test_a_killed_import_resumes_with_the_parts_done(tmp_path, monkeypatch):
    real = db_import._import_part
    calls = []

    def dies_on_the_second(out, i, *args):
        calls.append(i)
        if i == 1:
            raise KeyboardInterrupt
        return real(out, i, *args)

    monkeypatch.setattr(db_import, "_import_part", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        import_database(PARTS, tmp_path / "db", progress=False)
    assert not (tmp_path / "db" / "manifest.json").exists()
    monkeypatch.setattr(
        db_import, "_import_part", lambda out, i, *a: (calls.append(i), real(out, i, *a))
    )
    out = import_database(PARTS, tmp_path / "db", progress=False)
    assert calls == [0, 1, 1]  # part 0 was not redone
    np.testing.assert_array_equal(Database.open(out).embeddings, fixture_arrays()["embedding"])
    assert not (out / "_build").exists()


# ---- nn_memory ----------------------------------------------------------------------------------


def test_nn_memory_becomes_the_pseudo_query_distribution(imported):
    ref = reference_nn_memory()
    nn = load_neighbors(imported / "neighbors-train.safetensors")
    nn.require_database(Database.open(imported))
    expected = np.zeros(80, np.int64)
    for i, count in ref["id_count"].items():
        expected[i] = count
    np.testing.assert_array_equal(nn.pq_counts, expected)
    np.testing.assert_allclose(nn.pq_prob, expected / 96)
    ranked = load_file(str(imported / "neighbors-train.safetensors"))["pq_ranked_rows"]
    np.testing.assert_array_equal(ranked, ref["nn_memory"])
    assert nn.meta["imported"]["ranking_agrees"] is True


def test_top_m_draws_from_the_releases_top_m_with_its_weights(imported):
    """The release's get_qids: uniform (or ∝ id_count) over nn_memory[:M]."""
    ref = reference_nn_memory()
    nn = load_neighbors(imported / "neighbors-train.safetensors")
    order, _ = candidates(nn.pq_prob, top_m=1.0)
    np.testing.assert_array_equal(order, ref["nn_memory"])  # so every top-M set is the release's
    rows, weights = candidates(nn.pq_prob, top_m=8 / 55, weighted=True)
    np.testing.assert_array_equal(rows, ref["nn_memory"][:8])
    freqs = np.array([ref["id_count"][int(i)] for i in rows])
    np.testing.assert_allclose(weights, freqs / freqs.sum())

    db = Database.open(imported)
    cond = C.pseudo_query_context(db, 4, 16, prob=nn.pq_prob, top_m=8 / 55, seed=0)
    assert set(cond.query_rows) <= set(ref["nn_memory"][:8].tolist())
    first = np.array([r[0] for r in cond.rows])
    np.testing.assert_array_equal(first, cond.query_rows)  # x̃ retrieves itself first
    np.testing.assert_array_equal(
        cond.context, db.embeddings[np.array(cond.rows)].astype(np.float32)
    )


def test_nn_memory_ids_beyond_the_database_are_refused_naming_the_file(tmp_path):
    out = import_database(PARTS[:1], tmp_path / "db", progress=False)  # 40 rows
    with pytest.raises(DbImportError, match="nn_memory .*nn_memory.p.*outside 0..39.*40 rows"):
        import_nn_memory(NN_MEMORY, out)
    assert not (out / "neighbors-train.safetensors").exists()


def test_an_nn_memory_with_a_disallowed_global_is_refused_and_never_runs(imported, tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "nn_memory.p"
    payload.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DbImportError, match=f"{payload}.*outside the allowlist.*os.system"):
        import_nn_memory(payload, imported)
    assert not marker.exists()


def test_an_nn_memory_of_another_shape_is_refused(imported, tmp_path):
    odd = tmp_path / "odd.p"
    odd.write_bytes(pickle.dumps({"nn_memory": [1, 2]}))
    with pytest.raises(DbImportError, match=f"{odd} is not the release's nn_memory"):
        import_nn_memory(odd, imported)


def test_nn_memory_needs_an_imported_database(tmp_path):
    db = Database(tmp_path, {"count": 80, "fingerprint": "x"})  # built by rdm: no "import"
    with pytest.raises(DbImportError, match="built by rdm; import the release's parts first"):
        import_nn_memory(NN_MEMORY, db)


# ---- bad parts ----------------------------------------------------------------------------------


def test_parts_of_different_dimensions_are_refused_naming_both(tmp_path):
    other = tmp_path / "40x8-part_2.npz"
    np.savez_compressed(other, embedding=np.zeros((40, 8), np.float16), img_id=np.arange(40),
                        patch_coords=np.zeros((40, 4), np.int64))  # fmt: skip
    with pytest.raises(
        DbImportError, match=f"{other} holds vectors of d=8 but .*part_1.npz of d=16"
    ):
        import_database([PARTS[0], other], tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_a_truncated_part_is_refused_naming_it(tmp_path):
    cut = tmp_path / "40x16-part_2.npz"
    cut.write_bytes(PARTS[1].read_bytes()[:1500])
    with pytest.raises(DbImportError, match=f"{cut} cannot be read.*truncated"):
        import_database([PARTS[0], cut], tmp_path / "db", progress=False)


def test_an_embedding_member_shorter_than_its_header_is_refused(tmp_path):
    from numpy.lib import format as npy

    bad = tmp_path / "50x16-part_1.npz"
    with zipfile.ZipFile(bad, "w") as z, z.open("embedding.npy", "w") as f:
        npy.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (50, 16)})
        f.write(np.zeros((40, 16), np.float16).tobytes())  # 10 rows short
    with pytest.raises(
        DbImportError, match=f"{bad}: 'embedding' ends after 0 of 50 rows.*truncated"
    ):
        import_database([bad], tmp_path / "db", progress=False)


def test_a_missing_part_is_refused(tmp_path):
    third = tmp_path / "40x16-part_3.npz"
    shutil.copy(PARTS[1], third)
    with pytest.raises(DbImportError, match="part 2 is missing"):
        import_database([PARTS[0], third], tmp_path / "db", progress=False)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"img_id": np.arange(40)}, "no 'embedding' array.*img_id"),
        (
            {"embedding": np.zeros((40, 16), np.float16), "img_id": np.arange(39)},
            "'img_id' has shape",
        ),
        ({"embedding": np.zeros((40, 12), np.float16)}, "named for d=16 but holds vectors of d=12"),
    ],
)
def test_malformed_parts_are_refused(tmp_path, arrays, message):
    bad = tmp_path / "40x16-part_1.npz"
    np.savez(bad, **arrays)
    with pytest.raises(DbImportError, match=message):
        import_database([bad], tmp_path / "db", progress=False)


# ---- the CLI and the pairing with an imported model ---------------------------------------------


def test_cli_import_and_errors(tmp_path, capsys):
    out = tmp_path / "db"
    args = ["db", "import", *map(str, PARTS), "--out", str(out), "--no-progress"]
    assert main(args + ["--nn-memory", str(NN_MEMORY)]) == 0
    assert (out / "neighbors-train.safetensors").is_file()
    assert main(["db", "verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["db", "import", str(PARTS[1]), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rdm db: error:" in err and "part 1 is missing" in err and "Traceback" not in err


def test_text_queries_ask_for_the_clip_weights(imported, capsys):
    assert main(["db", "query", str(imported), "--text", "a dog"]) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "rdm encoder convert-openai" in err
    assert "#preprocess=release" in err


def test_an_imported_run_and_database_sample_unconditionally_without_clip(imported, tmp_path):
    """A run recording the release identity (as rdm import checkpoint writes it) pairs with the
    imported database; p(x̃) comes from the imported nn_memory by default."""
    from rdm.checkpoint import save_weights
    from rdm.config import preset
    from rdm.model import RetrievalUNet
    from rdm.pipeline import RDMPipeline

    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, context_dim=16, k=4)
    cfg.encoder = release_identity(16)
    run = tmp_path / "run"
    run.mkdir()
    cfg.to_json(run / "config.json")
    save_weights(RetrievalUNet(cfg.model), run / "ema.safetensors")
    pipe = RDMPipeline.from_pretrained(run, imported)
    ref = reference_nn_memory()
    expected = np.zeros(80)
    expected[list(ref["id_count"])] = list(ref["id_count"].values())
    np.testing.assert_allclose(pipe.pseudo_query_prob, expected / expected.sum())
    with pytest.raises(RdmError, match="not available offline.*convert-openai"):
        pipe.encoder  # noqa: B018 (text / image queries need the CLIP weights)


def test_the_imported_release_checkpoint_samples_from_the_imported_database(
    imported, tmp_path, capsys
):
    """rdm import checkpoint (the fixture's model.ckpt) + rdm db import: rdm sample pairs them."""
    run, samples = tmp_path / "run", tmp_path / "samples"
    ckpt = ["import", "checkpoint", str(FIXTURE / "model.ckpt"), "--config"]
    assert main(ckpt + [str(FIXTURE / "config.yaml"), "--out", str(run)]) == 0
    args = ["sample", str(run), "--db", str(imported), "--unconditional", "--top-m", "0.2"]
    assert main(args + ["-n", "2", "--steps", "2", "--out", str(samples)]) == 0, capsys.readouterr()
    assert len(list(samples.glob("sample-*.png"))) == 2


# ---- .npy + parquet (the clip-retrieval layout) ---------------------------------------------------


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def clip_retrieval_folder(root: Path, sizes: list[int], d: int = 32) -> Path:
    """embeddings/img_emb/img_emb_{i}.npy float16 unit rows + metadata/metadata_{i}.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", unit_rows(n, d, seed=i))
        table = pa.table(
            {
                "image_path": [f"/images/{i}/{j}.jpg" for j in range(n)],
                "caption": [f"picture {j} of file {i}" for j in range(n)],
                "width": list(range(n)),
            }
        )
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
    return root


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from test_db_cli import tiny_encoder_dir

    from rdm.encoders import load_encoder

    return load_encoder(str(tiny_encoder_dir(tmp_path_factory.mktemp("enc") / "tiny", seed=0)))


def test_clip_retrieval_embeddings_import_with_their_metadata(tmp_path, tiny_encoder):
    sizes = [3] * 11 + [2]  # img_emb_10 and _11 come after img_emb_2
    folder = clip_retrieval_folder(tmp_path / "embeddings", sizes, d=tiny_encoder.dim)
    out = import_database([folder], tmp_path / "db", encoder=tiny_encoder, progress=False)
    db = Database.open(out)
    expected = np.concatenate([unit_rows(n, tiny_encoder.dim, seed=i) for i, n in enumerate(sizes)])
    np.testing.assert_array_equal(db.embeddings, expected)
    assert db.count == 35 and db.unit_norm is True and verify(out) == []
    assert db.keys[33] == "/images/11/0.jpg" and db.captions[30] == "picture 0 of file 10"
    assert db.metadata.column("width").to_pylist()[:4] == [0, 1, 2, 0]
    assert db.identity == tiny_encoder.identity
    assert [p["file"] for p in db.manifest["import"]["parts"]][-3:] == [
        "img_emb_9.npy", "img_emb_10.npy", "img_emb_11.npy",
    ]  # fmt: skip
    D, I = db.search(tiny_encoder.encode_texts(["a red square"]), 3)  # noqa: E741
    assert I.shape == (1, 3)


def test_npy_embeddings_need_their_encoder_and_matching_metadata(tmp_path, tiny_encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = tmp_path / "vectors.npy"
    np.save(emb, unit_rows(5, tiny_encoder.dim, seed=0).astype(np.float32))
    with pytest.raises(DbImportError, match=f"{emb}: .npy embeddings do not say which encoder"):
        import_database([emb], tmp_path / "db", progress=False)
    with pytest.raises(DbImportError, match="d=32 but the encoder .* makes d=16"):
        import_database([emb], tmp_path / "db", encoder={**tiny_encoder.identity, "dim": 16})
    pq.write_table(pa.table({"caption": ["a"] * 4}), tmp_path / "vectors.parquet")
    with pytest.raises(DbImportError, match="vectors.parquet has 4 rows but .*vectors.npy has 5"):
        import_database([emb], tmp_path / "db", encoder=tiny_encoder, progress=False)


def test_cli_imports_npy_embeddings_with_an_encoder_spec(tmp_path, tiny_encoder, capsys):
    emb = tmp_path / "vectors.npy"
    np.save(emb, unit_rows(6, tiny_encoder.dim, seed=4))
    spec = tiny_encoder.identity["spec"]
    out = tmp_path / "db"
    assert (
        main(["db", "import", str(emb), "--encoder", spec, "--out", str(out), "--no-progress"]) == 0
    )
    db = Database.open(out)
    assert db.keys[0] == "vectors:0" and db.identity["spec"] == spec
    assert db.manifest["import"]["argv"][-2:] == ["--encoder", spec]
