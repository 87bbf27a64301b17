"""Webdataset tar shards (img2dataset layout) as a source: brace specs, stable sparse ids, captions
from .txt / .json / .parquet, corrupt members skipped with the shard and member named, header-only
opening with an on-disk index cache, fork / pickle safety, and `rdm db build` on shards giving
the same rows and vectors as a folder of the same image files."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from rdm.data import BadImage, SourceError, open_source
from rdm.data import webdataset as wds
from rdm.data.webdataset import STRIDE, WebDatasetSource, expand_braces

N_PER_SHARD = 8
GARBAGE = b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4


def image_bytes(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_shards(root, folder=None) -> dict:
    """Three img2dataset-style shards and, optionally, a folder holding the same image files.

    00000.tar: PNG + .txt caption (+ a .json with another caption: .txt wins)
    00001.tar: JPEG + .json caption; member 2 is garbage bytes, member 5 has no image (only .txt)
    00002.tar: PNG, captions only in 00002.parquet (member 7 has none)
    Returns {key: caption} of every sample and the keys of the bad ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    captions, bad = {}, {}
    for shard in range(3):
        members, parquet = [], {"key": [], "caption": []}
        for j in range(N_PER_SHARD):
            key = f"{shard:05d}{j:04d}"  # img2dataset: shard number + position
            ext, fmt = ("jpg", "JPEG") if shard == 1 else ("png", "PNG")
            data = image_bytes(shard * 100 + j, fmt)
            caption = f"picture {shard}-{j}"
            if shard == 1 and j == 2:
                data, bad[f"{shard:05d}/{key}"] = GARBAGE, "corrupt"
            if shard == 1 and j == 5:
                members.append((f"{key}.txt", caption.encode()))
                captions[f"{shard:05d}/{key}"], bad[f"{shard:05d}/{key}"] = caption, "no image"
                continue
            members.append((f"{key}.{ext}", data))
            if shard == 0:
                members.append((f"{key}.txt", f"  {caption}\n".encode()))
                members.append((f"{key}.json", json.dumps({"caption": "not this"}).encode()))
            elif shard == 1:
                members.append((f"{key}.json", json.dumps({"caption": caption}).encode()))
            elif j != 7:
                parquet["key"].append(key)
                parquet["caption"].append(caption)
            captions[f"{shard:05d}/{key}"] = caption if (shard, j) != (2, 7) else ""
            if folder is not None:
                (folder / f"{shard:05d}").mkdir(parents=True, exist_ok=True)
                (folder / f"{shard:05d}" / f"{key}.{ext}").write_bytes(data)
                if captions[f"{shard:05d}/{key}"]:
                    (folder / f"{shard:05d}" / f"{key}.txt").write_text(caption)
        write_tar(root / f"{shard:05d}.tar", members)
        if shard == 2:
            pq.write_table(pa.table(parquet), root / f"{shard:05d}.parquet")
    return {"captions": captions, "bad": bad}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    info = write_shards(root / "shards", folder=root / "folder")
    return {"root": root / "shards", "folder": root / "folder", **info}


def spec_of(shards) -> str:
    return str(shards["root"] / "{00000..00002}.tar")


def test_brace_expansion_keeps_zero_padding():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("x{y}.tar") == ["x{y}.tar"]


def test_ids_keys_and_captions_have_known_values(shards):
    src = open_source(spec_of(shards))
    assert isinstance(src, WebDatasetSource)
    ids = src.split_ids("all")
    # 8 + 8 (the image-less sample counts: it is a sample that fails to load) + 8
    expected = np.concatenate([n * STRIDE + np.arange(N_PER_SHARD) for n in range(3)])
    np.testing.assert_array_equal(ids, expected)
    assert len(src) == 24
    assert src.key(1_000_003) == "00001/000010003"
    assert {src.key(int(i)): src.caption(int(i)) for i in ids} == shards["captions"]
    assert src.caption(3) == "picture 0-3"  # .txt (stripped) wins over .json
    assert src.caption(1_000_004) == "picture 1-4"  # .json
    assert src.caption(2_000_001) == "picture 2-1" and src.caption(2_000_007) == ""  # parquet
    with pytest.raises(SourceError, match="not an id"):
        src.key(3_000_000)


def test_images_are_the_member_bytes(shards):
    src = open_source(spec_of(shards))
    for i, fmt, seed in ((4, "PNG", 4), (1_000_003, "JPEG", 103), (2_000_006, "PNG", 206)):
        want = np.asarray(Image.open(io.BytesIO(image_bytes(seed, fmt))).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(src.load(i)), want)


def test_splits_follow_sha1_of_shard_and_member_key(shards):
    src = open_source(spec_of(shards))

    def fraction(key: str) -> float:
        return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64

    ids = src.split_ids("all")
    db = [int(i) for i in ids if fraction(src.key(int(i))) < 0.3]
    np.testing.assert_array_equal(src.split_ids("db", 0.3), db)
    np.testing.assert_array_equal(src.split_ids("train", 0.3), sorted(set(ids.tolist()) - set(db)))
    assert len(src.split_ids("test")) == 0 and 0 < len(db) < len(ids)
    assert "1000000" in src.split_rule(0.3)  # the id rule is recorded with the split rule


def test_ids_do_not_depend_on_other_shards(shards, tmp_path):
    full = open_source(spec_of(shards))
    # a sub-range and a comma list in another order give the same ids for the same samples
    part = open_source(f"{shards['root']}/00002.tar,{shards['root']}/00001.tar")
    np.testing.assert_array_equal(part.split_ids("all"), full.split_ids("all")[N_PER_SHARD:])
    assert [part.key(int(i)) for i in part.split_ids("all")] == [
        full.key(int(i)) for i in part.split_ids("all")
    ]
    # non-numeric names: ids follow the sorted shard list, and stay put when one is appended
    (tmp_path / "s").mkdir()
    for name in ("b", "c"):
        (tmp_path / "s" / f"{name}.tar").write_bytes((shards["root"] / "00000.tar").read_bytes())
    before = open_source(f"{tmp_path}/s/{{b,c}}.tar")
    (tmp_path / "s" / "d.tar").write_bytes((shards["root"] / "00002.tar").read_bytes())
    after = open_source(str(tmp_path / "s"))  # a directory of shards
    ids = before.split_ids("all")
    np.testing.assert_array_equal(after.split_ids("all")[: len(ids)], ids)
    assert [after.key(int(i)) for i in ids] == [before.key(int(i)) for i in ids]
    assert after.key(2 * STRIDE) == "d/000020000"


def test_corrupt_members_fail_alone_and_name_shard_and_member(shards):
    src = open_source(spec_of(shards))
    with pytest.raises(BadImage, match=r"member 000010002\.jpg of .*00001\.tar"):
        src.load(1_000_002)
    with pytest.raises(BadImage, match=r"no image member .* key 000010005 in .*00001\.tar"):
        src.load(1_000_005)
    assert src.load(1_000_003).size == (32, 32)  # the neighbours keep their ids and load


def test_a_truncated_tar_keeps_the_samples_before_the_cut(shards, tmp_path):
    data = (shards["root"] / "00000.tar").read_bytes()
    src = WebDatasetSource(str(shards["root"] / "00000.tar"), cache_dir=None)
    rec = src._table(0)[5]
    cut = int(rec["image_offset"]) + 100  # inside sample 5's image
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    short = WebDatasetSource(str(tmp_path / "00000.tar"), cache_dir=None)
    assert len(short) == 6  # samples 0..5 have headers; 6 and 7 are gone
    np.testing.assert_array_equal(np.asarray(short.load(4)), np.asarray(src.load(4)))
    with pytest.raises(BadImage, match=r"truncated: member 000000005\.png .* 100 of"):
        short.load(5)


def test_unopenable_and_missing_shards_are_clear_errors(shards, tmp_path):
    with pytest.raises(SourceError, match=r"3 of the 6 shards .* first .*00003\.tar"):
        open_source(str(shards["root"] / "{00000..00005}.tar"))
    (tmp_path / "00000.tar").write_bytes(b"garbage, not a tar" * 100)
    with pytest.raises(SourceError, match=r"cannot open webdataset shard .*00000\.tar"):
        open_source(str(tmp_path / "00000.tar"))
    with pytest.raises(SourceError, match="must be uncompressed .tar"):
        open_source(f"{shards['root']}/00000.tar,{shards['root']}/00000.parquet")
    with pytest.raises(SourceError, match="same name"):
        open_source(f"{shards['root']}/00000.tar,{shards['root']}/../shards/00000.tar")


def test_a_folder_of_images_is_still_a_folder_source(shards):
    from rdm.data.folder import FolderSource

    assert isinstance(open_source(str(shards["folder"])), FolderSource)
    assert isinstance(open_source(str(shards["root"])), WebDatasetSource)


def test_opening_reads_headers_only_and_the_index_is_cached(tmp_path, monkeypatch):
    big = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG", compress_level=0)  # ~3 MB member
    write_tar(tmp_path / "00000.tar", [("a.png", buf.getvalue()), ("a.txt", b"big")])
    read = _bytes_read()
    src = WebDatasetSource(str(tmp_path / "00000.tar"), cache_dir=tmp_path / "cache")
    assert _bytes_read() - read < 64_000  # the headers, not the 3 MB of pixels
    assert src.caption(0) == "big" and len(list((tmp_path / "cache").iterdir())) == 1

    def no_scan(path):
        raise AssertionError(f"{path} was indexed again")

    monkeypatch.setattr(wds, "index_shard", no_scan)
    again = WebDatasetSource(str(tmp_path / "00000.tar"), cache_dir=tmp_path / "cache")
    assert again.key(0) == "00000/a" and isinstance(again._table(0), np.memmap)
    (tmp_path / "00000.tar").touch()  # a changed shard (mtime) is indexed again
    with pytest.raises(AssertionError, match="indexed again"):
        WebDatasetSource(str(tmp_path / "00000.tar"), cache_dir=tmp_path / "cache")


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _load_pixels(args) -> bytes:
    src, i = args
    return src.load(i).tobytes()


def test_items_load_in_forked_workers_and_after_pickling(shards):
    src = open_source(spec_of(shards))
    want = [src.load(i).tobytes() for i in (1, 2_000_003)]  # the parent holds open descriptors
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_load_pixels, [(src, 1), (src, 2_000_003)]) == want
    copy = pickle.loads(pickle.dumps(src))
    assert copy._fds == {} and copy._mapped == {}  # mapped again from the cache, not copied
    assert [copy.load(i).tobytes() for i in (1, 2_000_003)] == want
    assert copy.caption(2_000_001) == "picture 2-1"


def test_db_build_on_shards_equals_a_folder_of_the_same_files(shards, tmp_path):
    """`rdm db build` through the CLI with the tiny open_clip encoder of the CLI tests: the
    readable samples give the same vectors, captions and content hashes as the same image files
    in a folder; the corrupt and image-less members land in skipped.jsonl with their ids."""
    import pyarrow.parquet as pq
    from test_db_cli import tiny_encoder_dir

    from rdm.cli import main
    from rdm.database import Database
    from rdm.neighbors import load_neighbors

    enc = tiny_encoder_dir(tmp_path / "enc", seed=0)
    dbs = {}
    for name, spec in (("wds", spec_of(shards)), ("folder", str(shards["folder"]))):
        out = tmp_path / name
        args = ["db", "build", spec, "--encoder", str(enc), "--split", "all", "--out", str(out)]
        assert main([*args, "--shard-size", "10", "--batch-size", "8", "--no-progress"]) == 0
        dbs[name] = (Database.open(out), pq.read_table(out / "metadata.parquet").to_pylist())
    (wdb, wmeta), (fdb, fmeta) = dbs["wds"], dbs["folder"]
    assert wdb.count == fdb.count == 22
    np.testing.assert_array_equal(np.asarray(wdb.embeddings), np.asarray(fdb.embeddings))
    assert [m["key"] for m in wmeta] == [m["key"].rsplit(".", 1)[0] for m in fmeta]
    for field in ("caption", "content_hash", "row"):
        assert [m[field] for m in wmeta] == [m[field] for m in fmeta]
    src = open_source(spec_of(shards))
    assert [m["id"] for m in wmeta] == [
        i for i in src.split_ids("all") if i not in (1_000_002, 1_000_005)
    ]
    skipped = [json.loads(x) for x in (tmp_path / "wds" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["key"]) for s in skipped] == [
        (1_000_002, "00001/000010002"),
        (1_000_005, "00001/000010005"),
    ]
    assert "000010002.jpg" in skipped[0]["reason"] and "no image" in skipped[1]["reason"]
    assert wdb.manifest["source"]["spec"] == spec_of(shards)
    # rdm db neighbors --queries SHARDS: sparse query ids, the query itself left out by id
    nb_path = tmp_path / "nb.safetensors"
    args = ["db", "neighbors", str(tmp_path / "wds"), "--queries", spec_of(shards), "-k", "3"]
    assert (
        main([*args, "--split", "train", "--k-p", "2", "--out", str(nb_path), "--no-progress"]) == 0
    )
    nb = load_neighbors(nb_path)
    train = [i for i in src.split_ids("train") if i not in (1_000_002, 1_000_005)]
    np.testing.assert_array_equal(nb.query_ids, train)
    assert not np.any(nb.nn_ids == nb.query_ids[:, None])
    np.testing.assert_array_equal(nb.nn_ids, np.asarray(wdb.ids)[nb.nn_rows])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_reader_agrees_with_tarfile(tmp_path, fmt):
    """The fast pread header walker against the standard library on each tar dialect: long
    names (GNU 'L' records, pax 'path', the ustar prefix), non-ASCII names, a big-size member,
    folders and symlinks (left out)."""
    path = tmp_path / "x.tar"
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix, GNU 'L' or pax 'path'
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, size in ((f"{deep}/000.jpg", 700), ("000.txt", 0), ("a/b.png", 512)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
        if fmt != tarfile.USTAR_FORMAT:
            info = tarfile.TarInfo("ü" * 70 + "/" + "x" * 90 + ".webp")  # pax / GNU only
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a/b.png"
        tar.addfile(folder)
        tar.addfile(link)
    walked = list(wds._read_headers(path))
    assert walked == wds._read_headers_with_tarfile(path)
    assert [n for n, _, _ in walked][:3] == [f"{deep}/000.jpg", "000.txt", "a/b.png"]
    data = path.read_bytes()
    assert [data[o : o + s] for _, o, s in walked][:3] == [bytes(700), b"", bytes(512)]


def test_descriptors_and_mapped_indexes_stay_bounded(shards, monkeypatch):
    """Thousands of shards must not pass the open-file limit: descriptors and memory-mapped
    indexes (each holds a descriptor) are kept for a few shards and reopened on demand."""
    monkeypatch.setattr(wds, "MAX_OPEN_SHARDS", 1)
    monkeypatch.setattr(wds, "MAX_MAPPED_SHARDS", 2)
    src = open_source(spec_of(shards))
    for _ in range(2):
        for i in (0, 1_000_001, 2_000_002):
            assert src.load(i).size == (32, 32) and src.caption(i).startswith("picture")
            assert len(src._fds) <= 1 and len(src._mapped) <= 2
    assert src.key(7) == "00000/000000007"
