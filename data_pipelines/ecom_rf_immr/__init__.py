"""ECom-RF-IMMR (image-to-multimodal product retrieval, the TIGER-FG benchmark) data layer.

* ``schema``: the manifest format (documented there), record fields, TFDS features.
* ``builder``: ``build(manifest, out_dir, *, workers, shards, max_bad_fraction) -> BuildSummary``,
  ``open_split(out_dir, split) -> RecordSource``, the ``EcomRfImmr`` TFDS builder.
* ``synthetic``: ``synthesize(out_dir, *, items, queries_per_item, seed, image_size) -> manifest``.
* ``pipeline``: ``make_pipeline(...) -> grain.MapDataset``, the per-example ``RecordTransform``,
  batching helpers and mosaic-grouped ordering.
* ``world``: what the TIGER-FG task reads (dataset folder, tokenizer, training source with negative
  texts, evaluation sets).

Names are loaded lazily so that importing the package does not import TFDS or grain.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build": "builder", "open_split": "builder", "BuildSummary": "builder", "BuildError": "builder",
    "EcomRfImmr": "builder", "RecordSource": "builder",
    "ManifestError": "schema", "Record": "schema", "DATASET_NAME": "schema",
    "synthesize": "synthetic",
    "make_pipeline": "pipeline", "make_transform": "pipeline", "RecordTransform": "pipeline",
    "AugmentConfig": "pipeline", "TransformConfig": "pipeline", "stack_examples": "pipeline",
    "MosaicGroupedOrder": "pipeline", "grouped_permutation": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
