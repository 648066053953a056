"""grain pipeline for ECom-RF-IMMR: records -> augmented, normalised, tokenised batches.

Per example (``RecordTransform``, a ``grain.transforms.RandomMap``; call it with ``rng=None`` for
evaluation): decode the query and one item image (``decode_rgb``: simplejpeg for JPEG, at a reduced DCT
scale when much larger than needed), random-resized-crop the query / optional box-aware crop of the item
and resize to ``image_size`` in one uint8 resampling pass, horizontal flip, colour jitter (all from the
``np.random.Generator`` grain passes), normalise (``photometric``: on the host, or with
``photometric="device"`` inside the jitted step), and tokenise the item text (title | category path |
attributes, cached per text) with any object that has
``encode_batch(texts, max_len) -> (ids [n, max_len], mask [n, max_len])``.

Example (per record) and batch (stacked, leading ``b``) layout:

=============  =============  ========  ==================================================
key            shape          dtype     meaning
=============  =============  ========  ==================================================
query_image    [h, w, 3]      float32   normalised ``(x/255 - mean) / std`` (``photometric="host"``)
               [h, w, 3]      uint8     cropped, resized, flipped pixels (``"device"``)
query_jitter   [3]            float32   ``"device"`` only: brightness, contrast, saturation factors
item_image     [h, w, 3]      as above  item image 0 in eval, a random one in train
item_jitter    [3]            float32   ``"device"`` only
item_ids       [s]            int32     token ids of the item text, ``s = max_text_len``
item_mask      [s]            bool      True on real tokens
item_index     []             int64     the item's index (``item_index`` field of the record)
target_box     [4]            float32   [x0, y0, x1, y1] in [0, 1] of ``item_image``
has_box        []             bool      False: no box for this item image (box is zeros)
is_mosaic      []             bool      the item image is a mosaic canvas
=============  =============  ========  ==================================================

With ``"device"`` the step calls ``photometric(image, jitter, xp=jax.numpy)``: the same pixels as the host
path (float32 rounding), a quarter of the bytes to move and no float work on the host.

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
import simplejpeg
from PIL import Image

from data_pipelines.ecom_rf_immr import schema
from data_pipelines.loader import NoClock, StageClock

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
    # "host": images leave the pipeline float32, jittered and normalised. "device": uint8 pixels plus
    # `*_jitter` factors [3]; the step applies `photometric` (4x fewer bytes to move, no host float work).
    photometric: str = "host"


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


# ----------------------------------------------------------------------------- image ops


def jpeg_scale(width: int, height: int, min_size: tuple[int, int] | None) -> int:
    """The largest power-of-two DCT reduction (1, 2, 4, 8) keeping both sides >= ``min_size`` (w, h): the
    rule of Pillow's ``Image.draft``, so a JPEG decoded at it has exactly Pillow's pixels."""
    if min_size is None:
        return 1
    limit = min(width // max(1, min_size[0]), height // max(1, min_size[1]))
    return next((f for f in (8, 4, 2) if limit >= f), 1)


def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to RGB uint8 [h, w, 3]; returns (pixels, original (width, height)).

    JPEGs go through simplejpeg (libjpeg-turbo, ~2x Pillow's decode; ``benchmarks/jpeg_decoders.py``) at
    the ``jpeg_scale`` reduction for ``min_size`` (w, h); other formats through Pillow.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            width, height = simplejpeg.decode_jpeg_header(data)[1::-1]
        except ValueError:
            pass  # not decodable by libjpeg-turbo's header reader: let Pillow try and name the problem
        else:
            f = jpeg_scale(width, height, min_size)
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // f),
                                            min_height=-(-height // f))
            return pixels, (width, height)
    im = Image.open(io.BytesIO(data))
    orig = im.size
    if min_size is not None and im.format == "JPEG":
        im.draft("RGB", (max(1, min_size[0]), max(1, min_size[1])))
    return np.asarray(im.convert("RGB")), orig


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


def crop_resize(im: Image.Image | np.ndarray, crop: tuple[float, float, float, float],
                size_hw: tuple[int, int]) -> np.ndarray:
    """Relative crop resized to (h, w) in one resampling pass on uint8 (Pillow bilinear, antialiased when
    shrinking), uint8 [h, w, 3]."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    w, h = im.size
    box = (crop[0] * w, crop[1] * h, crop[2] * w, crop[3] * h)
    return np.asarray(im.resize((size_hw[1], size_hw[0]), Image.BILINEAR, box=box))


def draw_jitter(rng: np.random.Generator, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Colour-jitter factors float32 [3] (brightness, contrast, saturation), each drawn from [1 - a, 1 + a]
    in that order, 1 (and no draw) where a = 0."""
    return np.asarray([rng.uniform(1 - a, 1 + a) if a else 1.0 for a in (brightness, contrast, saturation)],
                      np.float32)


def photometric(images, jitter, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                xp: Any = np):
    """uint8 images [..., h, w, 3] -> float32, colour-jittered by ``jitter`` [..., 3] and normalised.

    torchvision ColorJitter's order and formulas (without hue) on x = pixels / 255: brightness x*b; contrast
    (x - m)*c + m, m the image's mean over all pixels and channels; saturation (x - g)*s + g, g the
    per-pixel channel mean; clip to [0, 1]; then (x - mean) / std. ``jitter=None`` normalises only.
    ``xp`` is numpy (the host path) or jax.numpy (inside the jitted step: ``data.photometric="device"``);
    both give the same values to float32 rounding.
    """
    x = images.astype(xp.float32) * xp.float32(1 / 255)
    if jitter is not None:
        b, c, s = (jitter[..., k, None, None, None] for k in range(3))
        x = x * b
        m = x.mean(axis=(-3, -2, -1), keepdims=True)
        x = (x - m) * c + m
        g = x.mean(axis=-1, keepdims=True)
        x = xp.clip((x - g) * s + g, 0.0, 1.0)
    return ((x - xp.asarray(mean, xp.float32)) * xp.asarray(1 / np.asarray(std, np.float32))).astype(xp.float32)


class RecordDecodeError(ValueError):
    """An image of a stored record that does not decode (the message names the record)."""


# ----------------------------------------------------------------------------- per-example transform


class RecordTransform(grain.transforms.RandomMap):
    """``schema.Record`` -> example dict (see the module docstring).

    ``random_map(record, rng)`` (grain) augments when the config has ``augment``;
    ``transform(record, None)`` is the deterministic evaluation path. Item texts are tokenised once per
    distinct text (a per-process cache of up to ``text_cache_size`` texts).
    """

    text_cache_size = 1 << 17

    def __init__(self, config: TransformConfig, tokenizer: TextTokenizer):
        if not hasattr(tokenizer, "encode_batch"):
            raise TypeError(f"tokenizer {tokenizer!r} has no encode_batch(texts, max_len) method")
        if config.photometric not in ("host", "device"):
            raise ValueError(f"photometric must be 'host' or 'device', got {config.photometric!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.clock: StageClock | NoClock = NoClock()
        self._texts: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {"config": self.config, "tokenizer": self.tokenizer}

    def __setstate__(self, state):
        self.__init__(state["config"], state["tokenizer"])

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.transform(element, rng)

    def __call__(self, element: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        return self.transform(element, rng)

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [s], mask bool [s]) of ``text``, read-only and cached."""
        hit = self._texts.get(text)
        if hit is None:
            s = self.config.max_text_len
            ids, mask = self.tokenizer.encode_batch([text], s)
            ids = np.asarray(ids, np.int32).reshape(-1)
            mask = np.asarray(mask).astype(bool).reshape(-1)
            if ids.shape != (s,) or mask.shape != (s,):
                raise ValueError(f"tokenizer returned ids {ids.shape} / mask {mask.shape} for max_len {s}")
            ids.setflags(write=False)
            mask.setflags(write=False)
            hit = (ids, mask)
            if len(self._texts) < self.text_cache_size:
                self._texts[text] = hit
        return hit

    def _decode(self, record: Mapping[str, Any], data: bytes, what: str, min_size: tuple[int, int]):
        try:
            return decode_rgb(data, min_size)
        except Exception as e:  # noqa: BLE001 -- decoders raise several types for corrupt data
            raise RecordDecodeError(f"record query_id={record.get('query_id')!r} item_id={record.get('item_id')!r}: "
                                    f"{what} cannot be decoded ({type(e).__name__}: {e})") from e

    def _pixels(self, img: np.ndarray, jitter: np.ndarray | None) -> dict[str, np.ndarray]:
        if self.config.photometric == "device":
            return {"image": img, "jitter": np.ones(3, np.float32) if jitter is None else jitter}
        return {"image": photometric(img, jitter, self.config.mean, self.config.std)}

    def transform(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        cfg, clock = self.config, self.clock
        size = cfg.image_size
        aug = cfg.augment if rng is not None else None
        clock.start()

        # Query: random resized crop + flip + jitter in training.
        lo = aug.query_crop_scale[0] if aug else 1.0
        q_min = (math.ceil(size[1] / math.sqrt(lo)), math.ceil(size[0] / math.sqrt(lo)))
        q_px, _ = self._decode(record, record["query_image"], "query_image", q_min)
        clock.mark("decode")
        crop = (sample_crop(rng, aug.query_crop_scale, aug.query_crop_ratio, q_px.shape[1], q_px.shape[0]) if aug
                else (0.0, 0.0, 1.0, 1.0))
        query = crop_resize(q_px, crop, size)
        clock.mark("crop_resize")
        q_jitter = None
        if aug:
            if rng.random() < aug.hflip_prob:
                query = query[:, ::-1]
            q_jitter = draw_jitter(rng, aug.brightness, aug.contrast, aug.saturation)
        q_out = self._pixels(query, q_jitter)
        clock.mark("augment")

        # Item image: image 0 (eval) or a random one; the box exists for image 0 only.
        images = record["item_images"]
        j = int(rng.integers(len(images))) if aug and aug.random_item_image and len(images) > 1 else 0
        item_aug = aug if aug and aug.augment_item else None
        i_lo = item_aug.item_crop_scale[0] if item_aug and item_aug.item_crop_scale else 1.0
        i_min = (math.ceil(size[1] / math.sqrt(i_lo)), math.ceil(size[0] / math.sqrt(i_lo)))
        clock.mark("augment")
        i_px, (ow, oh) = self._decode(record, images[j], f"item_images[{j}]", i_min)
        clock.mark("decode")
        has_box = bool(record["has_box"]) and j == 0
        box = (np.asarray(record["target_box"], np.float32) / np.asarray([ow, oh, ow, oh], np.float32)
               if has_box else np.zeros(4, np.float32))
        crop = (0.0, 0.0, 1.0, 1.0)
        if item_aug and item_aug.item_crop_scale:
            crop = sample_crop(rng, item_aug.item_crop_scale, item_aug.item_crop_ratio, i_px.shape[1], i_px.shape[0],
                               must_contain=box if has_box else None)
        item = crop_resize(i_px, crop, size)
        clock.mark("crop_resize")
        if has_box:
            cx0, cy0, cx1, cy1 = crop
            box = (box - np.asarray([cx0, cy0, cx0, cy0], np.float32)) / np.asarray(
                [cx1 - cx0, cy1 - cy0, cx1 - cx0, cy1 - cy0], np.float32)
            box = np.clip(box, 0.0, 1.0)
        i_jitter = None
        if item_aug:
            if rng.random() < item_aug.hflip_prob:
                item = item[:, ::-1]
                if has_box:
                    box = np.asarray([1 - box[2], box[1], 1 - box[0], box[3]], np.float32)
            i_jitter = draw_jitter(rng, item_aug.brightness, item_aug.contrast, item_aug.saturation)
        i_out = self._pixels(item, i_jitter)
        clock.mark("augment")

        ids, mask = self.encode_text(schema.item_text(record["title"], list(record["category"]),
                                                      list(record["attribute_keys"]),
                                                      list(record["attribute_values"])))
        clock.mark("tokenise")
        return {
            **{f"query_{k}": v for k, v in q_out.items()},
            **{f"item_{k}": v for k, v in i_out.items()},
            "item_ids": ids,
            "item_mask": mask,
            "item_index": np.int64(record["item_index"]),
            "target_box": box.astype(np.float32),
            "has_box": np.bool_(has_box),
            "is_mosaic": np.bool_(record["layout"] == "mosaic"),
        }


def make_transform(*, image_size: int | Sequence[int], tokenizer: TextTokenizer, max_text_len: int, train: bool,
                   augment: AugmentConfig | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, photometric: str = "host") -> RecordTransform:
    """The per-example ``transform(record, rng)``; ``train=False`` ignores ``augment``."""
    cfg = TransformConfig(image_size=_hw(image_size), max_text_len=int(max_text_len),
                          augment=(augment or AugmentConfig()) if train else None,
                          mean=tuple(mean), std=tuple(std), photometric=photometric)
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
    photometric: str = "host",
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
                               augment=augment, mean=mean, std=std, photometric=photometric)
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
