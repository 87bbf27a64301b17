"""Export the shipped demo model: a trained run's EMA weights and config into
src/rdm/assets/demo-fashion, with the ``small`` preset's measured sampling defaults
(docs/training.md, "A recipe that converges on a CPU") and the database paths ``rdm demo`` builds.

    python experiments/ship_demo.py --run runs/ship-v-grey --db runs/fm-db

Only ``config.json`` and ``ema.safetensors`` are replaced; the model's README.md is kept (it holds
the measurements, which `rdm eval` writes to results/demo/eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from rdm.config import preset
from rdm.demo import SHIPPED_RUN, DemoConfig
from rdm.io import atomic_write
from rdm.pipeline import RDMPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/ship-v-grey", help="the trained run directory")
    ap.add_argument("--db", default="runs/fm-db", help="the database it was trained with")
    ap.add_argument("--out", default=str(SHIPPED_RUN))
    args = ap.parse_args()

    _require_finished(Path(args.run))
    pipe = RDMPipeline.from_pretrained(args.run, args.db)
    cfg, small = pipe.config, preset("small")
    cfg.sample = dataclasses.replace(small.sample)
    cfg.diffusion = dataclasses.replace(cfg.diffusion, clip_sample=small.diffusion.clip_sample)
    db = DemoConfig().out / "db"  # where `rdm demo` builds D
    cfg.data = dataclasses.replace(
        cfg.data, db=str(db), neighbors=str(db / "neighbors-train.safetensors")
    )
    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        saved = pipe.save_pretrained(Path(tmp) / "pipeline")
        for name in (
            "ema.safetensors",
            "config.json",
        ):  # the weights first: config names their hash
            atomic_write(out / name, lambda tmp, src=saved / name: shutil.copyfile(src, tmp))
    print(f"wrote {out}/config.json and ema.safetensors from {args.run} (step {cfg.train.steps})")


def _require_finished(run: Path) -> None:
    """Refuse a run whose ema.safetensors is not the EMA of its last checkpoint at its final step
    (a run still training, or resumed to more steps, keeps the previous chunk's final weights)."""
    import hashlib
    import json

    from rdm.checkpoint import latest_checkpoint
    from rdm.config import RunConfig

    steps = RunConfig.from_json(run / "config.json").train.steps
    last = latest_checkpoint(run)
    state = json.loads((last / "state.json").read_text()) if last else {}
    ema = hashlib.sha256((run / "ema.safetensors").read_bytes()).hexdigest()
    if state.get("step") != steps or state["weights_sha256"]["ema.safetensors"] != ema:
        raise SystemExit(
            f"{run} has not finished its {steps} steps (last checkpoint: {last}); "
            "let rdm train finish before exporting"
        )


if __name__ == "__main__":
    from rdm.errors import RdmError

    try:
        main()
    except RdmError as exc:  # a missing run, database or damaged file: one line, no traceback
        raise SystemExit(f"ship_demo: {exc}") from None
