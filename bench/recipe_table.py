"""Collect ``rdm eval`` reports into one markdown table (the recipe table of docs/training.md).

    python bench/recipe_table.py runs/recipe/eval/*        # one row per eval directory

Each row: the run's recipe (prediction, channels, lr, schedule, γ, steps), how it was sampled, FD
beside its real-vs-real floor (and the ratio), KID, precision, recall, density, coverage,
faithfulness, and the colour figures beside the real data's. Every figure comes from the
eval.json the directory holds; nothing is computed here but ratios.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rdm.train import last_logged_step


def recipe(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    d, t, m = cfg["diffusion"], cfg["train"], cfg["model"]
    pred = {"epsilon": "ε", "v_prediction": "v", "sample": "x₀"}[d["prediction_type"]]
    extras = [d["schedule"]] + (["ZTSNR"] if d.get("zero_terminal_snr") else [])
    if t.get("lr_schedule", "constant") != "constant":
        extras.append(f"{t['lr_schedule']} lr")
    if t.get("batch_size", 64) != 64:
        extras.append(f"batch {t['batch_size']}")
    if t.get("snr_gamma"):
        extras.append(f"min-SNR γ={t['snr_gamma']:g}")
    steps = last_logged_step(run) or t["steps"]
    widths = ",".join(map(str, m["block_out_channels"]))
    depth = m.get("layers_per_block", 1)
    return {
        "recipe": f"{pred}, {m['in_channels']} ch, lr {t['lr']:g}, {' '.join(extras)}, "
        f"({widths}){f' x{depth} layers' if depth != 1 else ''}, {_parameters(run)}, "
        f"{steps} steps",
    }


def _parameters(run: Path) -> str:
    """The EMA weights' parameter count, read from the safetensors header (no tensor data)."""
    from safetensors import safe_open

    with safe_open(run / "ema.safetensors", "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return f"{n / 1e6:.2f}M"


def _weights(name: str | None) -> str:
    """'' for the main EMA, ' raw' for the model's own weights, else the further EMA's name."""
    if name in (None, "ema"):
        return ""
    return " raw" if name == "model" else f" {name}"


def row(eval_dir: Path) -> str:
    r = json.loads((eval_dir / "eval.json").read_text())
    m, fl, s = r["metrics"]["model"], r["metrics"]["floor"], r.get("sampling") or {}
    c, fa = r["colour"], r.get("faithfulness") or {}
    sampling = (
        f"{s.get('sampler')}-{s.get('steps')} η={s.get('eta')} s={s.get('guidance')}"
        f"{' clip' if s.get('clip_sample') else ''}{_weights(s.get('weights'))}"
        f"{' φ=' + format(s['guidance_rescale'], 'g') if s.get('guidance_rescale') else ''}"
    )
    return (
        f"| {eval_dir.name if eval_dir.name != 'eval' else eval_dir} | {recipe(Path(r['run']))['recipe']} | {sampling} | {r['n']} | "
        f"{m['fd']:.1f} ({fl['fd']:.1f}, {m['fd'] / fl['fd']:.1f}x) | {m['kid']:.4f} | "
        f"{m['precision']:.2f} | {m['recall']:.2f} | {m['density']:.2f} | {m['coverage']:.2f} | "
        f"{fa.get('share', float('nan')):.2f} | {c['samples']['brightness']:.3f} "
        f"({c['real']['brightness']:.3f}) | {c['samples']['cast']:.3f} | "
        f"{c['samples']['spread']:.3f} |"
    )


HEADER = (
    "| eval | recipe | sampler | N | FD (floor, ratio) | KID | P | R | D | C | faithful "
    "| brightness (real) | cast | spread |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv if (Path(a) / "eval.json").is_file()]
    if not dirs:
        print("usage: python bench/recipe_table.py EVAL_DIR ... (directories with eval.json)")
        return 2
    print(HEADER)
    for d in dirs:
        print(row(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
