"""TIGER-FG ablation on synthetic ECom-RF-IMMR: TIGER-FG, TIGER-FG without SRD and SDD, and the CLIP-style
dual encoder, trained with one config and seed, then Normal and Mosaic Recall@1/5/10 as a Markdown table.

    python benchmarks/tigerfg_ablation.py --size small [--set train.steps=300] [--variants tigerfg,clip]

The paper's direction to reproduce: TIGER-FG beats the CLIP-style dual encoder on Mosaic Recall@1
(the item image holds several products; only the item's text says which one is for sale).

For the demo report: ``run_ablation(...)`` returns ``{variant: Result}`` with the metrics and (for
TIGER-FG) ``slot_heatmaps`` of a few Mosaic test items; ``markdown_table(results)`` formats them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = {
    "tigerfg": ("TIGER-FG", ()),
    "no_distill": ("TIGER-FG w/o SRD+SDD", ("loss.srd=0.", "loss.sdd=0.")),
    "clip": ("CLIP-style dual encoder", ("model.name=clip",)),
    "late_fusion": ("Late fusion (image CLS + text)", ("model.name=late_fusion",)),
}
DEFAULT_VARIANTS = ("tigerfg", "no_distill", "clip")


@dataclasses.dataclass
class Result:
    name: str
    metrics: dict[str, float]
    train_seconds: float
    final_loss: float
    heatmaps: object | None = None  # trainers.evaluators.heatmaps.HeatMaps for TIGER-FG variants


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on {dev.platform} ({len(jax.devices())} device(s))"


def train_variant(config, workdir: pathlib.Path, *, heatmap_items: int = 4) -> Result:
    """Train ``config`` with the trainer's own step, data and evaluator (no checkpoints); evaluate at the end."""
    import jax

    from trainers.loop import Trainer
    from trainers.state import init_state
    from trainers.tasks import EvalContext
    from trainers.evaluators.heatmaps import slot_heatmaps

    trainer = Trainer.create(config, workdir)
    step = trainer.compiled_step()
    step_fn, tx, shardings = step.fn, step.tx, step.shardings
    state = init_state(trainer.task.build_model, config.seed, tx, shardings)
    batches, batch_sh = iter(trainer.data()), trainer.batch_shardings()
    t0, loss = time.perf_counter(), float("nan")
    for step in range(1, config.train.steps + 1):
        state, metrics = step_fn(state, trainer.global_batch(next(batches), batch_sh))
        if step % config.train.log_every == 0 or step == config.train.steps:
            loss = float(jax.device_get(metrics["loss"]))
            print(f"  step {step}/{config.train.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    metrics = trainer.evaluate(state, config.train.steps)
    heat = None
    if config.model.name == "tigerfg" and heatmap_items:
        ctx = EvalContext(trainer.spec.graphdef, state.params, trainer.mesh, config.train.steps, trainer.workdir)
        heat = slot_heatmaps(trainer.task, ctx, layout="mosaic", num_items=heatmap_items)
    return Result(config.model.name, metrics, seconds, loss, heat)


def run_ablation(size: str = "small", *, variants=DEFAULT_VARIANTS, overrides=(), seed: int = 0,
                 workdir: str | os.PathLike | None = None, heatmap_items: int = 4) -> dict[str, Result]:
    """Train and evaluate each variant of ``configs/tigerfg.py:<size>`` (same seed and data)."""
    from launch.config import load_config

    root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="tigerfg_ablation_"))
    results = {}
    for key in variants:
        label, extra = VARIANTS[key]
        config = load_config(f"{REPO / 'configs/tigerfg.py'}:{size}", [f"seed={seed}", *overrides, *extra])
        print(f"== {label}", flush=True)
        res = train_variant(config, root / key, heatmap_items=heatmap_items)
        res.name = label
        results[key] = res
    return results


def markdown_table(results: dict[str, Result], *, title: str = "") -> str:
    cols = [f"{layout} R@{k}" for layout in ("Normal", "Mosaic") for k in (1, 5, 10)]
    lines = ([f"{title}", ""] if title else []) + [
        "| model | " + " | ".join(cols) + " | train s | final loss |",
        "|---|" + "---|" * (len(cols) + 2)]
    for res in results.values():
        vals = [res.metrics.get(f"{layout.lower()}/exact/recall@{k}", float("nan")) * 100
                for layout in ("Normal", "Mosaic") for k in (1, 5, 10)]
        lines.append(f"| {res.name} | " + " | ".join(f"{v:.1f}" for v in vals)
                     + f" | {res.train_seconds:.0f} | {res.final_loss:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    results = run_ablation(args.size, variants=args.variants.split(","), overrides=args.set, seed=args.seed,
                           workdir=args.workdir, heatmap_items=0)
    sets = " ".join(args.set) or "none"
    print()
    print(markdown_table(results, title=f"TIGER-FG ablation, configs/tigerfg.py:{args.size} (overrides: {sets}), "
                                        f"seed {args.seed}, exact search, test split; machine: {machine()}; "
                                        f"total {time.time() - t0:.0f}s"))


if __name__ == "__main__":
    main()
