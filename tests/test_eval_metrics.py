"""Metric arithmetic against reference implementations (torch-fidelity, prdc, scipy) on the same
features, and against closed forms."""

import numpy as np
import pytest

from rdm.evaluation import metrics as M


def _features(seed, n=120, f=8, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(f, f)) / np.sqrt(f)  # correlated, non-commuting covariances
    return (rng.normal(size=(n, f)) @ (np.eye(f) + scale * mix) + shift).astype(np.float32)


# --- Fréchet distance -----------------------------------------------------------------------------


def test_fd_matches_torch_fidelity_and_scipy_sqrtm():
    from scipy import linalg
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    x, y = _features(0).astype(np.float64), _features(1, shift=0.3, scale=0.5).astype(np.float64)
    ours = M.frechet_distance(x, y)
    stats = [{"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)} for a in (x, y)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    # pytorch-fid's form: sqrtm of the (non-symmetric) product, imaginary residue dropped
    covmean = linalg.sqrtm(stats[0]["sigma"] @ stats[1]["sigma"]).real
    d = stats[0]["mu"] - stats[1]["mu"]
    scipy_fd = d @ d + np.trace(stats[0]["sigma"] + stats[1]["sigma"] - 2 * covmean)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours == pytest.approx(scipy_fd, rel=1e-9)
    assert ours > 0.1


def test_fd_of_identical_sets_is_zero():
    x = _features(2, n=50, f=16)
    assert M.frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)


def test_fd_two_gaussians_closed_form():
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ commute, so (Σ₁Σ₂)^½ = Q diag(√ab) Qᵀ and
    # FD = ‖μ₁ − μ₂‖² + Σᵢ (√aᵢ − √bᵢ)²
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = M.frechet_distance_from_stats(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)
    # 1-d: (μ₁ − μ₂)² + (σ₁ − σ₂)²
    assert M.frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0)


def test_fd_from_samples_converges_to_the_formula():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, size=(200_000, 2))
    y = rng.normal([1.0, 0.0], [2.0, 1.0], size=(200_000, 2))
    # ‖(1, 0)‖² + (1 − 2)² + (1 − 1)² = 2
    assert M.frechet_distance(x, y) == pytest.approx(2.0, abs=0.02)


def test_fd_singular_covariance_is_finite():
    # fewer rows than dimensions: rank-deficient covariances, tiny negative eigenvalues
    x, y = _features(5, n=10, f=32), _features(6, n=10, f=32)
    fd = M.frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0


# --- KID -----------------------------------------------------------------------------------------


def test_kid_matches_torch_fidelity_for_the_same_seed():
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = _features(7, n=90), _features(8, n=70, shift=0.2)
    mean, std, size = M.kid(x, y, subsets=10, subset_size=40, seed=11)
    ref = kid_features_to_metric(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(y.astype(np.float64)),
        kid_subsets=10,
        kid_subset_size=40,
        rng_seed=11,
        verbose=False,
    )
    assert size == 40
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    assert std > 0


def test_mmd2_is_unbiased_and_matches_torch_fidelity_kernel():
    from torch_fidelity.metric_kid import kernel_mmd

    x, y = _features(9, n=30).astype(np.float64), _features(10, n=30, shift=1.0).astype(np.float64)
    assert M.mmd2_unbiased(x, y) == pytest.approx(
        kernel_mmd(x, y, kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_coef0=1),
        rel=1e-10,
    )
    # unbiased: over many independent draws of one distribution the mean is ~0 (a biased,
    # diagonal-including estimate is clearly positive here)
    rng = np.random.default_rng(12)
    draws = [
        M.mmd2_unbiased(rng.normal(size=(20, 4)), rng.normal(size=(20, 4))) for _ in range(400)
    ]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))


def test_kid_default_subset_is_the_smaller_set():
    x, y = _features(13, n=60), _features(14, n=25)
    mean, std, size = M.kid(x, y, subsets=3)
    assert size == 12 and std > 0  # half the smaller set: subsets differ
    assert M.kid(_features(13, n=5000), _features(14, n=3000), subsets=1)[2] == 1000


# --- precision / recall / density / coverage ---------------------------------------------------------


def test_precision_recall_match_torch_fidelity_and_prdc():
    import torch
    from prdc import compute_prdc
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    x, y = _features(15, n=150), _features(16, n=110, shift=0.4, scale=0.3)
    precision, recall = M.precision_recall(x, y, k=3)
    tf_p, tf_r = calculate_precision_recall_full(
        torch.from_numpy(y.astype(np.float64)), torch.from_numpy(x.astype(np.float64)), 3
    )
    ref = compute_prdc(real_features=x, fake_features=y, nearest_k=3)
    assert (precision, recall) == pytest.approx((tf_p, tf_r), abs=1e-6)  # float32 means
    assert (precision, recall) == pytest.approx((ref["precision"], ref["recall"]), abs=1e-12)
    assert 0.05 < precision < 0.99 and 0.05 < recall < 0.99  # a test that can tell them apart


def test_density_coverage_match_prdc():
    from prdc import compute_prdc

    x, y = _features(17, n=140), _features(18, n=100, shift=0.3)
    density, coverage = M.density_coverage(x, y)  # k = 5
    ref = compute_prdc(real_features=x, fake_features=y, nearest_k=5)
    assert density == pytest.approx(ref["density"], abs=1e-12)
    assert coverage == pytest.approx(ref["coverage"], abs=1e-12)
    assert 0.05 < coverage < 0.99


def test_a_set_against_itself():
    x = _features(19, n=80)
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.density_coverage(x, x)[1] == 1.0


def test_duplicates_tie_exactly():
    # a collapsed generator: every generated row is the same real row; its ball contains it
    x = _features(20, n=30)
    y = np.repeat(x[:1], 10, axis=0)
    precision, recall = M.precision_recall(x, y)
    assert precision == 1.0
    assert recall == pytest.approx(1 / 30)  # duplicates' radius is 0: only the copied row


def test_knn_radii_against_brute_force():
    x = _features(21, n=40).astype(np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert M.knn_radii(x, 3) == pytest.approx(np.sort(d, axis=1)[:, 3], rel=1e-10)


def test_nearest_distances():
    x, ref = _features(22, n=7), _features(23, n=50)
    dist, idx = M.nearest_distances(x, ref)
    d = np.linalg.norm(x[:, None].astype(np.float64) - ref[None], axis=-1)
    assert (idx == d.argmin(1)).all()
    assert dist == pytest.approx(d.min(1), rel=1e-9)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "needs"),
    [
        (lambda x, y: M.frechet_distance(x[:1], y), "at least 2 real"),
        (lambda x, y: M.precision_recall(x, y[:3]), "at least 4 generated"),
        (lambda x, y: M.density_coverage(x[:5], y), "at least 6 real"),
        (lambda x, y: M.kid(x, y[:1]), "at least 2"),
        (lambda x, y: M.kid(x, y, subset_size=50), "at least 50 real"),
    ],
)
def test_too_few_samples_say_how_many(call, needs):
    x, y = _features(24, n=20), _features(25, n=20)
    with pytest.raises(M.MetricInputError, match=needs):
        call(x, y)


def test_nan_and_width_mismatch_are_refused():
    x, y = _features(26, n=20), _features(27, n=20)
    y[3, 2] = np.nan
    with pytest.raises(M.MetricInputError, match="NaN"):
        M.frechet_distance(x, y)
    with pytest.raises(M.MetricInputError, match="same extractor"):
        M.precision_recall(x, _features(28, n=20, f=4))
