"""``ecomax sid build``: item embeddings -> a fitted SID tokenizer, the SID table, its trie and its metrics.

    ecomax sid build --config configs/sid.py:VARIANT --embeddings items.npy --out DIR [--set key=value ...]

``items.npy`` is ``[N, d]`` float32 (``d`` = the config's ``model.dim``); ids are the row numbers unless
``items.ids.npy`` (``[N]`` unique integers) sits beside it. The fit runs as a training run in
``DIR/fit`` (RQ-KMeans: ``levels x iterations`` passes over the items, checkpointed every pass; RQ-VAE:
``train.steps``; an interrupted build resumes there), then every item is assigned
in batches of ``eval.batch_size`` with a progress bar. ``DIR`` then holds ``sid_table.npy`` (``[N, D]``
int32), ``item_ids.npy``, ``sid_table.json``, ``trie/`` (``trie.npz`` + ``trie.json``), ``codebooks.npy``
(``[L, K, d]``; RQ-VAE: in its latent space), ``metrics.json`` and ``metrics.png`` (per-level code usage
and collision-group sizes, ``trainers/evaluators/sid_plots.py``). With ``model.fsq_levels`` (RQ-KMeans) the
SID has one more level, the FSQ code of the final residual (size ``prod(fsq_levels)``), and
``fsq_projection.npy`` (``[d, m]``) and ``fsq.json`` (levels, scale) hold what it needs.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

EXIT_BAD_INPUT = 2


def build(config_spec: str, embeddings: str | pathlib.Path, out: str | pathlib.Path,
          overrides: list[str] = ()) -> dict[str, float]:
    """Fit, assign, write; returns the metrics written to ``out/metrics.json``."""
    import jax
    import numpy as np
    import tqdm

    from data_pipelines.sid.embeddings import open_embeddings
    from data_pipelines.sid.table import write_table
    from data_pipelines.sid.trie import build_trie, save_trie
    from launch.config import ConfigError, load_config
    from trainers.checkpoints import Checkpointer
    from trainers.evaluators.sid_plots import sid_report
    from trainers.loop import Trainer
    from trainers.tasks import EvalContext

    config = load_config(config_spec, [*overrides, f"data.embeddings={embeddings}", "data.num_items=0"])
    m, out = config.model, pathlib.Path(out)
    vectors, ids = open_embeddings(embeddings, m.dim)
    if config.task == "sid_rq_kmeans":  # the fit's length follows from the item count
        passes = math.ceil(len(vectors) / config.train.batch_size)
        config.train.steps = m.levels * m.iterations * passes
        config.train.checkpoint_every = config.train.log_every = passes
    elif config.task != "sid_rq_vae":
        raise ConfigError(f"ecomax sid build fits sid_rq_kmeans or sid_rq_vae configs, not task {config.task!r}")
    trainer = Trainer.create(config, out / "fit")
    trainer.run()

    step = trainer.compiled_step()
    ckpt = Checkpointer(out / "fit" / "checkpoints")
    try:
        state, _ = ckpt.restore(config.train.steps, trainer.abstract_state(step))
    finally:
        ckpt.close()
    ctx = EvalContext(trainer.spec.graphdef, state.params, trainer.mesh, config.train.steps, out, {}, state.extra)
    bs = config.eval.batch_size
    codes = np.concatenate([trainer.task.assign(ctx, vectors[s:s + bs])
                            for s in tqdm.trange(0, len(vectors), bs, desc="assign", unit="batch")])
    sizes = trainer.task.sid_sizes if config.task == "sid_rq_kmeans" else [m.codes] * m.levels
    table = write_table(out, codes, ids, sizes, m.dedup)
    save_trie(build_trie(table, sizes + ([int(table[:, -1].max()) + 1] if m.dedup else []),
                         config.trie.dense_levels), out / "trie")
    np.save(out / "codebooks.npy", np.asarray(jax.device_get(trainer.task.codebooks(state))))
    if config.task == "sid_rq_kmeans" and m.fsq_levels:
        write_fsq(out, config, np.asarray(jax.device_get(state.extra["mse"])))
    metrics = {"items": len(vectors), **sid_report(codes, sizes, out, name="metrics.png"),
               "dedup_size": int(table[:, -1].max()) + 1 if m.dedup else 0}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_fsq(out: pathlib.Path, config, mse) -> None:
    """What the FSQ level of an RQ-KMeans SID needs besides the codebooks: ``fsq_projection.npy`` ``[d, m]``
    and ``fsq.json`` (the levels and the scale ``z = r P / scale``, ``scale = sqrt(mse_L / d)``)."""
    import numpy as np

    from models.semantic_ids import fsq_projection

    m = config.model
    np.save(out / "fsq_projection.npy", fsq_projection(m.dim, len(m.fsq_levels), config.seed))
    scale = float(np.sqrt(max(float(mse[-1]), 1e-30) / m.dim))
    (out / "fsq.json").write_text(json.dumps({"levels": list(m.fsq_levels), "scale": scale,
                                              "seed": config.seed}, indent=2))


def _build(args: argparse.Namespace) -> int:
    from data_pipelines.sid.embeddings import EmbeddingError
    from launch.config import ConfigError

    return run_reported("ecomax sid build", lambda: build(args.config, args.embeddings, args.out, args.set),
                        (EmbeddingError, ConfigError), f"wrote {args.out}")


def run_reported(command: str, fit, errors: tuple[type[Exception], ...], done: str) -> int:
    """Run ``fit() -> SID metrics``; print its summary line, or the error (exit code 2) for bad input."""
    try:
        m = fit()
    except errors as e:
        print(f"{command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{command}: {m['items']} items, collision rate {m['collision_rate']:.4f}, ICR {m['icr']:.4f}, "
          f"largest group {int(m['largest_group'])}; {done}")
    return 0


def add_sid_parser(sub) -> None:
    sid = sub.add_parser("sid", help="semantic IDs: fit a tokenizer, assign items, write the table and trie")
    cmds = sid.add_subparsers(dest="sid_cmd", required=True)
    p = cmds.add_parser("build", help="fit on item embeddings, assign every item, write table, trie, metrics")
    p.add_argument("--config", required=True, help="configs/sid.py:VARIANT")
    p.add_argument("--embeddings", required=True, help="[N, d] float32 .npy (ids: NAME.ids.npy beside it)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_build)
