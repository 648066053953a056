"""``ecomax demo``: generate data, train, evaluate and write a Markdown report with plots.

Each demo run is an ordinary ``ecomax train`` into ``OUT/runs/<name>``; the report reads their
``metrics.jsonl`` files, so it can be re-made from finished runs (``--report-only``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DemoRun:
    name: str
    config: str  # configs/NAME.py:ARG, relative to the repository
    overrides: tuple[str, ...] = ()
    description: str = ""


RUNS = (
    DemoRun("two_tower", "configs/two_tower.py:demo", (),
            "image–text two-tower, symmetric InfoNCE, on procedural shapes (text -> image retrieval)"),
)


def read_metrics(workdir: pathlib.Path) -> tuple[list[dict], dict]:
    """(training records, the last evaluation record) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    return train, (evals[-1] if evals else {})


def train_runs(out: pathlib.Path, runs: tuple[DemoRun, ...]) -> dict[str, float]:
    from launch.config import load_config
    from trainers.loop import train

    seconds = {}
    for run in runs:
        print(f"ecomax demo: training {run.name} ({run.config})")
        config = load_config(str(REPO / run.config), run.overrides)
        start = time.perf_counter()
        train(config, out / "runs" / run.name)
        seconds[run.name] = time.perf_counter() - start
    return seconds


def _plot_losses(out: pathlib.Path, curves: dict[str, list[dict]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, records in curves.items():
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return "loss.png"


def _plot_recall(out: pathlib.Path, evals: dict[str, dict], keys: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(evals), 1)
    for i, (name, record) in enumerate(evals.items()):
        ax.bar(np.arange(len(keys)) + i * width, [record.get(k, 0.0) for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(evals) - 1) / 2, [k.split("/")[-1] for k in keys])
    ax.set(ylabel="value", title="Retrieval on the held-out set", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
    plt.close(fig)
    return "recall.png"


def write_report(out: pathlib.Path, runs: tuple[DemoRun, ...], seconds: dict[str, float]) -> pathlib.Path:
    curves, evals = {}, {}
    for run in runs:
        curves[run.name], evals[run.name] = read_metrics(out / "runs" / run.name)
    keys = sorted({k for record in evals.values() for k in record
                   if "/exact/" in k and ("hit_rate@" in k or "recall@" in k or k.endswith("mrr"))},
                  key=lambda k: (k.split("/exact/")[0], k.split("/")[-1].split("@")[0],
                                 int(k.split("@")[1]) if "@" in k else 0))
    lines = ["# ecomax demo report", "",
             f"Machine: {platform.machine()}, {platform.system()}; generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    lines += ["## Runs", "", "| run | what | steps | final loss | train time |", "|---|---|---|---|---|"]
    for run in runs:
        last = curves[run.name][-1] if curves[run.name] else {}
        took = f"{seconds[run.name]:.0f} s" if run.name in seconds else "-"
        lines.append(f"| {run.name} | {run.description} | {last.get('step', '-')} | "
                     f"{last.get('loss', float('nan')):.4f} | {took} |")
    lines += ["", "## Retrieval results (exact search over the held-out gallery)", "",
              "| run | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for name, record in evals.items():
        lines.append(f"| {name} | " + " | ".join(f"{record.get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", f"![training loss]({_plot_losses(out, curves)})", "",
              f"![retrieval]({_plot_recall(out, evals, keys)})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_demo(out: pathlib.Path, report_only: bool = False) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    seconds = {} if report_only else train_runs(out, RUNS)
    report = write_report(out, RUNS, seconds)
    print(f"ecomax demo: report written to {report.resolve()}")
    return report


def _demo(args: argparse.Namespace) -> int:
    run_demo(pathlib.Path(args.out), args.report_only)
    return 0


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthesise data, train, evaluate and write a report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--report-only", action="store_true", help="re-make the report from finished runs")
    p.set_defaults(func=_demo)
