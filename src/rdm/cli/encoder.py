"""``rdm encoder train`` (the small default CLIP) and ``rdm encoder eval SPEC``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

HELP = {
    "out": "output directory (an open_clip local dir; replaced atomically)",
    "sources": "image sources to train on (their test splits are left out)",
    "steps": "optimizer steps",
    "seed": "seed for initialisation, batches and augmentation",
    "batch_size": "distinct captions per contrastive batch",
    "class_groups": "images per class caption and step (G groups of one image per class)",
    "class_min_images": "captions shared by at least this many images count as classes",
    "lr": "peak AdamW learning rate",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "weight_decay": "AdamW weight decay (not on gains, biases, temperature)",
    "shift": "random translation augmentation in pixels at model resolution",
    "autocast": "bf16 autocast (fast on CPUs with AMX / AVX-512-bf16)",
    "device": "torch device",
    "evaluate": "measure Fashion-MNIST test retrieval precision after training",
}


def register(subparsers) -> None:
    from rdm.encoder_train import ClipTrainConfig

    parser = subparsers.add_parser("encoder", help="train or evaluate the frozen CLIP encoder")
    sub = parser.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="contrastively train the small default CLIP")
    for f in dataclasses.fields(ClipTrainConfig):
        _add_field(train, f, ClipTrainConfig())
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("eval", help="Fashion-MNIST test retrieval precision of an encoder")
    evaluate.add_argument(
        "spec", nargs="?", default="default", help="encoder spec (default: %(default)s)"
    )
    evaluate.add_argument(
        "--k", type=int, default=4, help="neighbours per query (default: %(default)s)"
    )
    evaluate.add_argument("--data", default="fashion-mnist", help="Fashion-MNIST source spec")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=run_eval)

    convert = sub.add_parser(
        "convert-openai",
        help="convert OpenAI's TorchScript CLIP file (ViT-B-32.pt) once into .safetensors",
        description="torch.load(weights_only=True) refuses OpenAI's TorchScript files; this "
        "explicit one-time step reads one with torch.jit.load and writes its state dict as "
        "safetensors, recognised as OpenAI's weights when its sha256 is OpenAI's.",
    )
    convert.add_argument("checkpoint", type=Path, help="OpenAI's .pt file, e.g. ViT-B-32.pt")
    convert.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    convert.set_defaults(func=run_convert_openai)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, defaults) -> None:
    """One ``--flag`` per config field, typed from its default value."""
    flag = "--" + f.name.replace("_", "-")
    default = getattr(defaults, f.name)
    help_text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: %(default)s)"
    if isinstance(default, bool):
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif isinstance(default, tuple):
        parser.add_argument(flag, nargs="+", default=default, metavar="SPEC", help=help_text)
    else:
        parser.add_argument(flag, type=type(default), default=default, help=help_text)


def run_train(args: argparse.Namespace) -> int:
    from rdm.encoder_train import ClipTrainConfig, train_clip

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClipTrainConfig)}
    values["sources"] = tuple(values["sources"])
    cfg = ClipTrainConfig(**values)
    out = train_clip(cfg, command=shlex.join(["rdm", *sys.argv[1:]]))
    record = json.loads((Path(out) / "train_config.json").read_text())
    print(f"saved {out} ({record['parameters']:,} parameters, {record['train_seconds']} s)")
    for name, value in record.get("metrics", {}).items():
        print(f"  {name}: {value}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from rdm.encoder_train import evaluate_encoder
    from rdm.encoders import describe_identity, load_encoder

    encoder = load_encoder(args.spec, device=args.device)
    print(f"encoder {describe_identity(encoder.identity)}")
    for name, value in evaluate_encoder(encoder, k=args.k, spec=args.data).items():
        print(f"  {name}: {value}")
    return 0


def run_convert_openai(args: argparse.Namespace) -> int:
    from rdm.encoders import META_WEIGHTS, checkpoint_metadata, convert_openai_checkpoint

    out = convert_openai_checkpoint(args.checkpoint, args.out)
    meta = checkpoint_metadata(out)
    if meta.get(META_WEIGHTS):
        arch = meta["rdm_arch"]
        print(f"wrote {out}: OpenAI's {arch} weights; use --encoder '{arch}:{out.resolve()}'")
    else:
        print(
            f"wrote {out}; sha256 {meta['rdm_source_sha256']} is none of OpenAI's releases, so its "
            "weights are not recognised as OpenAI's (use --encoder 'ARCH-quickgelu:FILE' if they "
            "were trained with QuickGELU)"
        )
    return 0
