"""The report of one ``rdm eval``: ``eval.json`` (everything) and ``eval.md`` (the tables), with
the command, seed, extractor and machine beside the figures."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from rdm.cpuinfo import cpuinfo_field


def machine() -> dict:
    """Where the figures were measured (CPU model as ``lscpu`` names it, threads, versions)."""
    import torch

    import rdm

    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rdm": rdm.__version__,
        "platform": platform.platform(),
    }


def write(report: dict, out: Path) -> tuple[Path, Path]:
    from rdm.io import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / "eval.json", report), write_text(out / "eval.md", markdown(report))


def stamp(report: dict, command: str) -> dict:
    return {
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **report,
    }


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    m, fl = r["metrics"]["model"], r["metrics"]["floor"]
    ex = r["extractor"]
    real = f"{r['real']['split']} ({r['real']['n']})"
    floor = f"{r['floor']['split']} ({r['floor']['n']}) vs {r['real']['split']}"
    lines = [
        f"# rdm eval: {r['run']}",
        "",
        f"- command: `{r.get('command', '')}`",
        f"- samples: {r['n']} ({r['samples']}{', mode ' + r['mode'] if r.get('mode') else ''})"
        + (f", {_sampling(r['sampling'])}" if r.get("sampling") else ""),
        f"- real reference: {r['real']['source']} split {real}; seed {r['seed']}",
        f"- extractor: **{ex['name']}** ({ex['dim']}-d, weights sha256 {_weights(ex)[:12]}, "
        f"input: {ex['input']})",
        f"- machine: {r['machine']['cpu']}, {r['machine']['torch_threads']} torch thread(s)"
        if "machine" in r
        else "",
        "",
        f"| {ex['name']} features | samples vs real {r['real']['split']} | real floor: {floor} |",
        "|---|---|---|",
        f"| FD | {m['fd']:.4g} | {fl['fd']:.4g} |",
        f"| KID ({m['kid_subsets']} subsets of {m['kid_subset_size']}) | {_kid(m)} | {_kid(fl)} |",
        f"| precision (k = {m['pr_k']}) | {_f(m['precision'])} | {_f(fl['precision'])} |",
        f"| recall (k = {m['pr_k']}) | {_f(m['recall'])} | {_f(fl['recall'])} |",
        f"| density (k = {m['dc_k']}) | {_f(m['density'])} | {_f(fl['density'])} |",
        f"| coverage (k = {m['dc_k']}) | {_f(m['coverage'])} | {_f(fl['coverage'])} |",
        "",
    ]
    if r["n"] <= ex["dim"]:
        lines += [
            f"(N = {r['n']} ≤ {ex['dim']} feature dimensions: the covariances are singular and FD "
            "is biased upwards; compare FDs only at equal N and extractor.)",
            "",
        ]
    c = r["colour"]
    lines += [
        f"| colour (0..1) | samples | real {r['real']['split']} | real {r['floor']['split']} |",
        "|---|---|---|---|",
    ]
    for key in ("brightness", "background", "saturation", "spread", "cast"):
        lines.append(
            f"| {key} | {_f(c['samples'][key])} | {_f(c['real'][key])} | {_f(c['floor'][key])} |"
        )
    lines.append("")
    fa = r.get("faithfulness")
    if fa:
        lines.append(
            f"Faithfulness: {_f(fa.get('share'))} of {fa.get('n', 0)} samples classified as the "
            f"{fa.get('target', 'target')}"
            + (
                f" ({_f(fa['query_class_share'])} as their query's class)"
                if "query_class_share" in fa
                else ""
            )
            + f"; the classifier's accuracy on the real reference is {_f(fa['real_accuracy'])}"
            + (
                f", and copying a conditioning neighbour would score {_f(fa['neighbour_copy_share'])}"
                " (the share of those neighbour images classified as the target)"
                if fa.get("neighbour_copy_share") is not None
                else ""
            )
            + "."
        )
        lines.append("")
    mem = r.get("memorisation")
    if mem and "train" in mem:
        lines += [
            f"| memorisation (nearest {ex['name']}-feature distance) | samples: median (p05) "
            f"| real {mem['baseline']}: median (p05) | share of samples closer than a real image |",
            "|---|---|---|---|",
        ]
        for name in ("train", "database"):
            s = mem[name]
            lines.append(
                f"| nearest {name} image ({s['searched']} searched) | {_f(s['samples']['median'])} "
                f"({_f(s['samples']['p05'])}) | {_f(s['real']['median'])} ({_f(s['real']['p05'])}) "
                f"| {_f(s['share_closer_than_real'])} |"
            )
        lines.append("")
        lines.append(
            "(0.5 = samples are as far from the training images as unseen real images are.)"
        )
    elif mem:
        lines.append(f"Memorisation: {mem.get('note')}")
    return "\n".join(line for line in lines if line is not None) + "\n"


def _weights(ex: dict) -> str:
    return str(ex.get("weights_sha256") or ex.get("encoder", {}).get("weights_sha256"))


def _kid(m: dict) -> str:
    return f"{m['kid']:.4g} ± {m['kid_std']:.2g}"


def _sampling(s: dict) -> str:
    return f"{s['sampler']}-{s['steps']} (η = {s['eta']}), guidance {s['guidance']}"
