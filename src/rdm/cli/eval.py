"""``rdm eval RUN --db DIR --n N ...`` and ``rdm eval train-classifier --out DIR``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rdm.errors import RdmError

TRAIN_CLASSIFIER = "train-classifier"
USAGE = (
    "rdm eval RUN --db DIR --n N [--real SOURCE[:SPLIT]] [--mode MODE] [--features NAME] "
    "[--sampler S --steps T --guidance W] [--samples DIR] [--out DIR] [--seed S]\n"
    "       rdm eval train-classifier --out DIR [--data SOURCE] [--epochs E] [--resolution R]"
)


def register(sub: argparse._SubParsersAction) -> None:
    from rdm.conditioning import TEXT_MODES
    from rdm.evaluation.features import EXTRACTORS
    from rdm.evaluation.generate import MODES

    p = sub.add_parser(
        "eval",
        usage=USAGE,
        help="measure sample quality: FD, KID, precision/recall, density/coverage, floor, "
        "faithfulness, memorisation, colour",
        description="Generate N samples from a run (or read --samples DIR) and measure them against "
        "real data with one feature extractor, beside the real-vs-real floor at the same N. "
        f"'rdm eval {TRAIN_CLASSIFIER}' trains the domain classifier behind --features classifier.",
    )
    p.add_argument("run", help=f"run directory written by 'rdm train', or '{TRAIN_CLASSIFIER}'")
    p.add_argument("--db", type=Path, help="database the samples retrieve from")
    p.add_argument("--n", type=int, help="number of samples (and of real images per set)")
    p.add_argument(
        "--real",
        help="real reference SOURCE[:SPLIT] (default: the run's training source, split test)",
    )
    p.add_argument(
        "--floor-split",
        help="split of the floor set (default: train, or test when --real is train)",
    )
    p.add_argument("--mode", choices=MODES, default="image", help="conditioning (default image)")
    p.add_argument("--features", choices=EXTRACTORS, default="classifier")
    p.add_argument("--sampler", choices=("ddim", "dpm++"), help="default: the run's config")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    p.add_argument("--eta", type=float, help="DDIM η (default: the run's config)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        help="clip the predicted x_0 to [-1, 1] while sampling (default: the run's config)",
    )
    p.add_argument(
        "--weights",
        default="ema",
        help="ema (default), model (the raw weights) or a further EMA the run kept "
        "(ema-<kind>-<value>, rdm train --ema-extra)",
    )
    p.add_argument(
        "--guidance-rescale", type=float, help="CFG rescale φ in [0, 1] (Lin et al. 2024)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass")
    p.add_argument("--top-m", type=float, help="--mode unconditional: top-m fraction of p(x̃)")
    p.add_argument("--pool-size", type=int, default=32, help="--mode class-pool: L (default 32)")
    p.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="neighbors",
        help="--mode text: the prompt retrieves the k neighbours (default), is the first "
        "context token before k-1 neighbours (text+neighbors), or the whole context (text)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="text / class-pool prompt (repeatable; "
        "default: the classifier's classes, else the database's distinct captions)",
    )
    p.add_argument("--samples", type=Path, help="evaluate these PNGs instead of sampling")
    p.add_argument("--out", type=Path, help="report directory (eval.md, eval.json, samples/)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also the draws")
    p.add_argument(
        "--memo-n",
        type=int,
        help="training / database images searched for memorisation "
        "(default: all, 2000 for inception; 0 skips memorisation)",
    )
    p.add_argument(
        "--inception-weights",
        type=Path,
        help="FID Inception weights file (default: $RDM_INCEPTION_WEIGHTS)",
    )
    p.add_argument(
        "--classifier", type=Path, help="classifier directory (default: the shipped one)"
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="real-feature cache (default: $RDM_CACHE/eval-features or ~/.cache/rdm/eval-features)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t = p.add_argument_group(f"{TRAIN_CLASSIFIER} options")
    t.add_argument(
        "--data", default="fashion-mnist", help="captioned source (default fashion-mnist)"
    )
    t.add_argument("--train-split", default="db", help="default db (X and test stay unseen)")
    t.add_argument("--test-split", default="test")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--resolution", type=int, default=32, help="input side (the model view)")
    t.add_argument("--min-accuracy", type=float, default=0.9, help="refuse to save below this")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run == TRAIN_CLASSIFIER:
        return _train_classifier(args)
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from rdm.evaluation import report
    from rdm.evaluation.evaluate import EvalRequest, evaluate
    from rdm.evaluation.generate import Sampling
    from rdm.io import require_writable

    if args.n is None and args.samples is None:
        raise RdmError("--n N is required (the number of samples to generate)")
    if args.steps is not None and args.steps < 1:
        raise RdmError(f"--steps {args.steps} must be >= 1")
    if args.out is not None:
        require_writable(args.out, is_dir=True, what="--out")
    sampling = Sampling(
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        clip_sample=args.clip_sample,
        guidance_rescale=args.guidance_rescale,
        weights=args.weights,
        batch_size=args.batch_size,
        top_m=args.top_m,
        pool_size=args.pool_size,
        text_mode=args.text_mode,
    )
    req = EvalRequest(
        run=Path(args.run),
        db=args.db,
        n=args.n,
        real=args.real,
        mode=args.mode,
        features=args.features,
        sampling=sampling,
        samples=args.samples,
        out=args.out,
        seed=args.seed,
        floor_split=args.floor_split,
        memo_n=args.memo_n,
        prompts=args.prompt,
        inception_weights=args.inception_weights,
        classifier=args.classifier,
        cache_dir=None if args.no_cache else args.cache,
    )
    result = report.stamp(evaluate(req), _command())
    text = report.markdown(result)
    if args.out is not None:
        json_path, md_path = report.write(result, args.out)
        print(f"wrote {md_path} and {json_path}")
    print(text)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from rdm.evaluation import classifier
    from rdm.io import require_writable

    if args.out is None:
        raise RdmError(f"rdm eval {TRAIN_CLASSIFIER} needs --out DIR")
    require_writable(args.out.parent, is_dir=True, what="--out")
    settings = classifier.TrainSettings(epochs=args.epochs, lr=args.lr, seed=args.seed)
    model, cfg, record = classifier.train_on_source(
        args.data,
        train_split=args.train_split,
        test_split=args.test_split,
        resolution=args.resolution,
        settings=settings,
    )
    record["command"] = _command()
    from rdm.evaluation.report import machine

    record["machine"] = machine()
    acc = record["test_accuracy"]
    if acc < args.min_accuracy:
        raise RdmError(
            f"test accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}: train longer "
            "(--epochs) or lower the bar; nothing was saved"
        )
    out = classifier.save(model, cfg, record, args.out)
    print(f"test accuracy {acc:.4f} on {record['data']['test_count']} images; wrote {out}")
    return 0


def _command() -> str:
    """The command line as typed (``rdm eval ...``); from Python the argv is not rdm's."""
    if sys.argv and Path(sys.argv[0]).name == "rdm":
        return "rdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "rdm eval (called from Python: rdm.cli.main)"
