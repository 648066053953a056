"""Item texts for a text encoder's SID input vectors: an ``items.jsonl`` -> ``(item ids [N] int64, texts)``.

One JSON object a line (blank lines skipped), the KuaiSearch ``items`` fields: ``item_id`` (int, required,
unique) and, each optional, ``item_title``, ``brand_name``, ``category_level1_name``,
``category_level2_name``, ``category_level3_name`` (strings). An item's text is
``data_pipelines.kuaisearch.examples.item_text``: title, brand and the three category names joined by
spaces, leaving out the placeholders ``UNKNOWN`` and ``无品牌`` ("no brand") and repeats. A line that is not
JSON, not an object, lacks ``item_id``, has a non-string text field or repeats an id is an ``ItemTextError``
naming ``file:line``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from data_pipelines.jsonl_convert import json_object
from data_pipelines.kuaisearch.examples import item_text

TEXT_FIELDS = ("item_title", "brand_name", "category_level1_name", "category_level2_name", "category_level3_name")


class ItemTextError(ValueError):
    """A bad items line; the message names the file and the line."""


def parse_item(raw: bytes | str, where: str) -> tuple[int, str]:
    """One items line -> ``(item_id, text)``; ``where`` (``file:line``) prefixes every error."""
    obj = json_object(raw, where, ItemTextError)
    if "item_id" not in obj:
        raise ItemTextError(f"{where}: missing field 'item_id'")
    item_id = obj["item_id"]
    if isinstance(item_id, bool) or not isinstance(item_id, int):
        raise ItemTextError(f"{where}: field 'item_id': expected int, got {item_id!r}")
    fields = {}
    for name in TEXT_FIELDS:
        value = obj.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ItemTextError(f"{where}: field {name!r}: expected str, got {value!r}")
        fields[name] = value
    return item_id, item_text(fields)


def read_item_texts(path: str | pathlib.Path) -> tuple[np.ndarray, list[str]]:
    """``items.jsonl`` -> ``(ids [N] int64, texts [N])`` in file order (see the module docstring)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ItemTextError(f"items {path}: no such file")
    ids: list[int] = []
    texts: list[str] = []
    first: dict[int, int] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            item_id, text = parse_item(raw, f"{path}:{line_no}")
            if item_id in first:
                raise ItemTextError(f"{path}:{line_no}: item_id {item_id} repeats line {first[item_id]}")
            first[item_id] = line_no
            ids.append(item_id)
            texts.append(text)
    if not ids:
        raise ItemTextError(f"items {path}: no items")
    return np.asarray(ids, dtype=np.int64), texts
