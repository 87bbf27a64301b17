"""``rdm demo [--train]``: the offline first run on Fashion-MNIST with the shipped model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rdm.cli.train import parse_channels
from rdm.demo import DemoConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build the Fashion-MNIST database and sample grids in all three modes",
        description="Build (or resume) the Fashion-MNIST database with the shipped encoder, then "
        "sample image-query, text and unconditional grids with the shipped model. --train "
        "re-creates the model from scratch first (resumable: rerun to continue).",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="default runs/demo")
    p.add_argument(
        "--encoder", default="default", help="encoder spec (default: shipped small CLIP)"
    )
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist[:DIR] (default)")
    p.add_argument("--train", action="store_true", help="re-create the model from scratch")
    p.add_argument("--preset", default="small", help="model preset for --train (default small)")
    p.add_argument(
        "--channels",
        type=parse_channels,
        help="--train: UNet channels per level (default: the preset's own)",
    )
    p.add_argument("--threads", type=int, help="--train: torch CPU threads")
    p.add_argument(
        "--steps",
        type=int,
        default=DemoConfig.steps,
        help=f"training steps for --train (default {DemoConfig.steps}: the shipped model's)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DemoConfig.batch_size,
        help=f"--train (default {DemoConfig.batch_size}: the shipped model's)",
    )
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument(
        "-n",
        "--samples",
        type=int,
        default=DemoConfig.samples_per_prompt,
        help=f"samples per query (default {DemoConfig.samples_per_prompt})",
    )
    p.add_argument("--sampler-steps", type=int, help="default: the run's sample config")
    p.add_argument("--guidance", type=float, help="default: the run's sample config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rdm.demo import run_demo

    run_demo(
        DemoConfig(
            out=args.out,
            encoder=args.encoder,
            source=args.data,
            train=args.train,
            preset=args.preset,
            channels=args.channels,
            threads=args.threads,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            samples_per_prompt=args.samples,
            sampler_steps=args.sampler_steps,
            guidance_scale=args.guidance,
        )
    )
    return 0
