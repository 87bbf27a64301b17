"""Measures beside the distribution metrics: colour statistics, conditioning faithfulness and
memorisation. Numpy in, plain dicts of floats out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from rdm.evaluation.metrics import nearest_distances

BORDER = 2  # pixels of the frame whose brightness stands for the background


def colour_stats(pixels: np.ndarray) -> dict[str, float]:
    """Colour statistics of uint8 (N, H, W, C) images, all in [0, 1].

    - ``brightness``  mean pixel value over pixels and channels
    - ``background``  the same over the outer 2-pixel frame (black, 0, on Fashion-MNIST)
    - ``saturation``  mean HSV saturation (max − min) / max over R, G, B (0 where max = 0)
    - ``spread``      mean per-pixel channel spread (max − min) over R, G, B: 0 for grey images
    - ``cast``        max − min over R, G, B of the channel means: a global tint
    """
    x = pixels.astype(np.float64) / 255.0  # (N, H, W, C)
    hi, lo = x.max(-1), x.min(-1)  # (N, H, W)
    frame = np.ones(x.shape[1:3], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    channel_means = x.mean((0, 1, 2))  # (C,)
    saturation = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return {
        "brightness": float(x.mean()),
        "background": float(x[:, frame].mean()),
        "saturation": float(saturation.mean()),
        "spread": float((hi - lo).mean()),
        "cast": float(channel_means.max() - channel_means.min()),
    }


def majority(labels: Sequence[str]) -> str | None:
    """The most frequent label; a tie goes to the one that comes first (the nearest neighbour,
    since retrieved rows are ordered by similarity). None for no labels."""
    if not labels:
        return None
    counts = Counter(labels)
    top = max(counts.values())
    return next(lab for lab in labels if counts[lab] == top)


def faithfulness(predicted: np.ndarray, target: np.ndarray) -> dict:
    """Share of samples whose predicted class equals their target class (targets < 0 are skipped)."""
    has = target >= 0
    if not has.any():
        return {"share": None, "n": 0}
    return {"share": float((predicted[has] == target[has]).mean()), "n": int(has.sum())}


def share_closer(d_samples: np.ndarray, d_real: np.ndarray) -> float:
    """P(d_sample < d_real) over all (sample, real) pairs, ties counting ½ (the Mann-Whitney
    statistic / (N·M)). 0.5 when samples are as far from the training images as unseen real
    images are; towards 1 when samples sit closer to training images than real images do."""
    d_real = np.sort(d_real)
    below = np.searchsorted(d_real, d_samples, side="left")  # real distances < each sample's
    ties = np.searchsorted(d_real, d_samples, side="right") - below
    greater = len(d_real) - below - ties  # real images farther than the sample
    return float((greater + 0.5 * ties).sum() / (len(d_samples) * len(d_real)))


def distance_summary(d: np.ndarray) -> dict[str, float]:
    q = np.quantile(d, [0.0, 0.05, 0.5, 0.95])
    return {"min": float(q[0]), "p05": float(q[1]), "median": float(q[2]), "p95": float(q[3])}


def memorisation(d_samples: np.ndarray, d_real: np.ndarray) -> dict:
    """Nearest-reference distances of samples against those of unseen real images."""
    return {
        "samples": distance_summary(d_samples),
        "real": distance_summary(d_real),
        "share_closer_than_real": share_closer(d_samples, d_real),
        "share_below_real_min": float((d_samples < d_real.min()).mean()),
    }


def memorisation_against(
    fake: np.ndarray, real: np.ndarray, ref: np.ndarray, ref_ids: np.ndarray, show: int = 8
) -> dict:
    """Nearest ``ref`` row (training or database images) of every sample and of every unseen real
    image, in feature space; the ``show`` closest samples with the id of their nearest image."""
    d_fake, nearest = nearest_distances(fake, ref)
    d_real, _ = nearest_distances(real, ref)
    closest = [
        {"sample": int(i), "id": int(ref_ids[nearest[i]]), "distance": float(d_fake[i])}
        for i in np.argsort(d_fake, kind="stable")[:show]
    ]
    return {**memorisation(d_fake, d_real), "searched": len(ref), "closest": closest}
