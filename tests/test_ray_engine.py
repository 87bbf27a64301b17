"""The Ray engine (rdm.engines.ray) against the local engine, on a local 2-CPU Ray cluster.

A database built from a folder on Ray, with one worker killed mid-shard, equals the local build
bit for bit (shards, metadata, index, skipped list, manifest), as does one built from webdataset
tar shards; a unit that fails stops the run
with its own error and the rerun resumes without recomputing the finished shards; neighbours
via Ray are the local file's bytes. The cluster and the two encoder actors are started once for
the module (ray.init costs ~15 s on the loaded 2-core machine)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import warnings

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder
from PIL import Image

ray = pytest.importorskip(
    "ray", reason="the Ray engine's tests need Ray: pip install 'rdm[ray]' (.ci/run installs it)"
)

from rdm.data import SourceError  # noqa: E402
from rdm.data.folder import FolderSource  # noqa: E402
from rdm.data.webdataset import WebDatasetSource  # noqa: E402
from rdm.database import Database  # noqa: E402
from rdm.db_build import build_database  # noqa: E402
from rdm.engines import EngineError, import_ray  # noqa: E402
from rdm.engines.ray import RayEngine  # noqa: E402
from rdm.neighbors import compute_neighbors  # noqa: E402

N_IMAGES = 40
BAD = 13  # an unreadable file: skipped, never shifts ids
BUILD = {"batch_size": 4, "shard_size": 8, "progress": False}  # 5 shards of 8 ids, 2 batches each
NEIGHBORS = {"k": 4, "k_p": 2, "exclude_threshold": 0.95, "batch_size": 4, "progress": False}


class RigFolder(FolderSource):
    """The folder source, spec and all, with faults for the workers: the first load of
    ``kill_at`` ends the worker's process (``os._exit``, as a kill or an OOM would), the first
    load of ``fail_at`` raises a SourceError; "first" is decided by creating ``marker`` (once
    across all processes). Every load appends its id to ``log`` when given."""

    def __init__(self, root, marker, kill_at=None, fail_at=None, log=None):
        super().__init__(root)
        self.marker, self.kill_at, self.fail_at, self.log = str(marker), kill_at, fail_at, log

    def load(self, i: int):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{i}\n")
        if i in (self.kill_at, self.fail_at) and self._first():
            if i == self.kill_at:
                os._exit(1)
            raise SourceError(f"simulated failure reading item {i}")
        return super().load(i)

    def _first(self) -> bool:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        name = root / f"{i:03d}.png"
        if i == BAD:
            name.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(name)
            (root / f"{i:03d}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def local_db(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "db"
    return build_database(FolderSource(folder), "all", ProjectionEncoder(), out, **BUILD)


@pytest.fixture(scope="module")
def engine():
    # the workers unpickle the test's source and encoder classes by value (tests/ is not a
    # package they could import)
    for module in (sys.modules[__name__], sys.modules["fakes_retrieval"]):
        ray.cloudpickle.register_pickle_by_value(module)
    # the workers run at the test's priority, not Ray's default of 15 nice steps below it
    niceness = os.environ.setdefault("RAY_worker_niceness", "0")
    with warnings.catch_warnings():  # Ray's notice about a future GPU-visibility default
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    if niceness == "0":
        del os.environ["RAY_worker_niceness"]  # read once, by the raylet ray.init started
    try:
        with RayEngine(ProjectionEncoder, workers=2) as eng:
            yield eng
    finally:
        ray.shutdown()


def database_files(root) -> dict[str, bytes]:
    """Every file of a database, the manifest without its creation time."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def test_a_killed_worker_is_replaced_and_the_build_equals_the_local_one(
    engine, folder, local_db, tmp_path
):
    marker = tmp_path / "killed"
    source = RigFolder(folder, marker, kill_at=21)  # shard 2 (ids 16..23), its second batch
    out = engine.build_database(source, "all", ProjectionEncoder(), tmp_path / "db", **BUILD)
    assert marker.exists()  # a worker did die mid-shard
    want, got = database_files(local_db), database_files(out)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []  # every byte the same
    db = Database.open(out)
    assert db.count == N_IMAGES - 1 and BAD not in db.ids.tolist()


def test_a_webdataset_build_on_ray_equals_the_local_one(engine, tmp_path):
    """Tar shards (img2dataset layout; sparse ids shard x 10^6 + position, a corrupt member
    skipped) pickle to the workers, which read the members themselves."""
    rng = np.random.default_rng(1)
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for j in range(11):
                key = f"{shard:05d}{j:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
                data = b"garbage" if (shard, j) == (1, 3) else buf.getvalue()
                for name, payload in ((f"{key}.png", data), (f"{key}.txt", f"p {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    spec = str(tmp_path / "{00000..00001}.tar")
    local = build_database(
        WebDatasetSource(spec, cache_dir=None), "all", ProjectionEncoder(), tmp_path / "l", **BUILD
    )
    source = WebDatasetSource(spec, cache_dir=None)
    out = engine.build_database(source, "all", ProjectionEncoder(), tmp_path / "r", **BUILD)
    want, got = database_files(local), database_files(out)
    assert sorted(got) == sorted(want) and [n for n in want if got[n] != want[n]] == []
    db = Database.open(out)
    assert db.count == 21 and 1_000_003 not in db.ids.tolist() and db.keys[0] == "00000/000000000"


def test_a_failed_unit_stops_with_its_error_and_the_rerun_resumes(
    engine, folder, local_db, tmp_path
):
    out = tmp_path / "db"
    failing = RigFolder(folder, tmp_path / "failed", fail_at=12)  # shard 1
    with pytest.raises(SourceError, match="simulated failure reading item 12"):
        engine.build_database(failing, "all", ProjectionEncoder(), out, **BUILD)
    done = sorted(int(p.stem.split("-")[1]) for p in (out / "_build").glob("shard-*.json"))
    assert 1 not in done and len(done) < 5 and not (out / "manifest.json").exists()

    log = tmp_path / "loads.txt"
    logged = RigFolder(folder, tmp_path / "failed", log=log)
    engine.build_database(logged, "all", ProjectionEncoder(), out, **BUILD)
    loaded = sorted(map(int, log.read_text().split()))
    assert loaded == [i for i in range(N_IMAGES) if i // 8 not in done]  # finished shards kept
    want, got = database_files(local_db), database_files(out)
    assert [name for name in want if got.get(name) != want[name]] == []


def test_neighbors_via_ray_are_the_local_bytes(engine, folder, local_db, tmp_path):
    db, source = Database.open(local_db), FolderSource(folder)
    local = compute_neighbors(
        db, source, "train", ProjectionEncoder(), out=tmp_path / "local.safetensors", **NEIGHBORS
    )
    via_ray = engine.compute_neighbors(
        db,
        source,
        "train",
        ProjectionEncoder(),
        out=tmp_path / "ray.safetensors",
        block_size=8,  # a multiple of the batch size: the same encoder batches as one block
        **NEIGHBORS,
    )
    assert via_ray.read_bytes() == local.read_bytes()  # 3 blocks on 2 workers vs one block
    assert not (tmp_path / "ray.safetensors.partial").exists()


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(EngineError, match=r"pip install 'rdm\[ray\]'"):
        import_ray()


def test_ray_flags_without_the_ray_engine_are_refused(folder, tmp_path, capsys):
    from rdm.cli import main

    argv = ["db", "build", str(folder), "--out", str(tmp_path / "db"), "--no-progress"]
    assert main([*argv, "--address", "auto"]) == 2
    assert "--address applies to --engine ray only" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
