"""ECom-RF-IMMR as the TIGER-FG task reads it: the dataset folder, the tokenizer, the training source with
a negative item text per example, and the evaluation sets.

    root = dataset_root(config.data)       # data.root, else synthesised once into the ecomax cache
    tok = load_tokenizer(config.data.tokenizer or root / "spm.model", max_vocab=config.model.text.vocab_size)
    source, transform = training_source(open_split(root / "data", "train"), base_transform, config.data, ...)

A dataset folder holds ``data/`` (the built ArrayRecord dataset, ``builder.build``) and ``spm.model`` (a
sentencepiece model on the training item texts). With ``data.root`` empty it is synthesised once per
parameter set (``synthetic.synthesize`` + ``builder.build`` + the tokenizer, ``data_pipelines.cache``).

Negative text per example (keys ``neg_ids``, ``neg_mask``, ``neg_index``, ``NegativeTextTransform``): with
``data.mosaic_grouping`` a training record on a mosaic canvas takes the text of another target of the
same canvas (a product of another category: the text must select the target); other records take the
text of a random other training record. With ``data.mosaic_batches`` the training order itself is
mosaic-grouped (``pipeline.MosaicGroupedSource``: the items of one canvas share a global batch, as the
paper trains; the loader's index shuffle must then be off). ``data.mosaic_training=False`` drops the
mosaic-canvas training records (the paper's "w/o Mosaic" setting).

Pure data code: nothing of ``trainers/`` or ``models/``.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines.ecom_rf_immr import schema
from data_pipelines.ecom_rf_immr.pipeline import MosaicGroupedSource

SYNTHETIC_VERSION = 1  # part of the cache key: bump when the synthetic build changes


def record_text(record: Mapping[str, Any]) -> str:
    """The structured item text of a record (title, category, attributes; ``schema.item_text``)."""
    return schema.item_text(record["title"], list(record["category"]), list(record["attribute_keys"]),
                            list(record["attribute_values"]))


class Indexed:
    """A view of ``source`` at ``indices`` whose records also carry ``_index`` (the position in ``source``)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[int(i)])
        return {**self.source[j], "_index": j}


class NegativeTextTransform(grain.transforms.RandomMap):
    """The ECom-RF-IMMR ``RecordTransform`` plus a negative item text per example (tokenised by the base's
    cached ``encode_text``).

    Adds ``neg_ids [s] int32``, ``neg_mask [s] bool``, ``neg_index [] int64``: the text of another
    target on the same mosaic canvas (``mosaic_grouping`` and a canvas record) or of a random other
    training record (another product).
    """

    def __init__(self, base, texts: Mapping[int, str], groups: np.ndarray, item_index: np.ndarray, *,
                 mosaic_grouping: bool):
        self.base, self.texts = base, dict(texts)
        self.groups, self.item_index = np.asarray(groups), np.asarray(item_index)
        self.mosaic_grouping = mosaic_grouping
        self.members: dict[int, np.ndarray] = {}
        if mosaic_grouping:
            order = np.argsort(self.groups, kind="stable")
            for g, start, count in zip(*np.unique(self.groups[order], return_index=True, return_counts=True)):
                if g >= 0:
                    self.members[int(g)] = order[start:start + count]

    def _negative(self, index: int, rng: np.random.Generator) -> int:
        own = self.item_index[index]
        group = self.members.get(int(self.groups[index]))
        if group is not None:
            others = group[self.item_index[group] != own]
            if len(others):
                return int(others[rng.integers(len(others))])
        for _ in range(16):
            j = int(rng.integers(len(self.item_index)))
            if self.item_index[j] != own:
                return j
        return (index + 1) % len(self.item_index)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = self.base(element, rng)
        self.base.clock.start()
        j = self._negative(int(element["_index"]), rng)
        ids, mask = self.base.encode_text(self.texts[int(self.item_index[j])])
        example.update(neg_ids=ids, neg_mask=mask, neg_index=np.int64(self.item_index[j]))
        self.base.clock.mark("negative_text")
        return example

    def __call__(self, element, rng: np.random.Generator | None = None):
        return self.random_map(element, rng if rng is not None else np.random.default_rng(0))


def build_synthetic(folder: pathlib.Path, *, items: int, queries_per_item: int, seed: int, image_size: int,
                    vocab_size: int, image_format: str = "JPEG") -> None:
    """synthesize + build + a sentencepiece model on the training item texts, into ``folder``."""
    from data_pipelines.ecom_rf_immr import build, synthesize  # noqa: PLC0415
    from data_pipelines.ecom_rf_immr.builder import open_split  # noqa: PLC0415
    from data_pipelines.tokenizer import train_sentencepiece  # noqa: PLC0415

    manifest = synthesize(folder / "raw", items=items, queries_per_item=queries_per_item, seed=seed,
                          image_size=image_size, image_format=image_format)
    build(manifest, folder / "data", workers=1, progress=False)
    train = open_split(folder / "data", "train")
    texts = sorted({record_text(r) for r in train})
    train_sentencepiece(texts, folder / "spm.model", vocab_size=vocab_size, seed=seed)


def dataset_root(data: Any) -> pathlib.Path:
    """``data.root`` (a folder with ``data/`` and ``spm.model``), else the synthetic dataset of ``data``
    (``num_items``, ``queries_per_item``, ``synth_seed``, ``synth_image_size``, ``synth_image_format``,
    ``vocab_size``), built once."""
    if data.get("root"):
        return pathlib.Path(data.root)
    from data_pipelines.cache import cached_dataset  # noqa: PLC0415

    params = {"items": data.num_items, "queries_per_item": data.queries_per_item, "seed": data.synth_seed,
              "image_size": data.synth_image_size, "vocab_size": data.vocab_size, "version": SYNTHETIC_VERSION,
              "image_format": data.get("synth_image_format", "jpeg").upper()}
    build = {k: v for k, v in params.items() if k != "version"}
    return cached_dataset("ecom_rf_immr_synth", params, functools.partial(build_synthetic, **build))


def load_tokenizer(path: str | pathlib.Path, max_vocab: int):
    """The sentencepiece tokenizer at ``path``; it must fit the text tower's ``max_vocab`` pieces."""
    from data_pipelines.tokenizer import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.load(path)
    if tok.vocab_size > max_vocab:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces but model.text.vocab_size is {max_vocab}")
    return tok


def open_split(root: str | pathlib.Path, split: str):
    """The records of ``split`` in the dataset folder ``root`` (its ``data/`` ArrayRecord dataset)."""
    from data_pipelines.ecom_rf_immr.builder import open_split as open_built  # noqa: PLC0415

    return open_built(pathlib.Path(root) / "data", split)


def record_transform(data: Any, tokenizer, *, train: bool):
    """The per-record ``RecordTransform`` of ``data`` (``image_size``, ``max_text_len``, ``query_crop_scale``,
    ``photometric``): augmented query crops, flips and item augmentation when ``train``."""
    from data_pipelines.ecom_rf_immr.pipeline import AugmentConfig, make_transform  # noqa: PLC0415

    aug = AugmentConfig(query_crop_scale=tuple(data.query_crop_scale), hflip_prob=0.5, augment_item=True)
    return make_transform(image_size=data.image_size, tokenizer=tokenizer, max_text_len=data.max_text_len,
                          train=train, augment=aug, photometric=data.get("photometric", "host"))


def training_source(src, base_transform, data: Any, *, batch_size: int, steps: int,
                    seed: int) -> tuple[Any, NegativeTextTransform]:
    """The training records of ``src`` (without mosaic canvases unless ``data.mosaic_training``), mosaic-grouped
    into global batches of ``batch_size`` when ``data.mosaic_batches`` (enough epochs for ``steps``), and
    ``base_transform`` with a negative text per example."""
    groups = src.mosaic_group_ids()
    item_index, texts = [], {}
    for r in src:  # one pass: every record's item, and each item's text (negatives read no record again)
        item_index.append(r["item_index"])
        texts.setdefault(int(r["item_index"]), record_text(r))
    item_index = np.asarray(item_index, np.int64)
    keep = np.arange(len(src)) if data.mosaic_training else np.nonzero(groups < 0)[0]
    transform = NegativeTextTransform(base_transform, texts, groups, item_index, mosaic_grouping=data.mosaic_grouping)
    source = Indexed(src, keep)
    if data.get("mosaic_batches", False):
        # The paper's Mosaic training: the items of one canvas land in the same global batch, so each is
        # the others' hard negative. The grouped order replaces the loader's index shuffle.
        epochs = -(-steps * batch_size // max(len(keep) // batch_size * batch_size, 1)) + 1
        source = MosaicGroupedSource(source, block_size=batch_size, seed=seed, num_epochs=epochs,
                                     group_ids=groups[keep])
    return source, transform


def eval_sets(records: Sequence[Mapping[str, Any]], transform, layouts: Sequence[str] = ("normal", "mosaic")
              ) -> dict[str, dict[str, np.ndarray]]:
    """Per layout: queries (``query_image``, ``relevant`` item index) and the gallery of unique test items
    (``item_image``, ``item_ids``, ``item_mask``, ``item_index``, ``target_box``, ``title``)."""
    from data_pipelines.ecom_rf_immr.pipeline import stack_examples  # noqa: PLC0415

    sets = {}
    for layout in layouts:
        recs = [r for r in records if r["layout"] == layout]
        examples = [transform(r) for r in recs]
        first: dict[int, int] = {}
        for k, r in enumerate(recs):
            first.setdefault(int(r["item_index"]), k)
        gallery = stack_examples([examples[k] for k in first.values()])
        sets[layout] = {
            "query_image": np.stack([e["query_image"] for e in examples]),
            "relevant": np.asarray([int(r["item_index"]) for r in recs], np.int64),
            "item_image": gallery["item_image"], "item_ids": gallery["item_ids"],
            "item_mask": gallery["item_mask"], "item_index": gallery["item_index"],
            "target_box": gallery["target_box"],
            "title": np.asarray([recs[k]["title"] for k in first.values()]),
        }
    return sets
