"""Fashion-MNIST from its four IDX files (Debian: ``apt-get install dataset-fashion-mnist``).

Ids ``0 .. 59999`` are the training file, ``60000 .. 69999`` the test file. The ``train`` and
``db`` splits are the two hash-halves of the training file (by key, so they never overlap and do
not depend on the order anything is computed in); ``test`` is the test file.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from rdm.data import Source, SourceError, check_split, key_fraction

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = (
    "install the dataset with 'sudo apt-get install dataset-fashion-mnist' "
    "or give fashion-mnist:DIR, a folder with the four IDX files"
)

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# (images, labels) file stems per part of the dataset, in id order
_PARTS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNIST(Source):
    """The 70k 28x28 greyscale Fashion-MNIST items; captions are class names."""

    CLASSES = CLASSES
    grayscale = True

    def __init__(self, dir: str | Path | None = None) -> None:
        self.dir = Path(dir).expanduser().resolve() if dir else DEFAULT_DIR
        self.spec = f"fashion-mnist:{self.dir}"
        self._files = _find_files(self.dir)
        train_labels = _read_idx(self._files["train"][1], ndim=1)
        test_labels = _read_idx(self._files["test"][1], ndim=1)
        self.n_train = len(train_labels)
        self.labels = np.concatenate([train_labels, test_labels]).astype(np.int64)  # (70000,)
        if self.labels.size and self.labels.max() >= len(CLASSES):
            raise SourceError(
                f"Fashion-MNIST labels in {str(self.dir)!r} go up to {self.labels.max()}, "
                f"expected 0..{len(CLASSES) - 1}: the label files are not Fashion-MNIST's"
            )
        self._db_masks: dict[float, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        i = self._check_id(i)
        return f"train/{i}" if i < self.n_train else f"test/{i - self.n_train}"

    def caption(self, i: int) -> str:
        return CLASSES[self.labels[self._check_id(i)]]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels([i])[0], mode="L").convert("RGB")  # 28x28 RGB

    def pixels(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Grey pixels of ``ids`` as uint8 (n, 28, 28), 0 = black; no PIL round trip."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"Fashion-MNIST ids must lie in 0..{len(self) - 1}")
        train, test = self._images("train"), self._images("test")
        out = np.empty((len(ids), *train.shape[1:]), dtype=np.uint8)
        in_train = ids < self.n_train
        out[in_train] = train[ids[in_train]]
        out[~in_train] = test[ids[~in_train] - self.n_train]
        return out

    def split_ids(self, split: str, db_fraction: float = 0.5) -> np.ndarray:
        check_split(split)
        ids = np.arange(len(self), dtype=np.int64)
        if split == "all":
            return ids
        if split == "test":
            return ids[self.n_train :]
        in_db = self._db_mask(db_fraction)
        return ids[: self.n_train][in_db if split == "db" else ~in_db]

    def split_rule(self, db_fraction: float = 0.5) -> str:
        return (
            f"db = training-file items whose sha1(key) fraction < {db_fraction}; train = the rest "
            "of the training file; test = the t10k test file; all three disjoint by construction"
        )

    def _db_mask(self, db_fraction: float) -> np.ndarray:
        if db_fraction not in self._db_masks:
            keys = (f"train/{i}" for i in range(self.n_train))
            self._db_masks[db_fraction] = np.fromiter(
                (key_fraction(k) < db_fraction for k in keys), dtype=bool, count=self.n_train
            )
        return self._db_masks[db_fraction]

    def _images(self, part: str) -> np.ndarray:
        images = _read_idx(self._files[part][0], ndim=3)  # (n, 28, 28) uint8, cached
        n_labels = self.n_train if part == "train" else len(self) - self.n_train
        if len(images) != n_labels:
            raise SourceError(
                f"{str(self._files[part][0])!r} holds {len(images)} images but its label file "
                f"{n_labels} labels: the Fashion-MNIST files in {str(self.dir)!r} do not match"
            )
        return images

    def _check_id(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"Fashion-MNIST id {i} is out of range 0..{len(self) - 1}")
        return int(i)


def _find_files(dir: Path) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) paths of each part, ``.gz`` or not; SourceError naming what is missing."""
    found: dict[str, tuple[Path, Path]] = {}
    missing = []
    for part, stems in _PARTS.items():
        paths = []
        for stem in stems:
            path = next((p for p in (dir / stem, dir / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                missing.append(f"{stem}[.gz]")
            paths.append(path)
        found[part] = (paths[0], paths[1])
    if missing:
        where = f"lacks {', '.join(missing)}" if dir.is_dir() else "does not exist"
        raise SourceError(f"Fashion-MNIST folder {str(dir)!r} {where}: {APT_HINT}")
    return found


@lru_cache(maxsize=8)
def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX file as a read-only array; plain files are memory-mapped, gzip read once."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fp:
                data: np.ndarray | bytes = fp.read()
        except (OSError, EOFError) as exc:
            raise SourceError(f"cannot read {str(path)!r}: {exc}; {APT_HINT}") from None
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    header = bytes(data[: 4 + 4 * ndim])
    # magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions
    if len(header) < 4 + 4 * ndim or header[:4] != bytes([0, 0, 8, ndim]):
        raise SourceError(f"{str(path)!r} is not a {ndim}-d uint8 IDX file; {APT_HINT}")
    shape = tuple(int.from_bytes(header[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    count = int(np.prod(shape))
    if len(data) - len(header) < count:
        raise SourceError(f"{str(path)!r} is truncated: expected shape {shape}; {APT_HINT}")
    flat = np.frombuffer(data, dtype=np.uint8, count=count, offset=len(header))
    return flat.reshape(shape)
