"""``rdm eval``: sample N images from a run (or read them), and measure them against real data.

One extractor gives every figure: FD, KID ± std, precision / recall, density / coverage — for the
samples and for the real-vs-real floor (two disjoint real sets of the same N: by default the
test split against the training split) — plus faithfulness (classifier), memorisation and
colour statistics. Real-data features are cached (:mod:`rdm.evaluation.cache`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rdm.errors import RdmError
from rdm.evaluation import metrics, stats
from rdm.evaluation.generate import Sampling

SPLITS = ("all", "train", "db", "test")
INCEPTION_MEMO_N = 2000
MIN_N = max(metrics.PR_K, metrics.DC_K) + 1  # the k-NN metrics need k other points


@dataclass
class EvalRequest:
    run: Path
    db: Path | None
    n: int
    real: str | None = None  # SOURCE[:SPLIT]; default: the run's training source, split test
    mode: str = "image"
    features: str = "classifier"
    sampling: Sampling = field(default_factory=Sampling)
    samples: Path | None = None  # read these PNGs instead of sampling
    out: Path | None = None
    seed: int = 0
    floor_split: str | None = None  # default: train (or test when --real is the train split)
    # training / database images searched for memorisation; None: all of them, except for
    # inception (3.5 images/s on one CPU thread, bench/eval_features.py): INCEPTION_MEMO_N
    memo_n: int | None = None
    prompts: list[str] = field(default_factory=list)
    inception_weights: Path | None = None
    classifier: Path | None = None
    cache_dir: Path | None = None
    progress: bool = True


def parse_real(spec: str) -> tuple[str, str]:
    """``SOURCE[:SPLIT]`` -> (source spec, split); the split defaults to ``test``. Source specs
    may contain ':' themselves (``fashion-mnist:/dir``), so only a known split name is split off."""
    head, _, tail = spec.rpartition(":")
    if head and tail in SPLITS:
        return head, tail
    return spec, "test"


def evaluate(req: EvalRequest) -> dict:
    """Run the whole measurement; returns the report (see :func:`rdm.evaluation.report.write`)."""
    from rdm.data import open_source, splits_disjoint
    from rdm.evaluation import generate
    from rdm.evaluation.features import ClassifierExtractor, load_extractor
    from rdm.evaluation.images import View, as_pixels, require_view
    from rdm.pipeline import RDMPipeline

    t0 = time.time()
    pipe = RDMPipeline.from_pretrained(req.run, req.db, weights=req.sampling.weights)
    cfg = pipe.config
    view = View(
        cfg.model.resolution, 1 if not cfg.model.latent and cfg.model.in_channels == 1 else 3
    )
    real_spec, real_split = parse_real(req.real or cfg.data.source)
    if not real_spec:
        raise RdmError(f"{req.run} records no training source: pass --real SOURCE[:SPLIT]")
    source = open_source(real_spec)
    floor_split = req.floor_split or ("test" if real_split == "train" else "train")
    images, records = (
        (None, None) if req.samples is None else generate.read_samples(req.samples, req.n)
    )
    if images is not None:  # refuse a folder of the wrong format before any other work
        require_view(as_pixels(images, "samples"), view, "the samples")
    n = req.n if images is None else len(images)
    if n < MIN_N:  # before any sampling: every metric must be computable
        raise RdmError(
            f"{n} samples are too few: density/coverage (k = {metrics.DC_K}) need at least "
            f"{MIN_N} samples and {MIN_N} real images, precision/recall (k = {metrics.PR_K}) "
            f"{metrics.PR_K + 1}; ask for --n {MIN_N} or more"
        )
    ids = _choose_ids(
        source, real_split, floor_split, n, req.mode == "image" and images is None, req.seed
    )

    extractor = load_extractor(
        req.features,
        encoder=pipe.encoder if req.features == "clip" else None,
        inception_weights=req.inception_weights,
        classifier=req.classifier,
    )
    classifier = extractor if isinstance(extractor, ClassifierExtractor) else None
    if classifier:  # the classifier must know the classes of the real data and of D
        real_classes = classifier.class_ids(
            [source.caption(int(i)) for i in ids["ref"]], f"--real {real_spec}"
        )
        classifier.class_ids(pipe.db.captions, f"database {pipe.db.root}")

    # Samples: generated (and written beside the report) or read from a folder.
    timings = {}
    if images is None:
        queries = (
            [(int(i), source.load(int(i))) for i in ids["queries"]] if req.mode == "image" else []
        )
        prompts = req.prompts or _default_prompts(pipe.db, classifier)
        cond, records = generate.conditionings(
            pipe,
            req.mode,
            n,
            queries=queries,
            prompts=prompts,
            seed=req.seed,
            sampling=req.sampling,
        )
        t = time.time()
        images = generate.sample(pipe, cond, req.seed, req.sampling)
        timings["sampling_s"] = round(time.time() - t, 1)
        if req.out is not None:
            generate.write_samples(images, records, req.out / "samples")
    samples = require_view(as_pixels(images, "samples"), view, "the samples")

    # Features: samples fresh, real sets from the cache.
    t = time.time()
    fake = extractor.features(samples, progress=req.progress, desc="sample features")
    splits = {"ref": real_split, "floor": floor_split}
    real = {
        name: _real_features(extractor, source, splits[name], ids[name], view, name, req)
        for name in ("ref", "floor")
    }
    timings["features_s"] = round(time.time() - t, 1)

    report = {
        "n": n,
        "mode": req.mode if req.samples is None else None,
        "samples": str(req.samples) if req.samples else "generated",
        "sampling": _sampling_record(cfg, req) if req.samples is None else None,
        "seed": req.seed,
        "run": str(req.run),
        "database": {
            "root": str(pipe.db.root),
            "fingerprint": pipe.db.fingerprint,
            "rows": len(pipe.db),
        },
        "real": {"source": source.spec, "split": real_split, "n": len(ids["ref"])},
        "floor": {"source": source.spec, "split": floor_split, "n": len(ids["floor"])},
        "view": view.identity(),
        "extractor": extractor.identity,
        "metrics": {
            "model": distribution_metrics(real["ref"], fake, req.seed),
            "floor": distribution_metrics(real["ref"], real["floor"], req.seed),
        },
    }
    real_pixels = {name: _real_pixels(source, ids[name], view, req) for name in ("ref", "floor")}
    report["colour"] = {
        "samples": stats.colour_stats(samples),
        "real": stats.colour_stats(real_pixels["ref"]),
        "floor": stats.colour_stats(real_pixels["floor"]),
    }
    if classifier:
        report["faithfulness"] = _faithfulness(
            classifier,
            samples,
            records,
            pipe.db,
            source,
            real_classes,
            real_pixels["ref"],
            view,
            req,
        )
    if req.memo_n != 0:
        t = time.time()
        report["memorisation"] = _memorisation(
            extractor, fake, real, source, real_split, floor_split, pipe, view, req, splits_disjoint
        )
        timings["memorisation_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    report["timings"] = timings
    return report


def distribution_metrics(real: np.ndarray, fake: np.ndarray, seed: int) -> dict:
    """FD, KID (mean, std, subset size), precision / recall (k = 3), density / coverage (k = 5)."""
    kid_mean, kid_std, kid_size = metrics.kid(real, fake, seed=seed)
    precision, recall = metrics.precision_recall(real, fake)
    density, coverage = metrics.density_coverage(real, fake)
    return {
        "fd": metrics.frechet_distance(real, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": kid_size,
        "kid_subsets": metrics.KID_SUBSETS,
        "precision": precision,
        "recall": recall,
        "pr_k": metrics.PR_K,
        "density": density,
        "coverage": coverage,
        "dc_k": metrics.DC_K,
    }


# --- real data -----------------------------------------------------------------------------------


def _choose_ids(
    source, real_split: str, floor_split: str, n: int, queries: bool, seed: int
) -> dict[str, np.ndarray]:
    """Disjoint seeded draws from a permutation of the real split: the reference set first, then
    the floor set (when it comes from the same split), then the image-mode queries. The reference
    and floor sets do not depend on the mode, so ``--samples`` reruns compare with the same ones."""
    pool = np.random.default_rng(seed).permutation(source.split_ids(real_split))
    same = floor_split == real_split
    need = n * (1 + same + queries)
    if len(pool) < need:
        parts = ["the reference set"] + ["the floor set"] * same + ["the image queries"] * queries
        raise RdmError(
            f"--real {source.spec}:{real_split} has {len(pool)} items, but {' + '.join(parts)} "
            f"need {need} for --n {n}: lower --n or choose a larger split"
        )
    ids = {"ref": pool[:n], "queries": pool[n * (1 + same) : need]}
    if same:
        ids["floor"] = pool[n : 2 * n]
    else:
        other = np.random.default_rng(seed + 1).permutation(source.split_ids(floor_split))
        if len(other) < n:
            raise RdmError(
                f"the floor split {floor_split} of {source.spec} has {len(other)} items, fewer "
                f"than --n {n}: choose another with --floor-split"
            )
        ids["floor"] = other[:n]
    return {k: np.sort(v) if k != "queries" else v for k, v in ids.items()}


def _real_pixels(source, ids: np.ndarray, view, req: EvalRequest, desc: str = "") -> np.ndarray:
    from rdm.evaluation.images import load_view

    return load_view(source, ids, view, desc or f"real images ({len(ids)})", progress=req.progress)


def _real_features(
    extractor, source, split: str, ids, view, set_name: str, req: EvalRequest
) -> np.ndarray:
    """Features of real items ``ids`` (of ``split``), from the cache or computed and cached."""
    from rdm.evaluation.cache import cached_features, default_dir, ids_sha256

    key = {
        "source": source.spec,
        "split": split,
        "n": len(ids),
        "seed": req.seed,
        "ids_sha256": ids_sha256(ids),
        "set": set_name,
        "view": view.identity(),
        "extractor": extractor.identity,
    }
    features, _ = cached_features(
        req.cache_dir if req.cache_dir is not None else default_dir(),
        key,
        lambda: extractor.features(
            _real_pixels(source, ids, view, req, f"real images: {set_name}"),
            progress=req.progress,
            desc=f"{set_name} features",
        ),
    )
    return features


def _default_prompts(db, classifier) -> list[str]:
    """Prompts for text / class-pool modes: the classifier's classes, else D's distinct captions."""
    if classifier is not None:
        return list(classifier.classes)
    return sorted({c for c in db.captions if c})


def _sampling_record(cfg, req: EvalRequest) -> dict:
    s, r = cfg.sample, req.sampling
    return {
        "sampler": r.sampler or s.sampler,
        "steps": r.steps or s.steps,
        "eta": s.eta if r.eta is None else r.eta,
        "guidance": s.guidance_scale if r.guidance is None else r.guidance,
        "clip_sample": cfg.diffusion.clip_sample if r.clip_sample is None else r.clip_sample,
        "weights": r.weights,
        "guidance_rescale": (
            s.guidance_rescale if r.guidance_rescale is None else r.guidance_rescale
        ),
        **({"top_m": r.top_m} if req.mode == "unconditional" else {}),
        **({"pool_size": r.pool_size} if req.mode == "class-pool" else {}),
        **({"text_mode": r.text_mode} if req.mode == "text" else {}),
    }


# --- faithfulness and memorisation ------------------------------------------------------------------


def _faithfulness(
    classifier, samples, records, db, source, real_classes, real_pixels, view, req
) -> dict:
    """Share of samples classified as the majority class of their conditioning neighbours (image,
    unconditional) or as their prompt's class (text, class-pool). Two references beside it: the
    classifier's accuracy on the real reference, and what a model that copied one of its
    conditioning neighbours would score (:func:`_neighbour_copy_share`)."""
    out = {"real_accuracy": float((classifier.predict(real_pixels) == real_classes).mean())}
    if records is None:
        return {**out, "share": None, "note": "no conditioning.jsonl beside the samples"}
    predicted = classifier.predict(samples)
    captions = db.captions
    neighbour_class = [stats.majority([captions[r] for r in rec["rows"]]) for rec in records]
    target = [rec.get("prompt") or c for rec, c in zip(records, neighbour_class, strict=True)]
    ids = classifier.class_ids([t or "" for t in target if t], "the conditioning")
    target_ids = np.full(len(records), -1)
    target_ids[[i for i, t in enumerate(target) if t]] = ids
    out.update(stats.faithfulness(predicted, target_ids))
    out["neighbour_copy_share"] = _neighbour_copy_share(
        classifier, records, target_ids, db, view, req
    )
    out["target"] = (
        "prompt class" if records[0].get("prompt") else "majority class of the neighbours"
    )
    if records[0].get("query_id") is not None:  # image mode: also the query's own class
        q = classifier.class_ids(
            [source.caption(rec["query_id"]) for rec in records], "the queries"
        )
        out["query_class_share"] = float((predicted == q).mean())
    return out


def _neighbour_copy_share(classifier, records, target_ids, db, view, req) -> float | None:
    """The faithfulness of copying: over every sample with a target and each database row that
    conditioned it, the share of those neighbour images the classifier puts in the sample's
    target class. Retrieval that mixes classes and the classifier's own errors both lower it, so
    it is what a model reproducing its neighbours would reach; None when the neighbours' images
    cannot be read (a database whose source is not on this machine)."""
    from rdm.data import open_source

    has = [i for i, t in enumerate(target_ids) if t >= 0]
    rows = np.array([r for i in has for r in records[i]["rows"]], np.int64)
    if not len(rows):
        return None
    try:
        db_source = open_source(db.source_spec)
    except RdmError:
        return None
    unique, inverse = np.unique(rows, return_inverse=True)
    pixels = _real_pixels(db_source, db.ids[unique], view, req, f"neighbour images ({len(unique)})")
    predicted = classifier.predict(pixels)[inverse]
    target = np.repeat(target_ids[has], [len(records[i]["rows"]) for i in has])
    return float((predicted == target).mean())


def _memorisation(
    extractor, fake, real, source, real_split, floor_split, pipe, view, req, splits_disjoint
) -> dict:
    """Each sample's nearest training image and nearest database image, against the same
    distances of real images that neither set contains."""
    from rdm.data import open_source

    cfg = pipe.config
    train_source = open_source(cfg.data.source) if cfg.data.source else None
    if train_source is None:
        return {"note": f"{req.run} records no training source"}
    refs = {
        "train": (train_source, cfg.data.split, train_source.split_ids(cfg.data.split)),
        "database": (open_source(pipe.db.source_spec), pipe.db.split, np.sort(pipe.db.ids)),
    }
    # the real baseline must be unseen by both sets: the reference set, else the floor set
    baseline = next(
        (
            (name, split)
            for name, split in (("ref", real_split), ("floor", floor_split))
            if splits_disjoint(source.spec, split, train_source.spec, cfg.data.split)
            and splits_disjoint(source.spec, split, pipe.db.source_spec, pipe.db.split)
        ),
        None,
    )
    if baseline is None:
        return {"note": "no real set disjoint from both the training split and the database"}
    out = {"baseline": baseline[1]}
    for name, (src, split, ids) in refs.items():
        cap = INCEPTION_MEMO_N if req.memo_n is None and req.features == "inception" else req.memo_n
        if cap is not None and cap < len(ids):  # a seeded subset, recorded as "searched"
            ids = np.sort(np.random.default_rng(req.seed + 2).choice(ids, cap, replace=False))
        ref = _real_features(extractor, src, split, ids, view, f"memorisation-{name}", req)
        out[name] = stats.memorisation_against(fake, real[baseline[0]], ref, ids)
    return out


def request_record(req: EvalRequest) -> dict:
    d = asdict(req)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
