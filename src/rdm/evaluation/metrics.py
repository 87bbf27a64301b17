"""Sample-quality metrics on feature arrays: numpy in, numbers out, float64 throughout.

Every function takes real features ``x`` (N, F) and generated features ``y`` (M, F) from the same
extractor. Each refuses inputs it cannot measure (too few rows, mismatched widths, NaN) with a
:class:`MetricInputError` that says how many rows it needs, instead of returning NaN.

- :func:`frechet_distance`   FD (Heusel et al. 2017, "GANs trained by a two time-scale update rule")
- :func:`kid`                KID: unbiased MMD² with the cubic polynomial kernel, mean and std over
                             random subsets (Bińkowski et al. 2018, "Demystifying MMD GANs")
- :func:`precision_recall`   improved precision and recall with k-NN balls (Kynkäänniemi et al. 2019)
- :func:`density_coverage`   density and coverage (Naeem et al. 2020, "Reliable fidelity and
                             diversity metrics for generative models")
- :func:`nearest_distances`  each query's distance to its nearest reference row (memorisation)
"""

from __future__ import annotations

import numpy as np

from rdm.errors import RdmError

PR_K = 3  # Kynkäänniemi et al. 2019 use k = 3
DC_K = 5  # Naeem et al. 2020 recommend k = 5 (the prdc default)
KID_SUBSETS = 100  # torch-fidelity's and Bińkowski et al.'s defaults
KID_SUBSET_SIZE = 1000
_ROWS_PER_CHUNK = 2048  # rows of a distance matrix computed at once (memory, not results)


class MetricInputError(RdmError):
    """Features a metric cannot be computed on; the message says what the metric needs."""


def check_features(x: np.ndarray, name: str, min_rows: int, metric: str) -> np.ndarray:
    """``x`` as float64 (N, F); refuse fewer than ``min_rows`` rows or non-finite values."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise MetricInputError(f"{metric}: {name} features must be (N, F), got shape {x.shape}")
    if len(x) < min_rows:
        raise MetricInputError(
            f"{metric} needs at least {min_rows} {name} samples, got {len(x)}: evaluate more images"
        )
    if not np.isfinite(x).all():
        raise MetricInputError(f"{metric}: {name} features contain NaN or infinity")
    return x.astype(np.float64, copy=False)


def _pair(x, y, min_rows: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    x = check_features(x, "real", min_rows, metric)
    y = check_features(y, "generated", min_rows, metric)
    if x.shape[1] != y.shape[1]:
        raise MetricInputError(
            f"{metric}: real features have {x.shape[1]} dimensions, generated {y.shape[1]}: "
            "compute both with the same extractor"
        )
    return x, y


# --- Fréchet distance ------------------------------------------------------------------------------


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FD between Gaussians fitted to ``x`` and ``y`` (FID when the features are Inception's).

    Needs 2 rows per set (a covariance); with fewer rows than dimensions the covariances are
    singular and FD is biased upwards, but still defined.
    """
    x, y = _pair(x, y, 2, "FD")
    return frechet_distance_from_stats(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})  (Heusel et al. 2017, eq. 6).

    tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ with λ the eigenvalues of Σ₁Σ₂, which equal those of the symmetric
    PSD matrix √Σ₁ Σ₂ √Σ₁. Computing them with ``eigvalsh`` on that matrix gives real λ; the
    tiny negative ones are round-off (the "imaginary residue" scipy's ``sqrtm`` returns) and are
    set to 0. The result is clipped at 0 for the same reason (identical sets give ~1e-13).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    root1 = _psd_sqrt(s1)
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via its eigendecomposition (negative round-off → 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# --- KID -----------------------------------------------------------------------------------------


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (aᵀb / F + 1)³, the KID kernel (Bińkowski et al. 2018, §4)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² estimate of two equally sized sets (Gretton et al. 2012, eq. 3; the estimator
    of Bińkowski et al.'s and torch-fidelity's code): within-set means over i ≠ j, cross mean over
    all pairs."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID: (mean, std, subset size) of the unbiased MMD² over ``subsets`` random subsets.

    ``subset_size`` defaults to half the smaller set, at most 1000 (torch-fidelity's size): with
    subsets as large as the sets every subset is the whole set and the std would be 0. Subsets
    are drawn without replacement in the same order as torch-fidelity (``RandomState(seed)``, real
    then generated), so both give the same numbers for the same seed and size. KID can be
    slightly negative when the sets match.
    """
    if subset_size is None:
        size = min(KID_SUBSET_SIZE, max(2, min(len(x), len(y)) // 2))
    else:
        size = subset_size
    x, y = _pair(x, y, max(size, 2), "KID")
    if size < 2:
        raise MetricInputError(f"KID subset size {size} must be at least 2")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        xs = x[rng.choice(len(x), size, replace=False)]
        ys = y[rng.choice(len(y), size, replace=False)]
        mmds[s] = mmd2_unbiased(xs, ys)
    return float(mmds.mean()), float(mmds.std()), size


# --- k-NN manifold metrics -------------------------------------------------------------------------


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance from each row of ``x`` to its k-th nearest other row (itself excluded)."""
    out = np.empty(len(x))
    for i in range(0, len(x), _ROWS_PER_CHUNK):
        d = _distances(x[i : i + _ROWS_PER_CHUNK], x)  # (c, N), own row at distance 0
        out[i : i + len(d)] = np.partition(d, k, axis=1)[:, k]  # index 0 is the row itself
    return out


def _in_balls(q: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(Q, C) bool: query j lies in the closed ball of centre i, ‖q_j − c_i‖ ≤ r_i."""
    return np.concatenate(
        [
            _distances(q[i : i + _ROWS_PER_CHUNK], centres) <= radii[None]
            for i in range(0, len(q), _ROWS_PER_CHUNK)
        ]
    )


def precision_recall(x: np.ndarray, y: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2).

    The real manifold is the union of balls around each real row with radius its k-th nearest
    real neighbour distance. precision = share of generated rows inside the real manifold;
    recall = share of real rows inside the generated manifold. Needs k + 1 rows per set.
    Balls are closed (≤), as in the paper and torch-fidelity (prdc uses <; they differ on ties).
    """
    x, y = _pair(x, y, k + 1, f"precision/recall (k = {k})")
    precision = _in_balls(y, x, knn_radii(x, k)).any(1).mean()
    recall = _in_balls(x, y, knn_radii(y, k)).any(1).mean()
    return float(precision), float(recall)


def density_coverage(x: np.ndarray, y: np.ndarray, k: int = DC_K) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, eqs. 3-4) with real k-NN balls, k = 5 by default.

    density = (1 / kM) Σⱼ Σᵢ 1[yⱼ ∈ B(xᵢ, NND_k(xᵢ))]  (≈ 1 for matching distributions, may exceed 1);
    coverage = (1 / N) Σᵢ 1[∃ j: yⱼ ∈ B(xᵢ, NND_k(xᵢ))]. Needs k + 1 real rows and 1 generated.
    """
    metric = f"density/coverage (k = {k})"
    x = check_features(x, "real", k + 1, metric)
    x, y = _pair(x, y, 1, metric)
    inside = _in_balls(y, x, knn_radii(x, k))  # (M, N)
    density = inside.sum() / (k * len(y))
    coverage = inside.any(0).mean()
    return float(density), float(coverage)


def nearest_distances(q: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) distance of each query row to its nearest row of ``ref``, and (Q,) that row's index."""
    q = check_features(q, "query", 1, "nearest distances")
    ref = check_features(ref, "reference", 1, "nearest distances")
    dist, idx = np.empty(len(q)), np.empty(len(q), dtype=np.int64)
    for i in range(0, len(q), _ROWS_PER_CHUNK):
        d = _distances(q[i : i + _ROWS_PER_CHUNK], ref)
        idx[i : i + len(d)] = d.argmin(1)
        dist[i : i + len(d)] = d[np.arange(len(d)), idx[i : i + len(d)]]
    return dist, idx


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) Euclidean distances in float64 from ‖a‖² + ‖b‖² − 2ab.

    Squared distances within 1e-12 (relative) of 0 are round-off and set to exactly 0, so
    duplicate rows tie exactly in the k-NN balls instead of by the noise of the sum.
    """
    norms = (a * a).sum(1)[:, None] + (b * b).sum(1)[None]  # (A, B)
    sq = norms - 2.0 * (a @ b.T)
    sq[sq <= 1e-12 * norms] = 0.0
    return np.sqrt(sq)
