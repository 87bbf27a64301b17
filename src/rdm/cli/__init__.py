"""The ``rdm`` command: one subcommand per stage, each a thin wrapper over one library call.

Each stage's parser lives in its own module under ``rdm.cli`` and exposes ``register(subparsers)``;
heavy imports (torch, faiss, open_clip) happen inside the command functions, so ``rdm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rdm.errors import RdmError

# modules under rdm.cli that add subcommands, in data-flow order
STAGES = ("encoder", "db", "importer", "train", "sample", "eval", "demo", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"rdm.cli.{stage}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rdm.cli.{stage}":
                raise
            continue  # stage not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RdmError as exc:
        print(f"rdm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rdm {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130
    except OSError as exc:
        # Last resort: the loaders and writers turn the OS errors they expect into RdmErrors that
        # say what to do; one that slips through still gets one line naming the path, no traceback.
        print(f"rdm {args.command}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 1


def _describe_os_error(exc: OSError) -> str:
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = f"{' -> '.join(map(str, paths))}: " if paths else ""
    return f"{where}{exc.strerror or exc}; check the path and its permissions, then rerun"


if __name__ == "__main__":
    sys.exit(main())
