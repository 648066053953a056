"""grain pipeline for ECom-RF-IMMR: records -> augmented, normalised, tokenised batches.

Per example (``RecordTransform``, a ``grain.transforms.RandomMap``; call it with ``rng=None`` for
evaluation): decode the query and one item image (PIL; JPEGs decoded at a reduced scale when much
larger than needed), random-resized-crop the query / optional box-aware crop of the item, resize to
``image_size``, horizontal flip, colour jitter (all from the ``np.random.Generator`` grain passes),
normalise, and tokenise the item text (title | category path | attributes) with any object that has
``encode_batch(texts, max_len) -> (ids [n, max_len], mask [n, max_len])``.

Example (per record) and batch (stacked, leading ``b``) layout:

=============  =============  ========  ==================================================
key            shape          dtype     meaning
=============  =============  ========  ==================================================
query_image    [h, w, 3]      float32   normalised ``(x/255 - mean) / std``
item_image     [h, w, 3]      float32   same; item image 0 in eval, a random one in train
item_ids       [s]            int32     token ids of the item text, ``s = max_text_len``
item_mask      [s]            bool      True on real tokens
item_index     []             int64     the item's index (``item_index`` field of the record)
target_box     [4]            float32   [x0, y0, x1, y1] in [0, 1] of ``item_image``
has_box        []             bool      False: no box for this item image (box is zeros)
is_mosaic      []             bool      the item image is a mosaic canvas
=============  =============  ========  ==================================================

Composition with a trainer that owns shuffling and host sharding (``data_pipelines.loader``)::

    src = open_split(data_dir, "train")
    t = make_transform(image_size=224, tokenizer=tok, max_text_len=64, train=True)
    it = process_batches(src, global_batch_size=B, seed=s, transform=t, ...)          # plain
    it = process_batches(MosaicGroupedSource(src, block_size=B, seed=s, num_epochs=E),
                         global_batch_size=B, seed=s, transform=t, shuffle=False, num_epochs=1)

``MosaicGroupedSource`` replaces the shuffle: a fresh permutation each epoch in which the records of
one mosaic (equal ``mosaic_id``) are adjacent and packed into blocks of ``block_size`` that never
straddle a block boundary, so with ``block_size`` = global batch size each mosaic's items land in
one global batch (the paper's mosaic training). ``make_pipeline`` builds the same thing as one
``grain.MapDataset`` for single-process use and tests.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from PIL import Image

from data_pipelines.ecom_rf_immr import schema

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TextTokenizer(Protocol):
    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Scales are fractions of the image area; ratios are w/h."""

    query_crop_scale: tuple[float, float] = (0.5, 1.0)
    query_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    item_crop_scale: tuple[float, float] | None = None  # None: no crop; crops keep the target box
    item_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5  # each image flips independently
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    augment_item: bool = True  # flip / jitter / crop the item image too
    random_item_image: bool = True  # pick one of the item's images at random (box only on image 0)


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    image_size: tuple[int, int]  # (height, width)
    max_text_len: int
    augment: AugmentConfig | None = None  # None: evaluation (deterministic)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


# ----------------------------------------------------------------------------- image ops


def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an RGB PIL image; returns (image, original (width, height)).

    ``min_size`` (w, h): a JPEG may be decoded at a reduced DCT scale no smaller than this.
    """
    im = Image.open(io.BytesIO(data))
    orig = im.size
    if min_size is not None and im.format == "JPEG":
        im.draft("RGB", (max(1, min_size[0]), max(1, min_size[1])))
    return im.convert("RGB"), orig


def sample_crop(rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float],
                width: int, height: int, must_contain: np.ndarray | None = None,
                attempts: int = 10) -> tuple[float, float, float, float]:
    """Inception-style random crop as relative (x0, y0, x1, y1); the full image if none fits.

    ``must_contain``: relative [x0, y0, x1, y1] that the crop must include.
    """
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        area = rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(*log_r))
        cw = math.sqrt(area * r * height / width)
        ch = math.sqrt(area / r * width / height)
        if cw > 1 or ch > 1:
            continue
        lo_x, hi_x, lo_y, hi_y = 0.0, 1 - cw, 0.0, 1 - ch
        if must_contain is not None:
            bx0, by0, bx1, by1 = (float(v) for v in must_contain)
            lo_x, hi_x = max(lo_x, bx1 - cw), min(hi_x, bx0)
            lo_y, hi_y = max(lo_y, by1 - ch), min(hi_y, by0)
            if lo_x > hi_x or lo_y > hi_y:
                continue
        x0 = rng.uniform(lo_x, hi_x)
        y0 = rng.uniform(lo_y, hi_y)
        return (x0, y0, x0 + cw, y0 + ch)
    return (0.0, 0.0, 1.0, 1.0)


def crop_resize(im: Image.Image, crop: tuple[float, float, float, float], size_hw: tuple[int, int]) -> np.ndarray:
    """Relative crop resized to (h, w), as float32 [h, w, 3] in [0, 1]."""
    w, h = im.size
    box = (crop[0] * w, crop[1] * h, crop[2] * w, crop[3] * h)
    out = im.resize((size_hw[1], size_hw[0]), Image.BILINEAR, box=box)
    return np.asarray(out, np.float32) * (1.0 / 255.0)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float) -> np.ndarray:
    """Brightness, contrast, saturation factors from [1 - a, 1 + a]; img float [h, w, 3] in [0, 1]."""
    if brightness:
        img = img * rng.uniform(1 - brightness, 1 + brightness)
    if contrast:
        mean = img.mean()
        img = (img - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    if saturation:
        grey = img.mean(axis=2, keepdims=True)
        img = (img - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
    return np.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------- per-example transform


class RecordTransform(grain.transforms.RandomMap):
    """``schema.Record`` -> example dict (see the module docstring).

    ``random_map(record, rng)`` (grain) augments when the config has ``augment``;
    ``transform(record, None)`` is the deterministic evaluation path.
    """

    def __init__(self, config: TransformConfig, tokenizer: TextTokenizer):
        if not hasattr(tokenizer, "encode_batch"):
            raise TypeError(f"tokenizer {tokenizer!r} has no encode_batch(texts, max_len) method")
        self.config = config
        self.tokenizer = tokenizer
        self._mean = np.asarray(config.mean, np.float32)
        self._inv_std = 1.0 / np.asarray(config.std, np.float32)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.transform(element, rng)

    def __call__(self, element: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        return self.transform(element, rng)

    def _normalise(self, img: np.ndarray) -> np.ndarray:
        return ((img - self._mean) * self._inv_std).astype(np.float32)

    def transform(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        cfg = self.config
        size = cfg.image_size
        aug = cfg.augment if rng is not None else None

        # Query: random resized crop + flip + jitter in training.
        lo = aug.query_crop_scale[0] if aug else 1.0
        q_min = (math.ceil(size[1] / math.sqrt(lo)), math.ceil(size[0] / math.sqrt(lo)))
        q_im, _ = decode_rgb(record["query_image"], q_min)
        crop = (sample_crop(rng, aug.query_crop_scale, aug.query_crop_ratio, *q_im.size) if aug
                else (0.0, 0.0, 1.0, 1.0))
        query = crop_resize(q_im, crop, size)
        if aug:
            if rng.random() < aug.hflip_prob:
                query = query[:, ::-1]
            query = color_jitter(query, rng, aug.brightness, aug.contrast, aug.saturation)

        # Item image: image 0 (eval) or a random one; the box exists for image 0 only.
        images = record["item_images"]
        j = int(rng.integers(len(images))) if aug and aug.random_item_image and len(images) > 1 else 0
        item_aug = aug if aug and aug.augment_item else None
        i_lo = item_aug.item_crop_scale[0] if item_aug and item_aug.item_crop_scale else 1.0
        i_min = (math.ceil(size[1] / math.sqrt(i_lo)), math.ceil(size[0] / math.sqrt(i_lo)))
        i_im, (ow, oh) = decode_rgb(images[j], i_min)
        has_box = bool(record["has_box"]) and j == 0
        box = (np.asarray(record["target_box"], np.float32) / np.asarray([ow, oh, ow, oh], np.float32)
               if has_box else np.zeros(4, np.float32))
        crop = (0.0, 0.0, 1.0, 1.0)
        if item_aug and item_aug.item_crop_scale:
            crop = sample_crop(rng, item_aug.item_crop_scale, item_aug.item_crop_ratio, *i_im.size,
                               must_contain=box if has_box else None)
        item = crop_resize(i_im, crop, size)
        if has_box:
            cx0, cy0, cx1, cy1 = crop
            box = (box - np.asarray([cx0, cy0, cx0, cy0], np.float32)) / np.asarray(
                [cx1 - cx0, cy1 - cy0, cx1 - cx0, cy1 - cy0], np.float32)
            box = np.clip(box, 0.0, 1.0)
        if item_aug:
            if rng.random() < item_aug.hflip_prob:
                item = item[:, ::-1]
                if has_box:
                    box = np.asarray([1 - box[2], box[1], 1 - box[0], box[3]], np.float32)
            item = color_jitter(item, rng, item_aug.brightness, item_aug.contrast, item_aug.saturation)

        text = schema.item_text(record["title"], list(record["category"]), list(record["attribute_keys"]),
                                list(record["attribute_values"]))
        ids, mask = self.tokenizer.encode_batch([text], cfg.max_text_len)
        ids = np.asarray(ids, np.int32).reshape(-1)
        mask = np.asarray(mask).astype(bool).reshape(-1)
        if ids.shape != (cfg.max_text_len,) or mask.shape != (cfg.max_text_len,):
            raise ValueError(f"tokenizer returned ids {ids.shape} / mask {mask.shape} for max_len {cfg.max_text_len}")
        return {
            "query_image": self._normalise(query),
            "item_image": self._normalise(item),
            "item_ids": ids,
            "item_mask": mask,
            "item_index": np.int64(record["item_index"]),
            "target_box": box.astype(np.float32),
            "has_box": np.bool_(has_box),
            "is_mosaic": np.bool_(record["layout"] == "mosaic"),
        }


def make_transform(*, image_size: int | Sequence[int], tokenizer: TextTokenizer, max_text_len: int, train: bool,
                   augment: AugmentConfig | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> RecordTransform:
    """The per-example ``transform(record, rng)``; ``train=False`` ignores ``augment``."""
    cfg = TransformConfig(image_size=_hw(image_size), max_text_len=int(max_text_len),
                          augment=(augment or AugmentConfig()) if train else None,
                          mean=tuple(mean), std=tuple(std))
    return RecordTransform(cfg, tokenizer)


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples -> batch dict (each key stacked on a new leading axis)."""
    if not examples:
        raise ValueError("no examples to stack")
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------- mosaic grouping


def mosaic_group_ids(source) -> np.ndarray:
    """int64 [len(source)] mosaic group per record (``-1`` = none), from the source if it knows."""
    if hasattr(source, "mosaic_group_ids"):
        return np.asarray(source.mosaic_group_ids(), np.int64)
    ids = [source[i]["mosaic_id"] for i in range(len(source))]
    lookup = {m: k for k, m in enumerate(sorted({m for m in ids if m}))}
    return np.asarray([lookup[m] if m else -1 for m in ids], np.int64)


def grouped_permutation(group_ids: np.ndarray, *, block_size: int, seed: int, epoch: int = 0,
                        window: int = 32) -> np.ndarray:
    """A permutation of ``range(len(group_ids))`` in which each group (equal id >= 0) is contiguous
    and inside one block of ``block_size`` consecutive positions.

    Groups (larger ones cut into pieces of ``block_size``) are packed first-fit into blocks, the holes
    are filled with ungrouped records, and the blocks are shuffled. Only if ungrouped records run out
    do the last, partly filled blocks get concatenated (a short tail where a group may straddle a
    block boundary). Random from ``(seed, epoch)``.
    """
    group_ids = np.asarray(group_ids, np.int64)
    n = len(group_ids)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    singles = np.nonzero(group_ids < 0)[0]
    singles = singles[rng.permutation(len(singles))]
    grouped = np.nonzero(group_ids >= 0)[0]
    units: list[np.ndarray] = []
    if len(grouped):
        order = grouped[np.argsort(group_ids[grouped], kind="stable")]
        _, starts = np.unique(group_ids[order], return_index=True)
        for members in np.split(order, starts[1:]):
            members = members[rng.permutation(len(members))]
            units.extend(members[k:k + block_size] for k in range(0, len(members), block_size))
    units = [units[int(k)] for k in rng.permutation(len(units))]

    blocks: list[list[np.ndarray]] = []
    room: list[int] = []
    open_blocks: list[int] = []
    for u in units:
        for b in open_blocks:
            if room[b] >= len(u):
                break
        else:
            b = len(blocks)
            blocks.append([])
            room.append(block_size)
            open_blocks.append(b)
            if len(open_blocks) > window:
                open_blocks.pop(0)
        blocks[b].append(u)
        room[b] -= len(u)
        if room[b] == 0:
            open_blocks.remove(b)
    # Fill holes with ungrouped records, then whole blocks of ungrouped records.
    pos = 0
    for b in range(len(blocks)):
        take = min(room[b], len(singles) - pos)
        if take:
            blocks[b].append(singles[pos:pos + take])
            room[b] -= take
            pos += take
    while pos < len(singles):
        chunk = singles[pos:pos + block_size]
        blocks.append([chunk])
        room.append(block_size - len(chunk))
        pos += len(chunk)
    full = [b for b in range(len(blocks)) if room[b] == 0]
    partial = [b for b in range(len(blocks)) if room[b] > 0]
    ordered = [full[int(k)] for k in rng.permutation(len(full))] + partial
    parts = [np.concatenate(blocks[b]) for b in ordered]
    perm = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert len(perm) == n
    return perm.astype(np.int64)


class MosaicGroupedOrder(grain.transforms.MapWithIndex):
    """Position -> record index: ``grouped_permutation`` of epoch ``position // len(self)`` (cached).

    An epoch is ``len(self) = n - n % block_size`` positions (all ``n`` records if ``n < block_size``)
    so that every epoch starts on a block (batch) boundary; the ``n % block_size`` records left out
    come from the permutation's tail and differ from epoch to epoch.
    """

    def __init__(self, group_ids: np.ndarray, *, block_size: int, seed: int):
        self.group_ids = np.asarray(group_ids, np.int64)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"group_ids": self.group_ids, "block_size": self.block_size, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["group_ids"], block_size=state["block_size"], seed=state["seed"])

    def __len__(self) -> int:
        n = len(self.group_ids)
        return n - n % self.block_size if n >= self.block_size else n

    def epoch_order(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = grouped_permutation(self.group_ids, block_size=self.block_size, seed=self.seed, epoch=epoch)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def __call__(self, position: int) -> int:
        epoch, i = divmod(int(position), len(self))
        return int(self.epoch_order(epoch)[i])

    def map_with_index(self, index: int, element: Any) -> int:
        del element
        return self(index)


class MosaicGroupedSource:
    """A random-access view of ``source`` in mosaic-grouped order, ``num_epochs`` epochs long
    (a fresh grouped permutation per epoch). Use it in place of shuffling."""

    def __init__(self, source, *, block_size: int, seed: int, num_epochs: int = 1,
                 group_ids: np.ndarray | None = None):
        self.source = source
        self.order = MosaicGroupedOrder(mosaic_group_ids(source) if group_ids is None else group_ids,
                                        block_size=block_size, seed=seed)
        self.num_epochs = int(num_epochs)

    def __len__(self) -> int:
        return len(self.order) * self.num_epochs

    def __getitem__(self, position: int):
        return self.source[self.order(position)]

    def record_index(self, position: int) -> int:
        return self.order(position)


class _Fetch(grain.transforms.Map):
    def __init__(self, source):
        self.source = source

    def map(self, index: int):
        return self.source[int(index)]


# ----------------------------------------------------------------------------- the pipeline


def make_pipeline(
    source,
    *,
    batch_size: int | None,
    image_size: int | Sequence[int],
    tokenizer: TextTokenizer,
    max_text_len: int,
    train: bool,
    seed: int,
    augment: AugmentConfig | None = None,
    shuffle: bool | None = None,
    num_epochs: int | None = 1,
    drop_remainder: bool | None = None,
    mosaic_grouping: bool = False,
    mosaic_block_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> grain.MapDataset:
    """A ``grain.MapDataset`` of examples (``batch_size=None``) or batches.

    Order: ``train`` shuffles globally (``shuffle`` overrides), a new permutation per epoch; with
    ``mosaic_grouping`` the order is ``grouped_permutation`` in blocks of ``mosaic_block_size``
    (default ``batch_size``) so a mosaic's items share a batch. ``num_epochs=None`` repeats forever.
    ``drop_remainder`` defaults to ``train``. Evaluation (``train=False``) is deterministic.
    With ``mosaic_grouping`` an epoch is ``len(source) - len(source) % block`` records (see
    ``MosaicGroupedOrder``).
    """
    transform = make_transform(image_size=image_size, tokenizer=tokenizer, max_text_len=max_text_len, train=train,
                               augment=augment, mean=mean, std=std)
    shuffle = train if shuffle is None else shuffle
    if mosaic_grouping:
        block = mosaic_block_size or batch_size
        if not block:
            raise ValueError("mosaic_grouping needs batch_size or mosaic_block_size")
        order = MosaicGroupedOrder(mosaic_group_ids(source), block_size=block, seed=seed)
        ds = grain.MapDataset.range(len(order)).map_with_index(order).map(_Fetch(source)).seed(seed)
    else:
        ds = grain.MapDataset.source(source).seed(seed)
        if shuffle:
            ds = ds.shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.random_map(transform) if train else ds.map(transform)
    if batch_size:
        ds = ds.batch(batch_size, drop_remainder=train if drop_remainder is None else drop_remainder)
    return ds
