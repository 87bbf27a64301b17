"""Feature extractors behind one interface: images -> float32 (N, F), with an identity.

- ``inception``   the FID Inception's 2048-d pool3 (:mod:`rdm.evaluation.inception`), weights from
                  a local file (``--inception-weights PATH`` or ``$RDM_INCEPTION_WEIGHTS``)
- ``clip``        the database encoder φ (the paper's CLIP-FID), 256- or 512-d unit vectors
- ``classifier``  the penultimate 128-d layer of a small domain classifier
                  (:mod:`rdm.evaluation.classifier`); it also predicts classes (faithfulness)

Every figure is reported beside ``extractor.identity`` (name, weights checksum, dimension, input
preprocessing), which also keys the real-feature cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from rdm.errors import RdmError
from rdm.evaluation.images import ImageFormatError, as_pixels, to_grey, to_rgb

EXTRACTORS = ("inception", "clip", "classifier")


class FeatureExtractor(ABC):
    """images (list of PIL, or uint8 (N, H, W, C)) -> float32 (N, F)."""

    name: str
    identity: dict
    batch_size: int = 256

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def features(
        self, images: Sequence[Image.Image] | np.ndarray, *, progress: bool = True, desc: str = ""
    ) -> np.ndarray:
        """Batched, with a progress bar; rows are independent of the batch size."""
        from tqdm.auto import tqdm

        pixels = as_pixels(images)
        out = np.empty((len(pixels), self.dim), np.float32)
        bar = tqdm(
            total=len(pixels),
            desc=desc or f"{self.name} features",
            unit="img",
            disable=not progress,
        )
        for s in range(0, len(pixels), self.batch_size):
            batch = pixels[s : s + self.batch_size]
            out[s : s + len(batch)] = self._features(batch)
            bar.update(len(batch))
        bar.close()
        if not np.isfinite(out).all():
            raise RdmError(
                f"{self.name} features of {desc or 'the images'} contain NaN or infinity"
            )
        return out

    @abstractmethod
    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) -> float32 (B, F)."""


class InceptionExtractor(FeatureExtractor):
    """FID Inception pool3 (2048-d); RGB in, grey repeated, bilinear to 299 (as pytorch-fid)."""

    name = "inception"
    batch_size = 32

    def __init__(self, weights: str | Path | None = None, device: str = "cpu"):
        import torch

        from rdm.evaluation import inception
        from rdm.io import sha256_file

        path = inception.resolve_weights(weights)
        self.net = inception.load(path)
        self.device = torch.device(device)
        self.net.to(self.device)
        self.identity = {
            "name": self.name,
            "layout": "FID Inception (pt_inception-2015-12-05), pool3",
            "weights_sha256": sha256_file(path),
            "dim": inception.DIM,
            "input": "RGB (grey repeated), bilinear to 299x299, 2x-1 (pytorch-fid)",
        }

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        from rdm.evaluation.inception import pool3

        x = torch.from_numpy(to_rgb(pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            return pool3(self.net, x).float().cpu().numpy()


class ClipExtractor(FeatureExtractor):
    """The database encoder φ: unit-norm image embeddings (CLIP-FID in the paper)."""

    name = "clip"

    def __init__(self, encoder):
        from rdm.encoders import identity_fingerprint

        self.encoder = encoder
        self.identity = {
            "name": self.name,
            "encoder": {k: v for k, v in encoder.identity.items() if k != "spec"},
            "encoder_fingerprint": identity_fingerprint(encoder.identity),
            "dim": encoder.dim,
            "input": "RGB (grey repeated), the encoder's own preprocessing",
        }

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.encode_images(np.ascontiguousarray(to_rgb(pixels)))


class ClassifierExtractor(FeatureExtractor):
    """Penultimate features of the domain classifier; also :meth:`predict` for faithfulness."""

    name = "classifier"
    batch_size = 512

    def __init__(self, path: str | Path | None = None):
        from rdm.evaluation import classifier

        self.model, self.cfg, meta = classifier.load(path)
        self.classes = list(self.cfg.classes)
        self.identity = {
            "name": self.name,
            "arch": "DomainCNN",
            "weights_sha256": meta["weights_sha256"],
            "dim": self.cfg.feature_dim,
            "classes": self.classes,
            "data": meta.get("data"),
            "test_accuracy": meta.get("test_accuracy"),
            "input": f"grey (ITU-R 601 luma) {self.cfg.resolution}x{self.cfg.resolution}, no resize",
        }

    def _grey(self, pixels: np.ndarray) -> np.ndarray:
        r = self.cfg.resolution
        if pixels.shape[1:3] != (r, r):
            raise ImageFormatError(
                f"the classifier reads {r}x{r} images, these are {pixels.shape[2]}x{pixels.shape[1]}: "
                f"use --features clip or inception, or train a classifier at this size with "
                f"'rdm eval train-classifier --resolution {pixels.shape[1]}'"
            )
        return to_grey(pixels)

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        from rdm.evaluation.classifier import predict

        return predict(self.model, self._grey(pixels), self.cfg)[0]

    def predict(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """(N,) predicted class ids (indices into :attr:`classes`)."""
        from rdm.evaluation.classifier import predict

        return predict(self.model, self._grey(as_pixels(images)), self.cfg)[1]

    def class_ids(self, captions: Sequence[str], what: str) -> np.ndarray:
        """Captions -> class ids; refuse captions the classifier was not trained on."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({c for c in captions if c not in index})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:5])
            raise RdmError(
                f"the classifier was trained on other classes ({', '.join(self.classes)}) but "
                f"{what} has {len(unknown)} others ({shown}{' ...' if len(unknown) > 5 else ''}): "
                "use --features clip or inception, or train a classifier on this data"
            )
        return np.array([index[c] for c in captions], dtype=np.int64)


def load_extractor(
    name: str,
    *,
    encoder=None,
    inception_weights: str | Path | None = None,
    classifier: str | Path | None = None,
    device: str = "cpu",
) -> FeatureExtractor:
    """``inception`` / ``clip`` (needs ``encoder``) / ``classifier`` (default: the shipped one)."""
    if name == "inception":
        return InceptionExtractor(inception_weights, device=device)
    if name == "clip":
        if encoder is None:
            raise RdmError("--features clip needs the database encoder (it records none)")
        return ClipExtractor(encoder)
    if name == "classifier":
        return ClassifierExtractor(classifier)
    raise RdmError(f"--features {name!r}: choose one of {', '.join(EXTRACTORS)}")
