"""``rdm import checkpoint CKPT --config YAML --out RUN``: the official CompVis RDM release
(Lightning checkpoint + config.yaml) as an rdm run directory (rdm.official.checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import", help="import the official CompVis RDM release into rdm's formats"
    )
    sub = parser.add_subparsers(dest="import_command", required=True, metavar="WHAT")
    ckpt = sub.add_parser(
        "checkpoint",
        help="a release model.ckpt + config.yaml -> an rdm run directory",
        description="Convert the release's Lightning checkpoint (read with an allowlisting "
        "unpickler: foreign globals are stubbed, never run) into a run directory that "
        "'rdm sample' loads: the UNet as a diffusers UNet2DConditionModel, the VQ-f4 first "
        "stage as a diffusers VQModel.",
    )
    ckpt.add_argument("checkpoint", type=Path, help="the release's model.ckpt")
    ckpt.add_argument(
        "--config", required=True, type=Path, help="its config.yaml (e.g. models/rdm/imagenet/)"
    )
    ckpt.add_argument("--out", required=True, type=Path, help="run directory to create")
    ckpt.add_argument(
        "--weights",
        choices=("ema", "model", "both"),
        default="ema",
        help="UNet weights to take: the EMA (model_ema.*, what the release samples with; "
        "default), the raw ones (model.diffusion_model.*) or both",
    )
    ckpt.add_argument(
        "--encoder",
        metavar="SPEC",
        help="record this encoder's identity (default: the release's, OpenAI CLIP ViT-B/32 "
        "QuickGELU with its preprocessing, as 'rdm db import' records for the release's parts)",
    )
    ckpt.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out directory"
    )
    ckpt.set_defaults(func=run_checkpoint)


def run_checkpoint(args: argparse.Namespace) -> int:
    from rdm.encoders import load_encoder
    from rdm.official.checkpoint import import_checkpoint

    identity = load_encoder(args.encoder).identity if args.encoder else None
    report = import_checkpoint(
        args.checkpoint,
        args.config,
        args.out,
        weights=args.weights,
        encoder=identity,
        overwrite=args.overwrite,
    )
    if report.stubbed:
        print(
            f"stubbed (not imported, not run) {len(report.stubbed)} global(s) of the checkpoint's "
            f"pickle: {', '.join(report.stubbed)}"
        )
    else:
        print("the checkpoint's pickle named only allowlisted globals")
    names = {"ema": "EMA (model_ema.*)", "model": "raw (model.diffusion_model.*)"}
    taken = " and ".join(f"{names[w]} -> {w}.safetensors" for w in report.weights)
    print(f"UNet: {report.unet_parameters:,} parameters, {taken}")
    print(f"first stage: VQModel, {report.first_stage_parameters:,} parameters -> first_stage/")
    print(f"encoder recorded: {report.config.encoder.get('spec', report.config.encoder)}")
    for note in report.notes:
        print(f"note: {note}")
    flag = "" if "ema" in report.weights else " --weights model"
    print(f"wrote {report.out}; sample with: rdm sample {report.out} --db DIR{flag} ...")
    return 0
