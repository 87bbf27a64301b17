"""Images as the evaluation sees them: uint8 pixel arrays in the model's resolution and channels.

Real images are put into the *model view* — the same centre crop and resize the training data went
through (:func:`rdm.train.image_tensor`) — so that samples and real data are compared at one size.
Samples are never resized: one of another size or channel count than the view is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rdm.errors import RdmError

# PIL modes of 8-bit images the evaluation reads, with their channel counts
_MODES = {"L": 1, "RGB": 3}


class ImageFormatError(RdmError):
    """Images of another size or channel count than the reference; the message names both."""


@dataclass(frozen=True)
class View:
    """Side and channel count of the images a model produces (and real data is prepared to)."""

    resolution: int
    channels: int  # 1 (grey) or 3 (RGB)

    def describe(self) -> str:
        return f"{self.resolution}x{self.resolution} {'grey' if self.channels == 1 else 'RGB'}"

    def identity(self) -> dict:
        prep = "centre square crop, bicubic resize (rdm.train.image_tensor), uint8"
        return {"resolution": self.resolution, "channels": self.channels, "prep": prep}


def as_pixels(images: Sequence[Image.Image] | np.ndarray, what: str = "images") -> np.ndarray:
    """PIL images (mode L or RGB, all one size) or a uint8 array -> uint8 (N, H, W, C), C in {1, 3}."""
    if isinstance(images, np.ndarray):
        a = images[..., None] if images.ndim == 3 else images
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise ImageFormatError(
                f"{what}: expected uint8 (N, H, W[, 1 or 3]), got {images.dtype} {images.shape}"
            )
        return a
    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ImageFormatError(f"{what}[{i}] is a {type(im).__name__}, not a PIL image")
        if im.mode not in _MODES:
            raise ImageFormatError(
                f"{what}[{i}] has PIL mode {im.mode}; evaluation reads 8-bit grey (L) or RGB images"
            )
        a = np.asarray(im)
        arrays.append(a[..., None] if a.ndim == 2 else a)
        if arrays[-1].shape != arrays[0].shape:
            raise ImageFormatError(
                f"{what}[{i}] is {_shape(arrays[-1])} but {what}[0] is {_shape(arrays[0])}"
            )
    if not arrays:
        raise ImageFormatError(f"{what}: no images")
    return np.stack(arrays)


def require_view(pixels: np.ndarray, view: View, what: str) -> np.ndarray:
    """``pixels`` in the reference view, or an error: RGB images with R = G = B are grey images
    stored as RGB and become one channel losslessly; any other size or channel difference is
    refused (no silent resize, no colour dropped)."""
    if view.channels == 1 and pixels.shape[-1] == 3:
        if (pixels[..., :1] == pixels).all():
            pixels = pixels[..., :1]
        else:
            raise ImageFormatError(
                f"{what} have colour (R, G, B differ) but the real reference is "
                f"{view.describe()}: a grey model's samples are grey"
            )
    n, h, w, c = pixels.shape
    if (h, w, c) != (view.resolution, view.resolution, view.channels):
        raise ImageFormatError(
            f"{what} are {_shape(pixels[0])} but the real reference is {view.describe()}: "
            f"give images at the model's resolution and channels (as 'rdm sample' writes them)"
        )
    return pixels


def model_view(images: Sequence[Image.Image], view: View) -> np.ndarray:
    """Real PIL images -> uint8 (N, R, R, C) exactly as training prepared them."""
    from rdm.train import image_tensor

    out = np.empty((len(images), view.resolution, view.resolution, view.channels), np.uint8)
    for i, im in enumerate(images):
        x = image_tensor(im.convert("RGB"), view.resolution)  # (3, R, R) in [-1, 1]
        rgb = ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        out[i] = rgb[..., :1] if view.channels == 1 else rgb  # grey data: R = G = B
    return out


def load_view(source, ids: np.ndarray, view: View, desc: str, progress: bool = True) -> np.ndarray:
    """Items ``ids`` of a source in the model view, uint8 (N, R, R, C), with a progress bar."""
    from tqdm.auto import tqdm

    out = np.empty((len(ids), view.resolution, view.resolution, view.channels), np.uint8)
    bar = tqdm(total=len(ids), desc=desc, unit="img", disable=not progress)
    for s in range(0, len(ids), 512):
        batch = ids[s : s + 512]
        out[s : s + len(batch)] = model_view([source.load(int(i)) for i in batch], view)
        bar.update(len(batch))
    bar.close()
    return out


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, H, W, 3); grey is repeated (what RGB extractors expect)."""
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H, W) luma in [0, 255] (ITU-R 601: PIL's mode L weights)."""
    if pixels.shape[-1] == 1:
        return pixels[..., 0].astype(np.float32)
    return pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _shape(a: np.ndarray) -> str:
    h, w, c = a.shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"
