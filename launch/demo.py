"""``ecomax demo``: synthesise ECom-RF-IMMR, train TIGER-FG and its baselines, evaluate, write a report.

The runs are ordinary ``ecomax train`` runs into ``OUT/runs/<name>`` (the synthetic data is built once
into the ecomax cache): the two-stage distillation recipe (``configs/tigerfg.py``) — stage 1 trains the
teacher, stage 2 TIGER-FG distilling from it — then TIGER-FG without the two distillation terms (L_SRD,
L_SDD), and the CLIP-style dual encoder whose item is its image alone. Each is evaluated on the Normal and the Mosaic
test sets. The report (``OUT/report.md``) has the results table, loss curves, Recall@K bars and heat maps
of TIGER-FG's text-guided slots over Mosaic item images. It reads the runs' ``metrics.jsonl`` and final
checkpoints, so it can be re-made from finished runs (``--report-only``).
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
    overrides: tuple[str, ...] = ()  # "{runs}" stands for OUT/runs
    description: str = ""

    def resolved(self, out: pathlib.Path) -> list[str]:
        return [o.replace("{runs}", str(out / "runs")) for o in self.overrides]


RUNS = (
    DemoRun("teacher", "configs/tigerfg.py:demo_teacher", (),
            "stage 1: the distillation teacher (one image encoder for query crops and boxed targets)"),
    DemoRun("tigerfg", "configs/tigerfg.py:demo", ("init_from.teacher.path={runs}/teacher",),
            "TIGER-FG: text-guided slots over the item image, dual distillation from the teacher"),
    DemoRun("tigerfg_no_distill", "configs/tigerfg.py:demo", ("loss.srd=0.", "loss.sdd=0."),
            "TIGER-FG without L_SRD and L_SDD (ablation)"),
    DemoRun("clip", "configs/tigerfg.py:demo", ("model.name=clip",),
            "CLIP-style dual encoder: the item is its full image only"),
)
HEATMAP_RUN = "tigerfg"


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
        config = load_config(str(REPO / run.config), run.resolved(out))
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


def _plot_heatmaps(out: pathlib.Path, heat) -> str:
    """Item images with the slot attention (weighted by the slot pooling weights) and the target box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(heat.images)
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5), squeeze=False)
    for i in range(n):
        image = heat.images[i]
        h, w = image.shape[:2]
        axes[0, i].imshow(image)
        axes[1, i].imshow(image)
        axes[1, i].imshow(np.asarray(heat.heatmap[i]), cmap="jet", alpha=0.5, extent=(0, w, h, 0),
                          interpolation="bilinear")
        x0, y0, x1, y1 = np.asarray(heat.boxes[i]) * [w, h, w, h]
        for ax in axes[:, i]:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
            ax.axis("off")
        latin = "".join(ch for ch in heat.titles[i] if ord(ch) < 128).strip()  # the plot font has no CJK glyphs
        axes[0, i].set_title(latin[:30], fontsize=7)
    fig.suptitle("TIGER-FG slot attention over Mosaic item images (white: the target's box)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "slots.png", dpi=120)
    plt.close(fig)
    return "slots.png"


def _heatmaps(out: pathlib.Path, run: DemoRun):
    """Slot heat maps of the trained run, from its final checkpoint."""
    from launch.config import load_config
    from trainers.checkpoints import Checkpointer
    from trainers.loop import Trainer
    from trainers.state import abstract_state
    from trainers.tasks import EvalContext
    from trainers.evaluators.heatmaps import slot_heatmaps

    workdir = out / "runs" / run.name
    config = load_config(str(REPO / run.config), run.resolved(out))
    trainer = Trainer.create(config, workdir)
    tx, _ = trainer.optimizer()
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state, _ = ckpt.restore(ckpt.steps()[-1], abstract_state(trainer.spec, tx, trainer.shardings(tx)))
    finally:
        ckpt.close()
    ctx = EvalContext(trainer.spec.graphdef, state.params, trainer.mesh, int(state.step), workdir)
    return slot_heatmaps(trainer.task, ctx, layout="mosaic", num_items=4)


def _plot_recall(out: pathlib.Path, evals: dict[str, dict], keys: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(evals), 1)
    for i, (name, record) in enumerate(evals.items()):
        ax.bar(np.arange(len(keys)) + i * width, [record.get(k, 0.0) for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(evals) - 1) / 2, [_label(k) for k in keys], fontsize=8)
    ax.set(ylabel="Recall@K", title="Retrieval on the test set (exact search)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
    plt.close(fig)
    return "recall.png"


def _label(key: str) -> str:
    """``eval/mosaic/exact/recall@1`` -> ``Mosaic R@1``."""
    layout = key.split("/")[1].capitalize()
    return f"{layout} R@{key.split('@')[1]}"


RESULT_KEYS = [f"eval/{layout}/exact/recall@{k}" for layout in ("normal", "mosaic") for k in (1, 5, 10)]


def write_report(out: pathlib.Path, runs: tuple[DemoRun, ...], seconds: dict[str, float]) -> pathlib.Path:
    curves, evals = {}, {}
    for run in runs:
        curves[run.name], evals[run.name] = read_metrics(out / "runs" / run.name)
    keys = RESULT_KEYS
    lines = ["# ecomax demo report", "",
             f"Machine: {platform.machine()}, {platform.system()}; generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    lines += ["## Runs", "", "| run | what | steps | final loss | train time |", "|---|---|---|---|---|"]
    for run in runs:
        last = curves[run.name][-1] if curves[run.name] else {}
        took = f"{seconds[run.name]:.0f} s" if run.name in seconds else "-"
        lines.append(f"| {run.name} | {run.description} | {last.get('step', '-')} | "
                     f"{last.get('loss', float('nan')):.4f} | {took} |")
    lines += ["", "## Retrieval on the synthetic ECom-RF-IMMR test set", "",
              "Recall@K in %, exact search; the gallery is every test item; a query is a crop of its product.",
              "Mosaic item images hold the product among cross-category distractors.", "",
              "| run | " + " | ".join(_label(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, record in evals.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * record.get(k, float('nan')):.1f}" for k in keys) + " |")
    lines += ["", f"![training loss]({_plot_losses(out, curves)})", "",
              f"![retrieval]({_plot_recall(out, evals, keys)})", ""]
    if any(run.name == HEATMAP_RUN for run in runs):
        heat = _heatmaps(out, next(run for run in runs if run.name == HEATMAP_RUN))
        lines += ["## Where TIGER-FG's text-guided slots look", "", f"![slot attention]({_plot_heatmaps(out, heat)})",
                  ""]
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
