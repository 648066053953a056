"""``ecomax gr sids``: the semantic IDs a generative retriever decodes, from a GR config's item texts.

    ecomax gr sids --config configs/gr.py:tiny --out DIR [--tokenizer configs/sid.py:VARIANT] [--set k=v ...]

The items of the config's world (``data.root`` or the synthetic KuaiSearch world) become vectors
(``data_pipelines.sid.embeddings.text_vectors``: TF-IDF of the title, brand and category pieces, then LSA
or a random projection to ``sids.dim``), written as ``DIR/items.npy`` + ``DIR/items.ids.npy``; then the
SID tokenizer ``sids.tokenizer`` (a ``configs/sid.py`` variant: RQ-KMeans or RQ-VAE) is fitted on them
exactly as ``ecomax sid build`` does, leaving ``sid_table.npy``, ``item_ids.npy``, ``trie/`` and
``metrics.json`` in ``DIR`` for ``data.sid_table=DIR``. To use embeddings of your own (a text encoder's),
run ``ecomax sid build --embeddings`` instead.
"""

from __future__ import annotations

import argparse
import pathlib


def build_sids(config_spec: str, out: str | pathlib.Path, overrides: list[str] = (), tokenizer: str | None = None,
               tokenizer_overrides: list[str] = ()) -> dict[str, float]:
    """Item texts -> vectors -> a fitted SID tokenizer, table and trie in ``out``; returns the SID metrics."""
    import numpy as np

    from data_pipelines.kuaisearch import examples as ex
    from data_pipelines.kuaisearch.worlds import RecallWorld
    from data_pipelines.sid.embeddings import text_vectors
    from launch.config import load_config
    from launch.sid import build

    config = load_config(config_spec, overrides)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = RecallWorld.load(config.data)
    ids, mask = ex.encode_texts(world.tokenizer, world.corpus.texts, config.data.item_len)
    vectors = text_vectors(ids, mask, world.tokenizer.vocab_size, config.sids.dim, seed=config.seed)
    np.save(out / "items.npy", vectors)
    np.save(out / "items.ids.npy", world.corpus.ids)
    spec = tokenizer or config.sids.tokenizer
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_absolute() and not pathlib.Path(path).exists():
        path = str(pathlib.Path(__file__).resolve().parents[1] / path)  # configs/ of this checkout
    return build(f"{path}:{arg}", out / "items.npy", out, [f"model.dim={config.sids.dim}", *tokenizer_overrides])


def _sids(args: argparse.Namespace) -> int:
    from data_pipelines.sid.embeddings import EmbeddingError
    from launch.config import ConfigError

    from launch.sid import run_reported

    return run_reported("ecomax gr sids",
                        lambda: build_sids(args.config, args.out, args.set, args.tokenizer, args.tokenizer_set),
                        (EmbeddingError, ConfigError, FileNotFoundError, ValueError),
                        f"wrote {args.out} (train with --set data.sid_table={args.out})")


def add_gr_parser(sub) -> None:
    gr = sub.add_parser("gr", help="generative retrieval: build the SID table its decoder generates")
    cmds = gr.add_subparsers(dest="gr_cmd", required=True)
    p = cmds.add_parser("sids", help="item texts -> vectors -> SID tokenizer, table and trie (for data.sid_table)")
    p.add_argument("--config", required=True, help="configs/gr.py:VARIANT")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a GR config value")
    p.add_argument("--tokenizer", default=None, help="a configs/sid.py:VARIANT (default: the config's sids.tokenizer)")
    p.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a tokenizer config value")
    p.set_defaults(func=_sids)
