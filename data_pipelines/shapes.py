"""Procedural image–caption pairs: coloured, patterned shapes and the words that describe them.

The data of the first two-tower task. Example ``i`` of a source is a pure function of (seed, i), so the
source is random-access, needs no files and is identical on every host. Each image shows one shape
(``SHAPES``) in one colour (``COLOURS``) with one pattern (``PATTERNS``) and size (``SIZES``) at a
random position on a noisy background; its caption names the four attributes in a random order, so
a text tower must read words, not positions. Two captions that name the same attributes describe
the same *class*: retrieval relevance is by class.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
PATTERNS = ("solid", "striped", "dotted", "checked")
SIZES = ("small", "large")
FILLERS = ("a", "the", "one", "photo", "of", "with")

VOCAB = ("<pad>", "<unk>") + FILLERS + SHAPES + tuple(COLOURS) + PATTERNS + SIZES
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
NUM_CLASSES = len(SHAPES) * len(COLOURS) * len(PATTERNS) * len(SIZES)


def class_of(shape: int, colour: int, pattern: int, size: int) -> int:
    return ((shape * len(COLOURS) + colour) * len(PATTERNS) + pattern) * len(SIZES) + size


@functools.lru_cache(maxsize=8)
def _grid(h: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:h]
    return y, x


def _shape_mask(kind: str, h: int, cy: float, cx: float, r: float) -> np.ndarray:
    """[h, h] bool mask of one shape of radius ``r`` centred at (cy, cx)."""
    y, x = _grid(h)
    dy, dx = y - cy, x - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if kind == "cross":
        arm = 0.35 * r
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    if kind == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {kind!r}")


def _pattern_mask(kind: str, h: int, phase: int) -> np.ndarray:
    y, x = _grid(h)
    period = max(4, h // 8)
    if kind == "solid":
        return np.ones((h, h), bool)
    if kind == "striped":
        return ((x + phase) // (period // 2)) % 2 == 0
    if kind == "dotted":
        return (((y + phase) % period) < period // 2) & (((x + phase) % period) < period // 2)
    if kind == "checked":
        return (((y + phase) // (period // 2)) + ((x + phase) // (period // 2))) % 2 == 0
    raise ValueError(f"unknown pattern {kind!r}")


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """Random-access source of ``{"image": uint8 [s, s, 3], "tokens": int32 [L], "label": int32}``."""

    num_examples: int
    image_size: int = 32
    max_words: int = 8
    seed: int = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"ShapesSource index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng((self.seed, index))
        shape, colour, pattern, size = (int(rng.integers(n)) for n in
                                        (len(SHAPES), len(COLOURS), len(PATTERNS), len(SIZES)))
        return {
            "image": self._render(rng, shape, colour, pattern, size),
            "tokens": self._caption(rng, shape, colour, pattern, size),
            "label": np.int32(class_of(shape, colour, pattern, size)),
        }

    def _render(self, rng: np.random.Generator, shape: int, colour: int, pattern: int, size: int) -> np.ndarray:
        s = self.image_size
        radius = s * (0.22 if size == 0 else 0.36) * rng.uniform(0.9, 1.1)
        cy, cx = rng.uniform(radius, s - radius, size=2)
        image = rng.integers(90, 160, size=(s, s, 3), dtype=np.uint8)  # noisy grey background
        mask = _shape_mask(SHAPES[shape], s, cy, cx, radius)
        fill = _pattern_mask(PATTERNS[pattern], s, int(rng.integers(8)))
        rgb = np.asarray(list(COLOURS.values())[colour], np.float32)
        noise = rng.integers(-8, 9, size=(s, s, 3), dtype=np.int16)
        image[mask & fill] = np.clip(rgb + noise[mask & fill], 0, 255)
        image[mask & ~fill] = np.clip(0.45 * rgb + 0.55 * 128.0 + noise[mask & ~fill], 0, 255)
        return image

    def _caption(self, rng: np.random.Generator, shape: int, colour: int, pattern: int, size: int) -> np.ndarray:
        words = [SIZES[size], list(COLOURS)[colour], PATTERNS[pattern], SHAPES[shape]]
        words = [words[i] for i in rng.permutation(len(words))]
        words.insert(0, FILLERS[int(rng.integers(len(FILLERS)))])
        tokens = np.zeros(self.max_words, np.int32)
        ids = [WORD_ID[w] for w in words][: self.max_words]
        tokens[: len(ids)] = ids
        return tokens


def normalise_image(image):
    """uint8 ``[..., h, w, 3]`` -> float32 in [-1, 1] (numpy or jax arrays)."""
    return image.astype("float32") / 127.5 - 1.0
