"""Frozen encoders φ behind one interface: images / texts -> float32 (B, d), unit norm.

Every encoder carries an *identity* (architecture, weights checksum, d, preprocessing) that is
written into every artifact built with it; :func:`require_same_identity` is the one guard that
refuses to pair artifacts of different identities.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image

from rdm.errors import IdentityMismatch

# keys of an identity that describe where it was loaded from, not what it computes
_LOCATION_KEYS = ("spec",)


class Encoder(ABC):
    """A frozen image/text encoder. Outputs are float32 numpy arrays of shape (B, d), unit L2 norm."""

    #: {"arch", "weights_sha256", "dim", "image_size", "mean", "std", "resize", "spec"}
    identity: dict

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """RGB PIL images or uint8 array (B, H, W, 3) -> float32 (B, d), unit norm."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 (B, d), unit norm."""


def identity_fingerprint(identity: dict) -> str:
    """Short stable hash of what an encoder computes (ignores where it was loaded from)."""
    core = {k: v for k, v in identity.items() if k not in _LOCATION_KEYS}
    blob = json.dumps(core, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_identity(identity: dict) -> str:
    return (
        f"{identity.get('arch', '?')} d={identity.get('dim', '?')} "
        f"weights {str(identity.get('weights_sha256', '?'))[:12]} "
        f"({identity.get('spec', 'unknown location')})"
    )


def require_same_identity(a: dict, a_name: str, b: dict, b_name: str) -> None:
    """Refuse to pair two artifacts whose encoder identities differ, naming both."""
    if identity_fingerprint(a) != identity_fingerprint(b):
        raise IdentityMismatch(
            f"{a_name} was made with encoder {describe_identity(a)}, but {b_name} with "
            f"{describe_identity(b)}; they cannot be combined. Rebuild one of them with the "
            "other's encoder."
        )
