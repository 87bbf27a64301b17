"""Real-data features cached on disk without pickle: one safetensors file per (data, extractor).

The key is a JSON object (source spec, split, N, seed, a checksum of the item ids, the model view
and the extractor identity); the file name is its hash and the key is stored inside, so a hash
collision or a stale file is detected and recomputed instead of trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV = "RDM_CACHE"


def default_dir() -> Path:
    """``$RDM_CACHE/eval-features``, else ``~/.cache/rdm/eval-features``."""
    root = os.environ.get(ENV)
    return (Path(root) if root else Path.home() / ".cache" / "rdm") / "eval-features"


def ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def cached_features(
    cache_dir: Path | None, key: dict, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool]:
    """Features for ``key`` from the cache, else ``compute()`` them and store them.

    Returns (features float32 (N, F), whether they came from the cache). ``cache_dir=None``
    disables caching.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    from rdm.io import atomic_write, require_writable

    if cache_dir is None:
        return compute(), False
    blob = json.dumps(key, sort_keys=True)
    path = (
        Path(cache_dir)
        / f"{key.get('extractor', {}).get('name', 'features')}-{_sha16(blob)}.safetensors"
    )
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                stored = (f.metadata() or {}).get("key")
            if stored == blob:
                return load_file(path)["features"], True
        except (SafetensorError, OSError):
            pass  # unreadable cache entry: recompute and overwrite it
    features = compute()
    require_writable(path, what="feature cache")
    atomic_write(path, lambda tmp: save_file({"features": features}, tmp, metadata={"key": blob}))
    return features, False


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
