"""ECom-RF-IMMR record schema: the JSONL manifest format, its validation, and the TFDS features.

A *pair* (one record) is a cropped product photo (the query) and the item it must retrieve: the
item's image(s) plus structured text. The paper's data is not released; this on-disk schema is ours.

Manifest (UTF-8 JSONL, one JSON object per line; blank lines are ignored)
-------------------------------------------------------------------------
Paths are relative to the folder holding the manifest (absolute paths are accepted too).

=================  ========  ===================================================================
key                required  value
=================  ========  ===================================================================
``query_image``    yes       path of the query image file (JPEG or PNG)
``item_id``        yes       non-empty string; the item (SKU) the query must retrieve
``item_images``    yes       list of 1..N paths (JPEG or PNG); a single path string is accepted.
                             ``item_images[0]`` is the main image: ``target_box`` refers to it
``title``          yes       string (may mix Chinese and English)
``category``       yes       category path, root first: a list of strings, or one string with
                             ``" > "`` between levels (``"箱包 bags > 托特包 tote bag"``)
``split``          yes       ``"train"``, ``"val"`` or ``"test"``
``attributes``     no        ``["key:value", ...]`` (split at the first ``:``) or ``{"key": "value"}``
``attribute_keys``  no       with ``attribute_values``: two parallel lists of strings (instead of
``attribute_values``         ``attributes``; giving both forms is an error)
``layout``         no        ``"normal"`` (default: one product on a background) or ``"mosaic"``
                             (the target among distractors on one canvas)
``target_box``     no        ``[x0, y0, x1, y1]`` pixels in ``item_images[0]``, ``x1``/``y1``
                             exclusive: ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height``;
                             ``null`` or absent = no box (the usual case outside training)
``mosaic_id``      no        string shared by the records whose items sit on one mosaic canvas
                             (mosaic layout only); the trainer can keep them in one batch
``item_index``     no        integer ``>= 0``; default: a stable 63-bit hash of ``item_id``
``query_id``       no        string naming the query (default ``""``)
``_*``, ``x_*``    no        free metadata, ignored
=================  ========  ===================================================================

Any other key is an error (it catches typos such as ``item_image``).

Example line::

    {"query_image": "images/queries/q000001_0.jpg", "item_id": "sku000001",
     "item_images": ["images/items/sku000001_0.png"], "title": "红色 条纹 托特包 red striped tote bag",
     "category": ["箱包 bags", "包 bag", "托特包 tote bag"],
     "attributes": ["color:红色 red", "pattern:条纹 striped"], "split": "train",
     "layout": "normal", "target_box": [12, 10, 80, 86]}

Stored record (what ``open_split`` returns per index)
-----------------------------------------------------
``query_image`` bytes, ``query_id`` str, ``item_id`` str, ``item_index`` int, ``item_images``
list[bytes] (1..N, still encoded), ``title`` str, ``category`` list[str], ``attribute_keys`` /
``attribute_values`` list[str] (parallel), ``has_box`` bool, ``target_box`` float32 [4] (pixels in
``item_images[0]``; zeros when ``has_box`` is False), ``layout`` ``"normal"|"mosaic"``, ``mosaic_id``
str (``""`` = none), ``split`` str.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np

DATASET_NAME = "ecom_rf_immr"
VERSION = "1.0.0"
LAYOUTS = ("normal", "mosaic")
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("JPEG", "PNG")

REQUIRED_KEYS = ("query_image", "item_id", "item_images", "title", "category", "split")
OPTIONAL_KEYS = ("attributes", "attribute_keys", "attribute_values", "layout", "target_box",
                 "mosaic_id", "item_index", "query_id")
CATEGORY_SEPARATOR = " > "


class Record(TypedDict):
    """One pair as stored and as returned by ``open_split``."""

    query_image: bytes
    query_id: str
    item_id: str
    item_index: int
    item_images: list[bytes]
    title: str
    category: list[str]
    attribute_keys: list[str]
    attribute_values: list[str]
    has_box: bool
    target_box: np.ndarray  # float32 [4], pixels in item_images[0]
    layout: str
    mosaic_id: str
    split: str


class ManifestError(ValueError):
    """A bad manifest record; the message starts with ``<manifest>:<line>:``."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), int(line), str(reason)

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (ManifestError, (self.path, self.line, self.reason))


class RecordError(ValueError):
    """A bad field, before the manifest position is known (wrapped into ``ManifestError``)."""


def stable_item_index(item_id: str) -> int:
    """A stable 63-bit non-negative integer for ``item_id`` (blake2b), the default ``item_index``."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stable_group_hash(mosaic_id: str) -> int:
    """Non-negative 63-bit hash of a mosaic id (``-1`` is kept for 'no mosaic')."""
    return stable_item_index("mosaic:" + mosaic_id)


def item_text(title: str, category: list[str], keys: list[str], values: list[str]) -> str:
    """The item's text as one string for the tokenizer: ``title | cat > path | k:v; k:v``."""
    parts = [title.strip(), CATEGORY_SEPARATOR.join(category)]
    if keys:
        parts.append("; ".join(f"{k}:{v}" for k, v in zip(keys, values)))
    return " | ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- parsing a line


def _str_field(obj: Mapping[str, Any], key: str, *, required: bool, allow_empty: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"field {key!r} must be a list of strings")
    return list(value)


def _parse_attributes(obj: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    has_kv = "attribute_keys" in obj or "attribute_values" in obj
    if "attributes" in obj and obj["attributes"] is not None and has_kv:
        raise RecordError("give either 'attributes' or 'attribute_keys'/'attribute_values', not both")
    if has_kv:
        keys = _str_list(obj.get("attribute_keys"), "attribute_keys")
        values = _str_list(obj.get("attribute_values"), "attribute_values")
        if len(keys) != len(values):
            raise RecordError(f"attribute_keys has {len(keys)} entries but attribute_values has {len(values)}")
        return keys, values
    attrs = obj.get("attributes")
    if attrs is None:
        return [], []
    if isinstance(attrs, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
            raise RecordError("field 'attributes' as an object must map strings to strings")
        return list(attrs.keys()), list(attrs.values())
    keys, values = [], []
    for entry in _str_list(attrs, "attributes"):
        if ":" not in entry:
            raise RecordError(f"attribute {entry!r} is not of the form 'key:value'")
        k, v = entry.split(":", 1)
        keys.append(k.strip())
        values.append(v.strip())
    return keys, values


def parse_manifest_object(obj: Any) -> dict[str, Any]:
    """Validate the fields of one manifest object (not the image files).

    Returns a dict with the stored record's fields, except that ``query_image`` and ``item_images``
    are still *paths* (as written in the manifest) and ``target_box`` is a list or ``None``.
    Raises ``RecordError`` naming the field.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"a manifest line must be a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in REQUIRED_KEYS + OPTIONAL_KEYS and not k.startswith(("_", "x_"))]
    if unknown:
        raise RecordError(f"unknown field(s) {sorted(unknown)}; known: {sorted(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in obj or obj[key] is None:
            raise RecordError(f"missing field {key!r}")

    query_image = _str_field(obj, "query_image", required=True, allow_empty=False)
    item_id = _str_field(obj, "item_id", required=True, allow_empty=False)
    item_images = obj["item_images"]
    if isinstance(item_images, str):
        item_images = [item_images]
    item_images = _str_list(item_images, "item_images")
    if not item_images or not all(p.strip() for p in item_images):
        raise RecordError("field 'item_images' must hold at least one non-empty path")
    title = _str_field(obj, "title", required=True)

    category = obj["category"]
    if isinstance(category, str):
        category = [c.strip() for c in category.split(">")] if category.strip() else []
    category = _str_list(category, "category")

    split = _str_field(obj, "split", required=True)
    if split not in SPLITS:
        raise RecordError(f"split {split!r} is not one of {list(SPLITS)}")
    layout = _str_field(obj, "layout", required=False) or "normal"
    if layout not in LAYOUTS:
        raise RecordError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    mosaic_id = _str_field(obj, "mosaic_id", required=False)
    if mosaic_id and layout != "mosaic":
        raise RecordError(f"mosaic_id {mosaic_id!r} given for a {layout!r}-layout record")
    keys, values = _parse_attributes(obj)

    box = obj.get("target_box")
    if box is not None:
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                or not all(math.isfinite(v) for v in box)):
            raise RecordError(f"target_box must be [x0, y0, x1, y1] (4 finite numbers), got {box!r}")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise RecordError(f"target_box {box} is empty or inverted (need x0 < x1 and y0 < y1)")

    item_index = obj.get("item_index")
    if item_index is None:
        item_index = stable_item_index(item_id)
    elif not isinstance(item_index, int) or isinstance(item_index, bool) or not 0 <= item_index < 2**63:
        raise RecordError(f"item_index must be an integer in [0, 2**63), got {item_index!r}")

    return {
        "query_image": query_image,
        "query_id": _str_field(obj, "query_id", required=False),
        "item_id": item_id,
        "item_index": int(item_index),
        "item_images": item_images,
        "title": title,
        "category": category,
        "attribute_keys": keys,
        "attribute_values": values,
        "target_box": box,
        "layout": layout,
        "mosaic_id": mosaic_id,
        "split": split,
    }


def parse_manifest_line(line: bytes | str) -> dict[str, Any] | None:
    """JSON-decode and validate one manifest line; ``None`` for a blank line."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"line is not valid UTF-8 ({e})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    return parse_manifest_object(obj)


# ----------------------------------------------------------------------------- image checks


def check_image(data: bytes, *, what: str, full_decode: bool = True) -> tuple[int, int]:
    """Check that ``data`` is a decodable JPEG/PNG; returns ``(width, height)``.

    ``full_decode`` decodes every pixel (JPEGs at 1/8 scale through ``draft``, which still reads the
    whole entropy-coded stream, so truncation is caught); otherwise only the header is checked.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in IMAGE_FORMATS:
                raise RecordError(f"{what} is {im.format}, not one of {list(IMAGE_FORMATS)}")
            width, height = im.size
            if width < 1 or height < 1:
                raise RecordError(f"{what} has an empty size {width}x{height}")
            if full_decode:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                im.load()
            else:
                im.verify()
    except RecordError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise RecordError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    return width, height


def resolve_path(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def read_image_file(base_dir: str, path: str, *, what: str, full_decode: bool = True) -> tuple[bytes, int, int]:
    """Read and check one image file named in the manifest; returns ``(bytes, width, height)``."""
    full = resolve_path(base_dir, path)
    try:
        with open(full, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise RecordError(f"{what} {path!r} not found ({full})") from None
    except OSError as e:
        raise RecordError(f"{what} {path!r} cannot be read ({e})") from None
    width, height = check_image(data, what=f"{what} {path!r}", full_decode=full_decode)
    return data, width, height


def shrink_image(data: bytes, width: int, height: int, shorter_side: int, *, quality: int = 90) -> bytes:
    """``data`` re-encoded as JPEG (``quality``) with its shorter side resized to ``shorter_side`` (Pillow
    bilinear, antialiased); unchanged when it is already no larger."""
    from PIL import Image

    if min(width, height) <= shorter_side:
        return data
    scale = shorter_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").resize(size, Image.BILINEAR).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def load_record(fields: dict[str, Any], base_dir: str, *, full_decode: bool = True,
                image_size: int | None = None) -> Record:
    """Read and verify the image files of a parsed manifest object; returns the stored record.

    ``image_size``: images whose shorter side is larger are stored re-encoded at that shorter side
    (``shrink_image``; the target box scaled with item image 0): decode and resize cost then scale with
    the training resolution, not the catalogue's.
    """
    query, qw, qh = read_image_file(base_dir, fields["query_image"], what="query_image", full_decode=full_decode)
    images, sizes = [], []
    for j, p in enumerate(fields["item_images"]):
        data, w, h = read_image_file(base_dir, p, what=f"item_images[{j}]", full_decode=full_decode)
        images.append(data)
        sizes.append((w, h))
    box = fields["target_box"]
    if box is not None:
        w, h = sizes[0]
        if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
            raise RecordError(f"target_box {box} lies outside item_images[0] ({w}x{h} pixels)")
    if image_size:
        query = shrink_image(query, qw, qh, image_size)
        images = [shrink_image(d, w, h, image_size) for d, (w, h) in zip(images, sizes)]
        w, h = sizes[0]
        if box is not None and min(w, h) > image_size:
            s = image_size / min(w, h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            box = [box[0] * nw / w, box[1] * nh / h, box[2] * nw / w, box[3] * nh / h]
    return Record(
        query_image=query,
        query_id=fields["query_id"],
        item_id=fields["item_id"],
        item_index=fields["item_index"],
        item_images=images,
        title=fields["title"],
        category=fields["category"],
        attribute_keys=fields["attribute_keys"],
        attribute_values=fields["attribute_values"],
        has_box=box is not None,
        target_box=np.asarray(box if box is not None else [0, 0, 0, 0], np.float32),
        layout=fields["layout"],
        mosaic_id=fields["mosaic_id"],
        split=fields["split"],
    )


# ----------------------------------------------------------------------------- TFDS features


def tfds_features():
    """The TFDS ``FeaturesDict`` of a record. Images are ``Image`` features fed encoded bytes (the
    only image path that works without TensorFlow); readers keep them encoded (``KEEP_ENCODED``)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict({
        "query_image": f.Image(shape=(None, None, 3)),
        "query_id": f.Text(),
        "item_id": f.Text(),
        "item_index": f.Scalar(dtype=np.int64),
        "item_images": f.Sequence(f.Image(shape=(None, None, 3))),
        "title": f.Text(),
        "category": f.Sequence(f.Text()),
        "attribute_keys": f.Sequence(f.Text()),
        "attribute_values": f.Sequence(f.Text()),
        "has_box": f.Scalar(dtype=np.bool_),
        "target_box": f.Tensor(shape=(4,), dtype=np.float32),
        "layout": f.ClassLabel(names=list(LAYOUTS)),
        "mosaic_id": f.Text(),
        "split": f.Text(),
    })


def to_tfds_example(record: Record) -> dict[str, Any]:
    """A record as the dict the TFDS feature serializer takes."""
    ex = dict(record)
    ex["item_images"] = list(record["item_images"])
    ex["target_box"] = np.asarray(record["target_box"], np.float32)
    return ex


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def from_tfds_example(ex: Mapping[str, Any]) -> Record:
    """A record read back through TFDS (images kept encoded) as a plain ``Record``."""
    return Record(
        query_image=bytes(ex["query_image"]),
        query_id=_text(ex["query_id"]),
        item_id=_text(ex["item_id"]),
        item_index=int(ex["item_index"]),
        item_images=[bytes(b) for b in ex["item_images"]],
        title=_text(ex["title"]),
        category=[_text(v) for v in ex["category"]],
        attribute_keys=[_text(v) for v in ex["attribute_keys"]],
        attribute_values=[_text(v) for v in ex["attribute_values"]],
        has_box=bool(ex["has_box"]),
        target_box=np.asarray(ex["target_box"], np.float32),
        layout=LAYOUTS[int(ex["layout"])],
        mosaic_id=_text(ex["mosaic_id"]),
        split=_text(ex["split"]),
    )
