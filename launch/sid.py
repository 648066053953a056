"""``ecomax sid``: the inputs of a SID tokenizer, and the tokenizer itself.

    ecomax sid build --config configs/sid.py:VARIANT --embeddings items.npy --out DIR [--set key=value ...]
    ecomax sid embed --encoder HF_DIR (--items items.jsonl | --config configs/gr.py:tiny) --out DIR \
        [--batch-size 256] [--max-len 64]
    ecomax sid pairs (--config configs/gr.py:tiny | --root KUAISEARCH_DIR) --out DIR/pairs.npy \
        [--max-per-session 50] [--seed 0] [--splits train] [--embeddings items.npy]

``build``:

``items.npy`` is ``[N, d]`` float32 (``d`` = the config's ``model.dim``); ids are the row numbers unless
``items.ids.npy`` (``[N]`` unique integers) sits beside it. The fit runs as a training run in
``DIR/fit`` (RQ-KMeans: ``levels x iterations`` passes over the items, checkpointed every pass; RQ-VAE:
``train.steps``; an interrupted build resumes there), then every item is assigned
in batches of ``eval.batch_size`` with a progress bar. ``DIR`` then holds ``sid_table.npy`` (``[N, D]``
int32), ``item_ids.npy``, ``sid_table.json``, ``trie/`` (``trie.npz`` + ``trie.json``), ``codebooks.npy``
(``[L, K, d]``; RQ-VAE: in its latent space), ``metrics.json`` and ``metrics.png`` (per-level code usage
and collision-group sizes, ``trainers/evaluators/sid_plots.py``). With ``model.fsq_levels`` (RQ-KMeans) the
SID has one more level, the FSQ code of the final residual (size ``prod(fsq_levels)``), and
``fsq_projection.npy`` (``[d, m]``) and ``fsq.json`` (levels, scale) hold what it needs. With
``model.opq_subspaces`` (OneSearch-V2) the SID has that many more levels, the OPQ sub-codes of the final residual
(``opq.npz``: rotation and centroids).

``embed``: item texts through a pretrained Hugging Face text encoder (a BERT-family folder of
``config.json`` + ``model.safetensors`` + ``tokenizer.json``, e.g. all-MiniLM-L6-v2), mean pooling over the
real tokens then L2 normalisation, as sentence-transformers does, in batches with a progress bar. The
items come from ``--items`` (a KuaiSearch ``items.jsonl``: ``data_pipelines.sid.items``) or from the items
of a KuaiSearch config's world (``data.root``, or its synthetic world). Writes ``DIR/items.npy``
(``[N, hidden]`` float32, unit rows), ``DIR/items.ids.npy`` (``[N]`` int64 item ids) and ``DIR/embed.json``
(encoder, max_len, counts): the input of ``sid build --embeddings DIR/items.npy``.

``pairs``: co-engaged item pairs from the recall sessions of a config's world or of a KuaiSearch folder
(``data_pipelines.sid.pairs.session_pairs``: the rule is in that module), written as a ``[P, 2]`` int64
``.npy`` of item ids; with ``--embeddings``, engaged items outside that id map leave the sessions before
pairing (counted).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

from models.sentence_encoder import encode_texts  # noqa: F401  (the shared encoder; re-exported)

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
    sizes = trainer.task.sid_sizes
    if config.task == "sid_rq_kmeans" and m.opq_subspaces:
        codes = add_opq_codes(out, config, vectors, codes, np.asarray(jax.device_get(trainer.task.codebooks(state))))
        sizes = [*sizes, *[m.opq_codes] * m.opq_subspaces]
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


def add_opq_codes(out: pathlib.Path, config, vectors, codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """OneSearch-V2's SID tail: OPQ (``models.semantic_ids.opq_fit``) of the residual the k-means levels leave,
    fitted on ``model.opq_fit_rows`` evenly spaced items, every item encoded; writes ``opq.npz`` (``rotation
    [d, d]``, ``centroids [M, K, d / M]``). -> the codes with ``M`` more columns."""
    import jax
    import tqdm

    from models.semantic_ids import opq_encode, opq_fit

    m = config.model
    residual = np.asarray(vectors, np.float32) - codebooks[np.arange(m.levels), codes[:, :m.levels]].sum(1)
    rows = np.unique(np.linspace(0, len(residual) - 1, min(len(residual), m.opq_fit_rows)).astype(np.int64))
    print(f"ecomax sid build: OPQ {m.opq_subspaces} x {m.opq_codes} on the residuals of {len(rows)} items",
          file=sys.stderr)
    opq = opq_fit(residual[rows], jax.random.key(config.seed), subspaces=m.opq_subspaces, codes=m.opq_codes,
                  iterations=m.opq_iterations)
    np.savez(out / "opq.npz", rotation=np.asarray(opq.rotation), centroids=np.asarray(opq.centroids))
    bs = config.eval.batch_size
    tail = np.concatenate([np.asarray(opq_encode(residual[s:s + bs], opq))
                           for s in tqdm.trange(0, len(residual), bs, desc="opq", unit="batch")])
    return np.concatenate([codes, tail.astype(codes.dtype)], 1)


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


# --- embed: item texts -> text-encoder vectors (models/sentence_encoder.py) ------------------------------


def config_items(config_spec: str, overrides: list[str] = ()) -> tuple[np.ndarray, list[str], str]:
    """``(ids [N] int64, texts, source)``: the item corpus of a KuaiSearch config's world (``data.root`` or
    the synthetic world), with the recall task's item text (``examples.item_text``)."""
    from data_pipelines.kuaisearch import examples as ex
    from data_pipelines.kuaisearch.worlds import data_root
    from launch.config import load_config

    root = data_root(load_config(config_spec, list(overrides)).data)
    corpus = ex.ItemCorpus.from_rows(ex.read_rows(root, "items"))
    return corpus.ids, corpus.texts, str(root)


def embed_items(encoder: str | pathlib.Path, out: str | pathlib.Path, *, items: str | None = None,
                config_spec: str | None = None, overrides: list[str] = (), batch_size: int = 256,
                max_len: int = 64) -> dict:
    """Write ``out/items.npy`` ``[N, hidden]`` float32, ``out/items.ids.npy`` ``[N]`` int64 and
    ``out/embed.json`` for the items of ``items`` (a jsonl) or of ``config_spec``'s world; returns the summary."""
    from data_pipelines.sid.items import read_item_texts

    if (items is None) == (config_spec is None):
        raise ValueError("give exactly one of --items ITEMS.jsonl and --config CONFIG")
    if items is not None:
        ids, texts = read_item_texts(items)
        source = str(items)
    else:
        ids, texts, source = config_items(config_spec, overrides)
    vectors = encode_texts(encoder, texts, batch_size=batch_size, max_len=max_len)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "items.npy", vectors)
    np.save(out / "items.ids.npy", np.asarray(ids, np.int64))
    summary = {"items": len(ids), "dim": int(vectors.shape[1]), "encoder": str(encoder), "source": source,
               "max_len": max_len, "pooling": "mean over real tokens, then L2", "text": "title brand categories"}
    (out / "embed.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def _embed(args: argparse.Namespace) -> int:
    from data_pipelines.kuaisearch.schema import KuaiSearchFormatError
    from data_pipelines.sid.items import ItemTextError
    from launch.config import ConfigError
    from models.hf_import import HFImportError

    try:
        s = embed_items(args.encoder, args.out, items=args.items, config_spec=args.config, overrides=args.set,
                        batch_size=args.batch_size, max_len=args.max_len)
    except (ItemTextError, KuaiSearchFormatError, HFImportError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ecomax sid embed: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"ecomax sid embed: {s['items']} items -> [{s['items']}, {s['dim']}] float32; wrote {args.out}/items.npy "
          f"(+ items.ids.npy)")
    return 0


# --- pairs: co-engaged items of the recall sessions -------------------------------------------------------


def write_session_pairs(out: str | pathlib.Path, *, config_spec: str | None = None, root: str | None = None,
                        overrides: list[str] = (), max_per_session: int = 50, seed: int = 0,
                        splits: list[str] | None = ("train",), embeddings: str | None = None) -> dict:
    """``session_pairs`` of a config's world or a KuaiSearch folder, written to ``out`` (a ``.npy``)."""
    from data_pipelines.kuaisearch import examples as ex
    from data_pipelines.sid.embeddings import open_embeddings
    from data_pipelines.sid.pairs import save_pairs, session_items, session_pairs

    if (root is None) == (config_spec is None):
        raise ValueError("give exactly one of --config CONFIG and --root KUAISEARCH_DIR")
    if root is None:
        from data_pipelines.kuaisearch.worlds import data_root
        from launch.config import load_config

        root = data_root(load_config(config_spec, list(overrides)).data)
    elif not pathlib.Path(root).is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    rows = ex.read_rows(root, "recall")
    keep = None if embeddings is None else open_embeddings(embeddings)[1]
    sessions, dropped = session_items(rows, splits, keep)
    pairs = session_pairs(rows, max_per_session=max_per_session, seed=seed, splits=splits, items=keep)
    save_pairs(out, pairs)
    return {"sessions": len(sessions), "sessions_with_pairs": sum(len(v) > 1 for v in sessions.values()),
            "pairs": len(pairs), "items": len(np.unique(pairs)), "dropped_engagements": dropped, "source": str(root)}


def _pairs(args: argparse.Namespace) -> int:
    from data_pipelines.kuaisearch.schema import KuaiSearchFormatError
    from data_pipelines.sid.embeddings import EmbeddingError
    from launch.config import ConfigError

    splits = None if args.splits == "all" else [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        s = write_session_pairs(args.out, config_spec=args.config, root=args.root, overrides=args.set,
                                max_per_session=args.max_per_session, seed=args.seed, splits=splits,
                                embeddings=args.embeddings)
    except (KuaiSearchFormatError, EmbeddingError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ecomax sid pairs: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    outside = f", {s['dropped_engagements']} engagements outside --embeddings left out" if args.embeddings else ""
    print(f"ecomax sid pairs: {s['pairs']} pairs over {s['items']} items from {s['sessions_with_pairs']} of "
          f"{s['sessions']} sessions{outside}; wrote {args.out}")
    return 0


def add_sid_parser(sub) -> None:
    sid = sub.add_parser("sid", help="semantic IDs: item vectors and co-engaged pairs; fit a tokenizer, "
                         "write the table and trie")
    cmds = sid.add_subparsers(dest="sid_cmd", required=True)
    p = cmds.add_parser("build", help="fit on item embeddings, assign every item, write table, trie, metrics")
    p.add_argument("--config", required=True, help="configs/sid.py:VARIANT")
    p.add_argument("--embeddings", required=True, help="[N, d] float32 .npy (ids: NAME.ids.npy beside it)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_build)

    p = cmds.add_parser("embed", help="item texts -> text-encoder vectors (items.npy + items.ids.npy)")
    p.add_argument("--encoder", required=True, help="a Hugging Face folder: config.json, model.safetensors, "
                   "tokenizer.json (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--items", default=None, help="a KuaiSearch items.jsonl")
    p.add_argument("--config", default=None, help="or a KuaiSearch config (configs/gr.py:tiny): its world's items")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --config value")
    p.add_argument("--out", required=True, help="the folder for items.npy, items.ids.npy, embed.json")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-len", type=int, default=64, help="tokens per item text (longer ones are truncated)")
    p.set_defaults(func=_embed)

    p = cmds.add_parser("pairs", help="co-engaged item pairs of the recall sessions (pairs.npy)")
    p.add_argument("--config", default=None, help="a KuaiSearch config (configs/gr.py:tiny): its world's sessions")
    p.add_argument("--root", default=None, help="or a KuaiSearch folder (raw JSONL or prepared)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --config value")
    p.add_argument("--out", required=True, help="the .npy to write ([P, 2] int64 item ids)")
    p.add_argument("--max-per-session", type=int, default=50, help="pairs kept per session (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-session draw")
    p.add_argument("--splits", default="train", help="comma-separated recall splits, or 'all' (default: train)")
    p.add_argument("--embeddings", default=None, help="keep only items in this items.npy's id map")
    p.set_defaults(func=_pairs)
