"""Throughput of the ``rdm eval`` feature extractors and metrics, measured side by side.

    OMP_NUM_THREADS=1 python bench/eval_features.py --threads 1

Extractors run on the same uint8 images (32 x 32 Fashion-MNIST test images in the model view,
or seeded noise when the dataset is absent): ``classifier`` (the shipped one), ``clip`` (the
shipped default encoder), ``inception`` (the FID layout with random weights: throughput does not
depend on the weights, and the real file cannot be downloaded here). Metrics run on random
features of the classifier's width (128) and Inception's (2048) at N real = N generated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def images(n: int) -> tuple[np.ndarray, str]:
    from rdm.data import SourceError, open_source
    from rdm.evaluation.images import View, load_view

    try:
        source = open_source("fashion-mnist")
    except SourceError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "seeded noise"
    ids = source.split_ids("test")[:n]
    return load_view(source, ids, View(32, 3), "images", progress=False), "Fashion-MNIST test"


def random_inception_file(folder: Path) -> Path:
    from rdm.evaluation import inception

    path = folder / inception.WEIGHTS_NAME
    torch.save(inception.random_state(), path)
    return path


def rate(fn, n: int, repeat: int = 2) -> float:
    """Images (or sets) per second: best of ``repeat`` timed runs after one warm-up."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return n / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from rdm.encoders import load_encoder
    from rdm.evaluation import metrics
    from rdm.evaluation.features import ClassifierExtractor, ClipExtractor, InceptionExtractor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=512, help="images per extractor run")
    p.add_argument("--n-inception", type=int, default=32, help="images per Inception run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pixels, what = images(args.n)
    print(f"{what}, {pixels.shape[1]}x{pixels.shape[2]}, torch threads {args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        extractors = {
            "classifier": (ClassifierExtractor(), args.n),
            "clip (default encoder)": (ClipExtractor(load_encoder("default")), args.n),
            "inception (pool3, 299 px)": (
                InceptionExtractor(random_inception_file(Path(tmp))),
                args.n_inception,
            ),
        }
        print("\n| extractor | dim | images/s |\n|---|---|---|")
        rates = {}
        for name, (ex, n) in extractors.items():
            rates[name] = rate(lambda ex=ex, n=n: ex.features(pixels[:n], progress=False), n)
            print(f"| {name} | {ex.dim} | {rates[name]:.1f} |", flush=True)
    base = rates["classifier"]
    print(
        "\nrelative to the classifier: "
        + ", ".join(f"{k} {v / base:.3f}x" for k, v in rates.items())
    )

    print("\n| metric (N real = N generated) | F | N | seconds |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for f, n in ((128, 500), (128, 5000), (2048, 500)):
        x, y = rng.normal(size=(n, f)), rng.normal(0.1, 1, size=(n, f))
        for name, fn in (
            ("FD", lambda x=x, y=y: metrics.frechet_distance(x, y)),
            ("KID (100 subsets)", lambda x=x, y=y: metrics.kid(x, y)),
            ("precision/recall k=3", lambda x=x, y=y: metrics.precision_recall(x, y)),
            ("density/coverage k=5", lambda x=x, y=y: metrics.density_coverage(x, y)),
        ):
            print(f"| {name} | {f} | {n} | {_timed(fn):.2f} |", flush=True)


if __name__ == "__main__":
    main()
