"""Shared steps of the paper-claim experiments (experiments/*.py): train an arm or resume it,
evaluate it with ``rdm eval`` or reuse the report, and write a markdown table and a plot.

Every experiment is one command, ``python experiments/NAME.py``, that can be killed and rerun:
a run already trained to its steps is not trained again, an ``rdm eval`` report whose command
matches is not recomputed. It writes ``results/claims/NAME.md`` (the table, each figure beside
its real-vs-real floor and its extractor, the commands, seed, wall times, machine, and what the
table shows) and ``results/claims/NAME.png``.

Every arm uses the recipe chosen in docs/training.md (issue 7): the 1.86M demo UNet (small
preset, channels 32,64,64), v-prediction on one grey channel, lr 5e-4, EMA 0.999, fp32, batch
64, seed 0, on Fashion-MNIST 32 px with X = the train split and D = the db split (the two halves
of the training file, disjoint by construction; runs/fm-db). Samples: DPM-Solver++ 20 steps,
η = 1, guidance 2, no clipping, the shipped sampler. Figures: the shipped domain classifier's
features, N test-image queries (N = 250 unless ``N`` is set in the environment).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # every path below and in the recorded commands is relative to the repository
RUNS = Path(os.environ.get("RDM_CLAIMS_RUNS", "runs/claims"))
RESULTS = Path("results/claims")
DB = Path(os.environ.get("RDM_CLAIMS_DB", "runs/fm-db"))
N = int(os.environ.get("N", "250"))
SEED = 0

RECIPE = [
    "--data", "fashion-mnist", "--preset", "small", "--channels", "32,64,64",
    "--image-channels", "1", "--prediction", "v_prediction", "--lr", "5e-4",
    "--ema-decay", "0.999", "--mixed-precision", "no", "--batch-size", "64",
    "--seed", str(SEED), "--checkpoint-every", "100", "--sample-every", "0", "--threads", "1",
    "--no-clip-sample",
]  # fmt: skip
SAMPLER = [
    "--sampler", "dpm++", "--steps", "20", "--eta", "1", "--guidance", "2", "--no-clip-sample",
]  # fmt: skip


def recipe_without(flags: list[str]) -> list[str]:
    """RECIPE less the options that ``flags`` sets again."""
    return without(RECIPE, flags)


def without(base: list[str], flags: list[str]) -> list[str]:
    """``base`` less the options that ``flags`` sets again (with their value, where one
    follows), so a recorded command names every option once."""
    given = {f for f in flags if f.startswith("--")}
    out, i = [], 0
    while i < len(base):
        option = base[i]
        takes_value = i + 1 < len(base) and not base[i + 1].startswith("--")
        if option not in given:
            out += base[i : i + 1 + takes_value]
        i += 1 + takes_value
    return out


def rdm(*args: str, log: Path | None = None) -> float:
    """Run ``rdm ARGS`` (one torch thread), its output to ``log``; returns its wall seconds."""
    exe = shutil.which("rdm") or str(Path(sys.executable).with_name("rdm"))
    cmd = [exe, *args]
    print("$ rdm " + shlex.join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def ensure_db(
    db: Path = DB, fraction: float = 0.5, source: str = "fashion-mnist", neighbours: bool = True
) -> Path:
    """A database of ``source``'s db split (the items whose sha1(key) fraction < ``fraction``)
    and (``neighbours``) the neighbours of its train split (the rest of the training file)."""
    if not (db / "manifest.json").is_file():
        rdm("db", "build", source, "--split", "db", "--db-fraction", f"{fraction:g}",
            "--encoder", "default", "--out", str(db))  # fmt: skip
    if neighbours and not (db / "neighbors-train.safetensors").is_file():
        rdm("db", "neighbors", str(db), "--queries", source, "--split", "train", "-k", "20")
    return db


def trained_steps(run: Path) -> int:
    """The last step a run logged (0 when it has not started)."""
    from rdm.train import last_logged_step

    return last_logged_step(run)


@dataclass
class Arm:
    """One trained model: its run directory under RUNS and its ``rdm train`` flags."""

    name: str
    flags: list[str] = field(default_factory=list)  # beyond RECIPE
    steps: int = 600
    db: Path = DB
    continues: Arm | None = None  # a longer run starts as a copy of this shorter one

    @property
    def run(self) -> Path:
        return RUNS / self.name

    @property
    def train_args(self) -> list[str]:
        """``rdm train``'s arguments but ``--out``: the recipe with this arm's flags."""
        args = [*recipe_without(self.flags), "--db", str(self.db), *self.flags]
        return [*args, "--steps", str(self.steps)]

    def train(self) -> None:
        """Train to ``steps`` (resuming what exists); the wall time is added to wall.json."""
        done = trained_steps(self.run)
        if done >= self.steps and (self.run / "ema.safetensors").is_file():
            return
        if self.continues is not None and not (self.run / "config.json").is_file():
            self.continues.train()
            tmp = self.run.with_name(f".tmp-{self.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.continues.run, tmp, symlinks=False)
            tmp.rename(self.run)
        resume = ["--resume"] if (self.run / "config.json").is_file() else []
        done = _checkpoint_state(self.run).get("step", 0) if resume else 0  # where it resumes
        args = self.train_args
        seconds = rdm(
            "train", *args, "--out", str(self.run), *resume, log=RUNS / f"{self.name}.log"
        )
        wall = _read_json(self.run / "wall.json") or {"train_seconds": 0.0, "chunks": []}
        wall["chunks"].append({"from": done, "to": self.steps, "seconds": round(seconds, 1)})
        state = _checkpoint_state(self.run)
        if "train_seconds" in state:  # the loop's own count, summed over killed and resumed chunks
            wall["train_seconds"] = float(state["train_seconds"])
            wall["counted_from"] = int(state.get("train_seconds_from", 0))
        else:  # a run that began before rdm train kept the time: the chunks this script saw
            wall["train_seconds"] += seconds
        wall["command"] = "rdm train " + shlex.join([*args, "--out", str(self.run)])
        (self.run / "wall.json").write_text(json.dumps(wall, indent=1) + "\n")


def _checkpoint_state(run: Path) -> dict:
    """The state.json of the run's last checkpoint (its step, and its training seconds since
    rdm train keeps them), or {} before the first checkpoint."""
    from rdm.checkpoint import latest_checkpoint

    last = latest_checkpoint(run)
    return (_read_json(last / "state.json") or {}) if last is not None else {}


@dataclass
class Eval:
    """One ``rdm eval`` of an arm: its report directory and its flags beyond the sampler's."""

    label: str
    arm: Arm
    flags: list[str] = field(default_factory=list)
    db: Path | None = None  # default: the arm's database
    sampler: list[str] = field(default_factory=lambda: list(SAMPLER))
    n: int = N

    @property
    def out(self) -> Path:
        return RUNS / "eval" / self.slug

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.label)

    @property
    def args(self) -> list[str]:
        db = str(self.db or self.arm.db)
        common = ["--n", str(self.n), "--features", "classifier", "--seed", str(SEED)]
        common = without(common, self.flags)  # e.g. claim 5's --features clip
        return [
            str(self.arm.run),
            "--db",
            db,
            *common,
            "--threads",
            "1",
            *self.sampler,
            *self.flags,
        ]

    def run(self) -> dict:
        """The report (eval.json), computed unless one with the same command exists."""
        report = self.out / "eval.json"
        want = "rdm eval " + shlex.join(self.args)
        old = _read_json(report)
        if old is None or _without_out(old.get("command", "")) != want:
            same = _same_report(want)
            if same is not None and not self.out.exists():  # another claim's table measured it
                self.out.symlink_to(same.resolve())
            else:
                rdm(
                    "eval",
                    *self.args,
                    "--out",
                    str(self.out),
                    log=RUNS / "eval" / f"{self.slug}.log",
                )
        r = _read_json(report)
        if r is None:
            raise SystemExit(f"rdm eval wrote no report into {self.out}")
        return r


def row(label: str, r: dict, *extra: str) -> list[str]:
    """A table row: FD (floor, ratio), KID ± sd, P, R, density, coverage, faithfulness,
    brightness (real), sampling seconds per sample."""
    m, fl = r["metrics"]["model"], r["metrics"]["floor"]
    fa = (r.get("faithfulness") or {}).get("share")
    c = r["colour"]
    per = r["timings"]["sampling_s"] / r["n"]
    return [
        label,
        *extra,
        f"{m['fd']:.1f} ({fl['fd']:.1f}, {m['fd'] / fl['fd']:.1f}x)",
        f"{m['kid']:.3g} ± {m['kid_std']:.2g}",
        f"{m['precision']:.2f}",
        f"{m['recall']:.2f}",
        f"{m['density']:.2f}",
        f"{m['coverage']:.2f}",
        "–" if fa is None else f"{fa:.2f}",
        f"{c['samples']['brightness']:.3f} ({c['real']['brightness']:.3f})",
        f"{per:.2f}",
    ]


METRIC_HEADER = [
    "FD (floor, ratio)", "KID ± sd", "precision", "recall", "density", "coverage",
    "faithfulness", "brightness (real)", "s / sample",
]  # fmt: skip


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def machine() -> str:
    from rdm.evaluation.report import machine as measured_on

    m = measured_on()
    gpu = m["gpu"] or "no GPU"
    return f"{m['cpu']}, {m['cpus']} cores, {gpu}, torch {m['torch']}, Python {m['python']}"


def write(
    name: str, title: str, body: str, arms: list[Arm], evals: list[Eval], started: float
) -> Path:
    """results/claims/NAME.md: the body, then how to reproduce it and where the time went."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", body.rstrip(), "", "## Reproduce", ""]
    ns = "/".join(str(n) for n in sorted({e.n for e in evals})) or str(N)
    lines += ["```", f"python experiments/{name}.py    # N={ns}, seed {SEED}", "```", ""]
    lines += [f"Machine: {machine()}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"this invocation ran {time.time() - started:.0f} s (reused runs and reports cost nothing)."]  # fmt: skip
    lines += ["", "Runs (training wall time, one torch thread, the other core busy):", ""]
    for a in arms:
        w = _read_json(a.run / "wall.json") or {}
        t, since = w.get("train_seconds"), w.get("counted_from")
        took = "time not recorded" if not t else f"{t / 60:.0f} min"
        if t and since:
            took += f" from step {since} on (the earlier steps' time was not recorded)"
        lines.append(f"- `{a.run}`: {trained_steps(a.run)} steps, {took}"
                     f"{'; ' + w['note'] if w.get('note') else ''}; `{w.get('command', 'rdm train ' + shlex.join(a.train_args))}`")  # fmt: skip
    lines += [
        "",
        "Evaluations (`rdm eval`, with the features its command names; floor = real vs real "
        "at the same N):",
        "",
    ]
    for e in evals:
        r = _read_json(e.out / "eval.json") or {}
        lines.append(
            f"- {e.label}: `{r.get('command', '')}` ({r.get('timings', {}).get('total_s', float('nan')):.0f} s)"
        )
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def bar_plot(name: str, labels: list[str], reports: list[dict], title: str) -> Path:
    """FD (with each arm's floor) and recall / precision per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd = [r["metrics"]["model"]["fd"] for r in reports]
    floor = [r["metrics"]["floor"]["fd"] for r in reports]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    x = range(len(labels))
    a.bar(x, fd, color="#4477aa", label="model")
    a.scatter(x, floor, color="k", marker="_", s=400, label="real-vs-real floor", zorder=3)
    a.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    a.set_ylabel("FD (classifier features)")
    a.legend(fontsize=8)
    for key, colour in (("precision", "#66ccee"), ("recall", "#ee6677")):
        b.plot(
            list(x), [r["metrics"]["model"][key] for r in reports], "o-", color=colour, label=key
        )
    b.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _without_out(command: str) -> str:
    """An ``rdm eval`` command without its ``--out DIR`` (where the report went)."""
    words = shlex.split(command)
    if "--out" in words:
        i = words.index("--out")
        del words[i : i + 2]
    return shlex.join(words)


def _same_report(want: str) -> Path | None:
    """An evaluation directory under RUNS/eval whose report came from the same command."""
    for report in sorted((RUNS / "eval").glob("*/eval.json")):
        r = _read_json(report)
        if r is not None and _without_out(r.get("command", "")) == want:
            return report.parent
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
