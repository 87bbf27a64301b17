"""The allowlisting unpickler (rdm.official.unpickle): foreign globals are stubbed, never run;
tensors, containers and numpy arrays come back exactly as torch / pickle would give them."""

from __future__ import annotations

import os
import pathlib
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from rdm.official.unpickle import (
    UnpickleError,
    is_stub,
    load_lightning_checkpoint,
    load_pickle,
    load_torch_zip,
)

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "compvis-rdm"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fixture {FIXTURE} not present")


class TouchOnLoad:
    """Unpickling this calls Path.touch(target): a pickle that writes a file if it runs."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


class ShellOnLoad:
    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


def test_plain_pickle_global_is_stubbed_not_run(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps({"ok": [1, 2.5, "x"], "evil": TouchOnLoad(target)}, protocol=4)
    # control: the payload is live — plain pickle runs it
    pickle.loads(payload)
    assert target.exists()
    target.unlink()

    (tmp_path / "evil.p").write_bytes(payload)
    obj, stubbed = load_pickle(tmp_path / "evil.p", what="nn_memory file")
    assert not target.exists()
    assert obj["ok"] == [1, 2.5, "x"]
    assert is_stub(obj["evil"])
    assert "pathlib.Path.touch" in stubbed
    assert "pathlib.PosixPath" in stubbed or "pathlib.WindowsPath" in stubbed


def test_os_system_in_protocol_2_is_stubbed(tmp_path):
    target = tmp_path / "pwned-shell"
    (tmp_path / "evil.p").write_bytes(pickle.dumps([ShellOnLoad(target)], protocol=2))
    obj, stubbed = load_pickle(tmp_path / "evil.p")
    assert not target.exists()
    assert stubbed == [f"{os.system.__module__}.system"]
    assert repr(obj[0]) == f"<stub of {os.system.__module__}.system>"


def test_torch_zip_with_foreign_global_keeps_tensors_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ckpt = {"state_dict": OrderedDict(w=w), "callbacks": {"cb": TouchOnLoad(target)}}
    torch.save(ckpt, tmp_path / "model.ckpt")
    # control: torch's full unpickler runs the payload
    torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert target.exists()
    target.unlink()

    loaded, stubbed = load_lightning_checkpoint(tmp_path / "model.ckpt")
    assert not target.exists()
    # protocol 2 spells the method as getattr(pathlib.Path, "touch"): both names stubbed
    assert "__builtin__.getattr" in stubbed and "pathlib.Path" in stubbed
    assert type(loaded["state_dict"]) is OrderedDict
    assert torch.equal(loaded["state_dict"]["w"], w)


def test_tensors_views_and_dtypes_match_torch_load(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    tensors = {
        "base": base,
        "view_t": base[:, 1:].t(),  # non-contiguous view sharing base's storage
        "row": base[2],
        "f16": torch.randn(5, generator=gen).half(),
        "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save({"t": tensors, "meta": {"epoch": 3, "s": {1, 2}, "k": (1, None)}}, tmp_path / "x.pt")
    ours, stubbed = load_torch_zip(tmp_path / "x.pt")
    ref = torch.load(tmp_path / "x.pt", weights_only=True)
    assert stubbed == []
    assert ours["meta"] == ref["meta"]
    for name, t in ref["t"].items():
        got = ours["t"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == t.stride(), name
        assert torch.equal(got, t), name
    # views share one storage, as torch restores them
    assert ours["t"]["view_t"].untyped_storage().data_ptr() == ours["t"]["base"].data_ptr()


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_arrays_and_scalars(tmp_path, protocol):
    data = {
        "nn_memory": np.array([5, 18, 60], dtype=np.int64),
        "emb": np.arange(6, dtype=np.float16).reshape(2, 3),
        "id_count": {5: np.int64(4), 18: np.int64(3)},
        "f": np.float32(0.5),
    }
    (tmp_path / "m.p").write_bytes(pickle.dumps(data, protocol=protocol))
    obj, stubbed = load_pickle(tmp_path / "m.p")
    assert stubbed == []
    assert obj["nn_memory"].dtype == np.int64 and obj["nn_memory"].tolist() == [5, 18, 60]
    np.testing.assert_array_equal(obj["emb"], data["emb"])
    assert obj["emb"].dtype == np.float16
    assert obj["id_count"] == {5: 4, 18: 3} and type(obj["id_count"][5]) is np.int64
    assert obj["f"] == np.float32(0.5) and type(obj["f"]) is np.float32


@needs_fixture
def test_release_nn_memory_pickle_with_numpy_1_names():
    obj, stubbed = load_pickle(FIXTURE / "db" / "nn_memory.p", what="nn_memory file")
    assert stubbed == []
    memory, counts = obj["nn_memory"], obj["id_count"]
    # PROVENANCE.md: 55 ids, 96 hits (24 queries x k = 4), sorted by count descending
    assert memory.dtype == np.int64 and memory.shape == (55,)
    assert sum(int(v) for v in counts.values()) == 96
    assert sorted(counts) == sorted(memory.tolist())
    ranked = [int(counts[int(i)]) for i in memory]
    assert ranked == sorted(ranked, reverse=True)
    assert memory[:8].tolist() == [5, 18, 60, 20, 21, 28, 37, 63]  # the reference's nn_ids


@needs_fixture
def test_release_checkpoint_matches_torch_weights_only_load():
    ckpt, stubbed = load_lightning_checkpoint(FIXTURE / "model.ckpt")
    assert stubbed == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["pytorch-lightning_version"]) == (
        0,
        2,
        "1.4.2",
    )
    (callback,) = ckpt["callbacks"]
    assert is_stub(callback) and callback.stub_of == stubbed[0]

    # reference: torch's own weights-only loader with an inert placeholder allowlisted
    placeholder = type("ModelCheckpoint", (), {})
    placeholder.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    with torch.serialization.safe_globals([placeholder]):
        ref = torch.load(FIXTURE / "model.ckpt", weights_only=True)["state_dict"]
    ours = ckpt["state_dict"]
    assert list(ours) == list(ref) and len(ours) == 548
    for key, t in ref.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    assert ours["model_ema.num_updates"].dtype == torch.int32


@needs_fixture
def test_truncated_checkpoint_names_the_file(tmp_path):
    data = (FIXTURE / "model.ckpt").read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut-{cut}.ckpt"
        path.write_bytes(data[:cut])
        with pytest.raises(UnpickleError, match=rf"{path}.*truncated or damaged"):
            load_lightning_checkpoint(path)


def test_bad_files_give_one_clear_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(UnpickleError, match=rf"checkpoint {missing} does not exist"):
        load_lightning_checkpoint(missing)
    with pytest.raises(UnpickleError, match="is a directory"):
        load_lightning_checkpoint(tmp_path)

    (tmp_path / "m.p").write_bytes(pickle.dumps({"a": np.arange(1000)})[:-50])
    with pytest.raises(UnpickleError, match=rf"nn_memory {tmp_path / 'm.p'} cannot be read"):
        load_pickle(tmp_path / "m.p", what="nn_memory")

    (tmp_path / "plain.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(UnpickleError, match="plain pickle stream, not the zip format"):
        load_lightning_checkpoint(tmp_path / "plain.ckpt")

    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(UnpickleError, match="not a Lightning checkpoint"):
        load_lightning_checkpoint(tmp_path / "tensor.pt")
    with pytest.raises(UnpickleError, match="zip archive .* not a plain pickle"):
        load_pickle(tmp_path / "tensor.pt")

    (tmp_path / "garbage.ckpt").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(UnpickleError, match="garbage.ckpt cannot be read"):
        load_lightning_checkpoint(tmp_path / "garbage.ckpt")


def test_storage_shorter_than_declared_is_refused(tmp_path):
    import zipfile

    torch.save({"state_dict": {"w": torch.ones(8)}}, tmp_path / "ok.ckpt")
    src = zipfile.ZipFile(tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "short.ckpt", "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            dst.writestr(info, raw[:-4] if info.filename.endswith("/data/0") else raw)
    with pytest.raises(UnpickleError, match="storage 0 holds 28 bytes, expected 8 x 4"):
        load_lightning_checkpoint(tmp_path / "short.ckpt")
