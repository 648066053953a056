"""Procedural ECom-RF-IMMR data in the real schema: product images, crops as queries, mosaics.

``synthesize(out_dir, items=200, queries_per_item=2, seed=0)`` writes ``out_dir/manifest.jsonl`` and
``out_dir/images/{items,queries,mosaics}/`` (items and mosaics PNG, queries JPEG), byte-identical for
a seed. Build it like real data: ``build(out_dir / "manifest.jsonl", data_dir)``.

The catalogue: each item (SKU) is a category (the shape: shoe, bag, hat, bottle, shirt, watch, mug,
lamp), a style of that category (three per category, visibly different shapes), a colour (12), a
pattern (solid, stripes, dots, checks) with a pattern colour, and a size. Items come in families:
most new items copy an earlier one and change one attribute, so the nearest wrong items differ from
the right one by a single attribute (fine-grained matching). Titles and attributes are derived from
the attributes, in Chinese and English (``"红色 白色条纹 托特包 red tote bag with white stripes"``).

Images:
* item images (1..``max_item_images`` per item): the product on a textured background, its scale
  set by the size attribute; ``target_box`` is its tight box in image 0.
* queries: the product re-rendered on another background at another scale, then a jittered crop
  around it (margin, offset), resized, with slight colour jitter; each query belongs to one split.
* mosaics: the target among 2-4 distractors of other categories on a random background, boxes
  recorded. Training mosaics hold several *targets* (each the item of its own record, all sharing
  the canvas and a ``mosaic_id``); the test (and val) split pairs every query twice: with the item's
  normal images (Normal benchmark) and with the item's mosaic canvas (Mosaic benchmark).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary

# (name, zh, rgb)
COLOURS = [
    ("red", "红色", (200, 30, 40)), ("orange", "橙色", (240, 130, 30)), ("yellow", "黄色", (235, 205, 40)),
    ("green", "绿色", (40, 145, 60)), ("teal", "青色", (30, 150, 150)), ("blue", "蓝色", (45, 85, 205)),
    ("navy", "藏青色", (25, 35, 95)), ("purple", "紫色", (125, 55, 165)), ("pink", "粉色", (240, 140, 185)),
    ("brown", "棕色", (120, 72, 32)), ("black", "黑色", (28, 28, 30)), ("white", "白色", (238, 238, 235)),
]
ACCENTS = [11, 10, 2, 0]  # pattern colours: white, black, yellow, red (indices into COLOURS)
# (name, zh, en adjective, en noun)
PATTERNS = [("solid", "纯色", "solid", ""), ("stripes", "条纹", "striped", "stripes"),
            ("dots", "波点", "polka-dot", "dots"), ("checks", "格纹", "checked", "checks")]
SIZES = [("small", "小号", 0.55), ("medium", "中号", 0.70), ("large", "大号", 0.85)]

# Primitives in unit coordinates of the object's box (u right, v down):
#   (part, kind, *args); part: "body" (patterned), "detail" (plain), "cut" (erases both).
#   kinds: poly [(u,v)...] | rect (u0,v0,u1,v1) | rrect box r | ellipse box | chord box a0 a1
#          | arc box a0 a1 width | line [(u,v)...] width      (r, width: fractions of min(w, h))


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    zh: str
    en: str
    prims: tuple
    detail: str = "dark"  # detail colour: dark | light | shade


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    zh: str
    en: str
    dept: tuple[str, str]
    aspect: float  # width / height
    styles: tuple[Style, ...]


CATEGORIES = (
    Category("shoe", "鞋", "shoe", ("鞋靴", "footwear"), 1.6, (
        Style("low_top", "低帮帆布鞋", "low-top sneaker", (
            ("body", "poly", [(.04, .55), (.35, .42), (.52, .22), (.70, .22), (.74, .48), (.96, .60), (.96, .80),
                              (.04, .80)]),
            ("detail", "rect", (.02, .78, .98, .93)))),
        Style("high_top", "高帮帆布鞋", "high-top sneaker", (
            ("body", "poly", [(.04, .55), (.30, .45), (.46, .04), (.72, .04), (.74, .48), (.96, .60), (.96, .80),
                              (.04, .80)]),
            ("detail", "rect", (.02, .78, .98, .93)),
            ("detail", "line", [(.48, .12), (.70, .12)], .05))),
        Style("boot", "短靴", "ankle boot", (
            ("body", "poly", [(.04, .60), (.34, .55), (.42, .00), (.80, .00), (.80, .55), (.96, .66), (.96, .84),
                              (.04, .84)]),
            ("detail", "rect", (.02, .82, .98, .96)),
            ("detail", "rect", (.70, .82, .86, 1.0))), "shade"),
    )),
    Category("bag", "包", "bag", ("箱包", "bags"), 1.0, (
        Style("tote", "托特包", "tote bag", (
            ("body", "rect", (.10, .36, .90, .96)),
            ("detail", "arc", (.24, .06, .48, .62), 180, 360, .05),
            ("detail", "arc", (.52, .06, .76, .62), 180, 360, .05))),
        Style("crossbody", "斜挎包", "crossbody bag", (
            ("detail", "line", [(.16, .55), (.50, .02), (.84, .55)], .035),
            ("body", "rrect", (.14, .46, .86, .92), .12),
            ("detail", "chord", (.14, .30, .86, .74), 0, 180)), "shade"),
        Style("backpack", "双肩包", "backpack", (
            ("body", "rrect", (.16, .14, .84, .97), .30),
            ("detail", "rrect", (.28, .58, .72, .88), .10),
            ("detail", "arc", (.38, .02, .62, .26), 180, 360, .05))),
    )),
    Category("hat", "帽", "hat", ("服饰配件", "accessories"), 1.4, (
        Style("cap", "棒球帽", "baseball cap", (
            ("body", "chord", (.10, .12, .76, 1.20), 180, 360),
            ("detail", "ellipse", (.50, .58, .99, .80)),
            ("detail", "ellipse", (.40, .10, .46, .18)))),
        Style("bucket", "渔夫帽", "bucket hat", (
            ("body", "poly", [(.30, .18), (.70, .18), (.78, .66), (.22, .66)]),
            ("body", "poly", [(.04, .86), (.22, .62), (.78, .62), (.96, .86)])), "shade"),
        Style("top_hat", "礼帽", "top hat", (
            ("body", "rect", (.30, .04, .70, .76)),
            ("body", "ellipse", (.04, .68, .96, .90)),
            ("detail", "rect", (.30, .58, .70, .68)))),
    )),
    Category("bottle", "瓶", "bottle", ("家居日用", "home"), 0.45, (
        Style("water_bottle", "运动水瓶", "water bottle", (
            ("body", "rrect", (.08, .30, .92, 1.0), .25),
            ("body", "rect", (.30, .16, .70, .34)),
            ("detail", "rect", (.26, .00, .74, .16)))),
        Style("tumbler", "保温杯", "tumbler", (
            ("body", "poly", [(.10, .12), (.90, .12), (.80, 1.0), (.20, 1.0)]),
            ("detail", "rect", (.04, .00, .96, .12))), "light"),
        Style("flask", "随行水壶", "flask", (
            ("body", "ellipse", (.04, .26, .96, 1.0)),
            ("detail", "rect", (.34, .02, .66, .30)))),
    )),
    Category("shirt", "衫", "shirt", ("服装", "clothing"), 1.1, (
        Style("tshirt", "T恤", "t-shirt", (
            ("body", "poly", [(.30, .04), (.70, .04), (.98, .22), (.88, .42), (.76, .36), (.76, .98), (.24, .98),
                              (.24, .36), (.12, .42), (.02, .22)]),
            ("cut", "chord", (.38, -.10, .62, .16), 0, 180))),
        Style("long_sleeve", "长袖衫", "long-sleeve shirt", (
            ("body", "poly", [(.30, .04), (.70, .04), (.90, .20), (1.0, .94), (.86, .96), (.76, .40), (.76, .98),
                              (.24, .98), (.24, .40), (.14, .96), (.0, .94), (.10, .20)]),
            ("cut", "chord", (.38, -.10, .62, .16), 0, 180))),
        Style("tank_top", "背心", "tank top", (
            ("body", "poly", [(.30, .02), (.40, .02), (.42, .14), (.58, .14), (.60, .02), (.70, .02), (.74, .30),
                              (.78, .98), (.22, .98), (.26, .30)]),), "shade"),
    )),
    Category("watch", "表", "watch", ("服饰配件", "accessories"), 0.6, (
        Style("round", "圆盘手表", "round watch", (
            ("body", "rect", (.28, .00, .72, 1.0)),
            ("detail", "ellipse", (.06, .28, .94, .72))), "light"),
        Style("square", "方盘手表", "square watch", (
            ("body", "rect", (.28, .00, .72, 1.0)),
            ("detail", "rrect", (.08, .30, .92, .70), .12)), "light"),
        Style("sport", "运动手表", "sport watch", (
            ("body", "rect", (.16, .00, .84, 1.0)),
            ("detail", "ellipse", (.00, .24, 1.0, .76)),
            ("cut", "ellipse", (.22, .38, .78, .62)))),
    )),
    Category("mug", "杯", "mug", ("家居日用", "home"), 1.25, (
        Style("classic", "马克杯", "mug", (
            ("body", "rect", (.06, .08, .70, .96)),
            ("detail", "arc", (.54, .26, .96, .76), 270, 90, .07))),
        Style("latte", "拿铁杯", "latte cup", (
            ("body", "poly", [(.02, .14), (.78, .14), (.66, .92), (.14, .92)]),
            ("detail", "ellipse", (.00, .86, .80, 1.0))), "shade"),
        Style("travel", "随行杯", "travel mug", (
            ("body", "poly", [(.26, .16), (.74, .16), (.68, 1.0), (.32, 1.0)]),
            ("detail", "rrect", (.22, .00, .78, .18), .05))),
    )),
    Category("lamp", "灯", "lamp", ("家居日用", "home"), 0.8, (
        Style("table_lamp", "台灯", "table lamp", (
            ("body", "poly", [(.22, .02), (.78, .02), (.96, .52), (.04, .52)]),
            ("detail", "rect", (.45, .52, .55, .90)),
            ("detail", "ellipse", (.22, .86, .78, 1.0)))),
        Style("dome", "圆顶灯", "dome lamp", (
            ("body", "chord", (.02, .04, .98, 1.00), 180, 360),
            ("detail", "rect", (.46, .52, .54, .90)),
            ("detail", "rect", (.26, .88, .74, .98))), "shade"),
        Style("drum", "筒灯", "drum lamp", (
            ("body", "rect", (.12, .00, .88, .46)),
            ("detail", "rect", (.44, .46, .56, .86)),
            ("detail", "rrect", (.20, .86, .80, 1.0), .05))),
    )),
)


@dataclasses.dataclass(frozen=True)
class ItemSpec:
    category: int
    style: int
    colour: int
    pattern: int
    accent: int  # index into COLOURS; -1 for solid
    size: int

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        return (self.category, self.style, self.colour, self.pattern, self.accent)


def item_text(spec: ItemSpec) -> dict[str, Any]:
    """Title, category path and attributes of an item, in Chinese and English."""
    cat = CATEGORIES[spec.category]
    style = cat.styles[spec.style]
    c_name, c_zh, _ = COLOURS[spec.colour]
    p_name, p_zh, p_adj, p_noun = PATTERNS[spec.pattern]
    if spec.pattern == 0:
        zh = f"{c_zh} 纯色 {style.zh}"
        en = f"solid {c_name} {style.en}"
    else:
        a_name, a_zh, _ = COLOURS[spec.accent]
        zh = f"{c_zh} {a_zh}{p_zh} {style.zh}"
        en = f"{c_name} {style.en} with {a_name} {p_noun}"
    s_name, s_zh, _ = SIZES[spec.size]
    attributes = [f"color:{c_zh} {c_name}", f"pattern:{p_zh} {p_adj}"]
    if spec.pattern:
        attributes.append(f"pattern_color:{COLOURS[spec.accent][1]} {COLOURS[spec.accent][0]}")
    attributes += [f"style:{style.zh} {style.en}", f"size:{s_zh} {s_name}"]
    return {
        "title": f"{zh} {en}",
        "category": [f"{cat.dept[0]} {cat.dept[1]}", f"{cat.zh} {cat.en}", f"{style.zh} {style.en}"],
        "attributes": attributes,
    }


# ----------------------------------------------------------------------------- rendering


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in key]])


def _uv_box(box, w, h):
    return [box[0] * w, box[1] * h, box[2] * w, box[3] * h]


def _draw_prim(draws: dict[str, ImageDraw.ImageDraw], prim, w: int, h: int) -> None:
    part, kind, *args = prim
    targets = [(draws["body"], 0), (draws["detail"], 0)] if part == "cut" else [(draws[part], 255)]
    m = min(w, h)
    for d, fill in targets:
        if kind == "poly":
            d.polygon([(u * w, v * h) for u, v in args[0]], fill=fill)
        elif kind == "rect":
            d.rectangle(_uv_box(args[0], w, h), fill=fill)
        elif kind == "rrect":
            d.rounded_rectangle(_uv_box(args[0], w, h), radius=args[1] * m, fill=fill)
        elif kind == "ellipse":
            d.ellipse(_uv_box(args[0], w, h), fill=fill)
        elif kind == "chord":
            d.chord(_uv_box(args[0], w, h), args[1], args[2], fill=fill)
        elif kind == "arc":
            d.arc(_uv_box(args[0], w, h), args[1], args[2], fill=fill, width=max(1, round(args[3] * m)))
        elif kind == "line":
            d.line([(u * w, v * h) for u, v in args[0]], fill=fill, width=max(1, round(args[1] * m)), joint="curve")
        else:
            raise ValueError(f"unknown primitive {kind!r}")


def _pattern_mask(pattern: int, w: int, h: int) -> np.ndarray:
    """[h, w] float in {0, 1}: where the pattern colour shows (object-relative period)."""
    if pattern == 0:
        return np.zeros((h, w), np.float32)
    period = max(3.0, min(w, h) / 5.0)
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if pattern == 1:  # horizontal stripes
        return ((y / (period / 2)) % 2 < 1).astype(np.float32)
    if pattern == 2:  # dots on a grid
        cy = (y % period) - period / 2
        cx = (x % period) - period / 2
        return (cx * cx + cy * cy < (0.28 * period) ** 2).astype(np.float32)
    return (((x // (period / 2)) + (y // (period / 2))) % 2).astype(np.float32)  # checks


def render_object(spec: ItemSpec, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """The product at ``w x h`` pixels: (rgb float32 [h, w, 3] in 0..255, alpha float32 [h, w])."""
    w, h = max(2, int(w)), max(2, int(h))
    ss = 2  # supersampled masks for smooth edges
    masks = {p: Image.new("L", (w * ss, h * ss), 0) for p in ("body", "detail")}
    draws = {p: ImageDraw.Draw(m) for p, m in masks.items()}
    style = CATEGORIES[spec.category].styles[spec.style]
    for prim in style.prims:
        _draw_prim(draws, prim, w * ss, h * ss)
    body = np.asarray(masks["body"].resize((w, h), Image.BILINEAR), np.float32) / 255.0
    detail = np.asarray(masks["detail"].resize((w, h), Image.BILINEAR), np.float32) / 255.0
    main = np.asarray(COLOURS[spec.colour][2], np.float32)
    pm = _pattern_mask(spec.pattern, w, h)[..., None]
    accent = np.asarray(COLOURS[spec.accent][2] if spec.accent >= 0 else COLOURS[spec.colour][2], np.float32)
    tex = main * (1 - pm) + accent * pm
    shade = np.linspace(1.06, 0.86, h, dtype=np.float32)[:, None, None]
    if style.detail == "light":
        detail_rgb = np.asarray((228, 228, 222), np.float32)
    elif style.detail == "shade":
        detail_rgb = main * 0.55 + 15
    else:
        detail_rgb = np.asarray((48, 46, 50), np.float32)
    d = detail[..., None]
    rgb = np.clip(tex * shade, 0, 255) * (1 - d) + detail_rgb * d
    alpha = np.clip(np.maximum(body, detail), 0.0, 1.0)
    return rgb.astype(np.float32), alpha


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A textured background, float32 [h, w, 3] in 0..255."""
    kind = int(rng.integers(4))
    base = rng.uniform(70, 235, size=3).astype(np.float32)
    low = np.clip(rng.normal(128, 22, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), np.float32) + (base - 128)
    y = np.arange(h, dtype=np.float32)[:, None, None]
    x = np.arange(w, dtype=np.float32)[None, :, None]
    if kind == 1:  # wood-like grain
        f = rng.uniform(0.15, 0.5)
        img += 14 * np.sin(f * y + 3 * np.sin(x * 0.05 + rng.uniform(0, 6)))
    elif kind == 2:  # tiles
        step = int(rng.integers(10, 24))
        img -= 30 * (((x % step) < 1) | ((y % step) < 1))
    elif kind == 3:  # gradient
        img *= 0.8 + 0.35 * (x + y) / (w + h)
    img += 4 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)
    return img


def fit_size(aspect: float, max_w: float, max_h: float) -> tuple[int, int]:
    """Largest (w, h) with w / h = aspect inside max_w x max_h."""
    w = min(max_w, max_h * aspect)
    return max(2, int(round(w))), max(2, int(round(w / aspect)))


def paste(canvas: np.ndarray, spec: ItemSpec, x: int, y: int, w: int, h: int, flip: bool = False) -> list[int]:
    """Render ``spec`` at (x, y, w, h) onto ``canvas`` in place; returns its tight box [x0,y0,x1,y1]."""
    rgb, alpha = render_object(spec, w, h)
    if flip:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    sub_rgb = rgb[y0 - y:y1 - y, x0 - x:x1 - x]
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a[..., None]) + sub_rgb * a[..., None]
    rows = np.nonzero((a > 0.5).any(axis=1))[0]
    cols = np.nonzero((a > 0.5).any(axis=0))[0]
    if len(rows) == 0:
        return [x0, y0, x1, y1]
    return [int(x0 + cols[0]), int(y0 + rows[0]), int(x0 + cols[-1] + 1), int(y0 + rows[-1] + 1)]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(_to_uint8(img)).save(buf, format="JPEG", quality=90, optimize=False)
    else:
        Image.fromarray(_to_uint8(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_item_image(spec: ItemSpec, rng: np.random.Generator, size: int, *,
                      view: int) -> tuple[np.ndarray, list[int]]:
    """Normal layout: one product on a textured background (scale from the size attribute)."""
    canvas = background(rng, size, size)
    frac = SIZES[spec.size][2] * (1.0 if view == 0 else rng.uniform(0.8, 1.0)) * rng.uniform(0.96, 1.04)
    w, h = fit_size(CATEGORIES[spec.category].aspect, frac * size, frac * size)
    x = int((size - w) / 2 + rng.uniform(-0.25, 0.25) * (size - w))
    y = int((size - h) / 2 + rng.uniform(-0.25, 0.25) * (size - h))
    box = paste(canvas, spec, x, y, w, h, flip=view % 2 == 1)
    return canvas, box


def render_query(spec: ItemSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """A cropped product photo: the product re-rendered on another background at another scale
    (a ``k``-times larger canvas, resampled to ``size``), a jittered crop (margin -4..30% of the
    product, offset +-10%), and slight brightness/contrast/saturation jitter."""
    k = rng.uniform(1.0, 1.6)
    c = int(round(size * k))
    scene = background(rng, c, c)
    margin = rng.uniform(-0.04, 0.3)
    w, h = fit_size(CATEGORIES[spec.category].aspect, c / (1 + 2 * margin), c / (1 + 2 * margin))
    x = int(round((c - w) / 2 + rng.uniform(-0.1, 0.1) * w))
    y = int(round((c - h) / 2 + rng.uniform(-0.1, 0.1) * h))
    paste(scene, spec, x, y, w, h, flip=bool(rng.random() < 0.5))
    img = np.asarray(Image.fromarray(_to_uint8(scene)).resize((size, size), Image.BILINEAR), np.float32)
    img = img * rng.uniform(0.88, 1.12)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.88, 1.12) + mean  # contrast
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * rng.uniform(0.88, 1.12) + grey  # saturation
    return img


def render_mosaic(specs: list[ItemSpec], rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[list[int]]]:
    """Mosaic layout: the products in random grid cells on a random background; their boxes."""
    n = len(specs)
    rows, cols = (2, 2) if n <= 4 else ((2, 3) if rng.random() < 0.5 else (3, 2))
    cells = rng.permutation(rows * cols)[:n]
    canvas = background(rng, size, size)
    cw, ch = size / cols, size / rows
    boxes = []
    for spec, cell in zip(specs, cells):
        r, c = divmod(int(cell), cols)
        frac = rng.uniform(0.72, 0.95)
        w, h = fit_size(CATEGORIES[spec.category].aspect, frac * cw, frac * ch)
        x = int(c * cw + rng.uniform(0, max(0.0, cw - w)))
        y = int(r * ch + rng.uniform(0, max(0.0, ch - h)))
        boxes.append(paste(canvas, spec, x, y, w, h))
    return canvas, boxes


# ----------------------------------------------------------------------------- catalogue


def _all_keys() -> list[tuple[int, int, int, int, int]]:
    keys = []
    for c, cat in enumerate(CATEGORIES):
        for s in range(len(cat.styles)):
            for col in range(len(COLOURS)):
                for p in range(len(PATTERNS)):
                    accents = [-1] if p == 0 else [a for a in ACCENTS if a != col]
                    keys.extend((c, s, col, p, a) for a in accents)
    return keys


CATALOGUE_CAPACITY = len(_all_keys())


def make_catalogue(n: int, seed: int) -> list[ItemSpec]:
    """``n`` distinct items in families that differ by one attribute."""
    if n > CATALOGUE_CAPACITY:
        raise ValueError(f"items={n} exceeds the {CATALOGUE_CAPACITY} distinct products the generator can draw")
    rng = _rng(seed, 1)
    used: set[tuple[int, int, int, int, int]] = set()
    items: list[ItemSpec] = []

    def accent_for(col: int) -> int:
        choices = [a for a in ACCENTS if a != col]
        return int(choices[rng.integers(len(choices))])

    def random_spec() -> ItemSpec:
        c = int(rng.integers(len(CATEGORIES)))
        col = int(rng.integers(len(COLOURS)))
        p = int(rng.integers(len(PATTERNS)))
        return ItemSpec(c, int(rng.integers(len(CATEGORIES[c].styles))), col, p,
                        -1 if p == 0 else accent_for(col), int(rng.integers(len(SIZES))))

    def mutate(parent: ItemSpec) -> ItemSpec:
        what = int(rng.integers(4))
        if what == 0:  # colour
            col = int(rng.integers(len(COLOURS)))
            acc = parent.accent if parent.accent != col else (-1 if parent.pattern == 0 else accent_for(col))
            return dataclasses.replace(parent, colour=col, accent=acc)
        if what == 1:  # pattern
            p = int(rng.integers(len(PATTERNS)))
            acc = -1 if p == 0 else (parent.accent if parent.accent >= 0 else accent_for(parent.colour))
            return dataclasses.replace(parent, pattern=p, accent=acc)
        if what == 2 and parent.pattern:  # pattern colour
            return dataclasses.replace(parent, accent=accent_for(parent.colour))
        return dataclasses.replace(parent, style=int(rng.integers(len(CATEGORIES[parent.category].styles))))

    misses = 0
    while len(items) < n:
        spec = random_spec() if not items or rng.random() < 0.3 else mutate(items[int(rng.integers(len(items)))])
        if spec.key in used:
            misses += 1
            if misses > 200 + 20 * n:  # nearly full: draw from what is left
                left = [k for k in _all_keys() if k not in used]
                k = left[int(rng.integers(len(left)))]
                spec = ItemSpec(*k, size=int(rng.integers(len(SIZES))))
            else:
                continue
        used.add(spec.key)
        items.append(spec)
    return items


# ----------------------------------------------------------------------------- the generator


def synthesize(
    out_dir: os.PathLike | str,
    *,
    items: int = 200,
    queries_per_item: int = 2,
    seed: int = 0,
    image_size: int = 96,
    max_item_images: int = 2,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    mosaic_fraction: float = 0.4,
    image_format: str = "JPEG",
) -> Path:
    """Write a synthetic ECom-RF-IMMR manifest + images under ``out_dir``; returns the manifest path.

    Every query (``queries_per_item`` per item) goes to one split (test with ``test_fraction``, val
    with ``val_fraction``, else train). Train queries are paired with the item's normal images, or,
    with ``mosaic_fraction``, with a shared training mosaic (``mosaic_id``, 3-5 products of different
    categories, each a target). Val/test queries give one normal and one mosaic pair each.
    Queries are JPEG (phone photos); item images and mosaic canvases ``image_format`` ("JPEG", quality
    90, as real catalogues store them, or "PNG").
    """
    if items < 1 or queries_per_item < 1:
        raise ValueError("items and queries_per_item must be >= 1")
    if image_format not in ("JPEG", "PNG"):
        raise ValueError(f"image_format must be 'JPEG' or 'PNG', got {image_format!r}")
    ext = {"JPEG": "jpg", "PNG": "png"}[image_format]
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in [16, 4096], got {image_size}")
    out = Path(out_dir)
    for sub in ("items", "queries", "mosaics"):
        (out / "images" / sub).mkdir(parents=True, exist_ok=True)
    catalogue = make_catalogue(items, seed)
    texts = [item_text(s) for s in catalogue]
    item_ids = [f"sku{i:06d}" for i in range(items)]
    by_category: list[list[int]] = [[] for _ in CATEGORIES]
    for i, s in enumerate(catalogue):
        by_category[s.category].append(i)

    def write(rel: str, img: np.ndarray, fmt: str) -> str:
        with open(out / rel, "wb") as f:
            f.write(_encode(img, fmt))
        return rel

    # Item images (normal layout): the catalogue's product photos.
    item_images: list[list[str]] = []
    item_box: list[list[int]] = []
    for i, spec in enumerate(catalogue):
        rng = _rng(seed, 2, i)
        n_img = 1 + int(rng.integers(max(1, max_item_images)))
        paths = []
        for j in range(n_img):
            img, box = render_item_image(spec, rng, image_size, view=j)
            if j == 0:
                item_box.append(box)
            paths.append(write(f"images/items/{item_ids[i]}_{j}.{ext}", img, image_format))
        item_images.append(paths)

    # Queries and their splits.
    split_rng = _rng(seed, 3)
    queries = []  # (item, k, split)
    for i in range(items):
        for k in range(queries_per_item):
            u = split_rng.random()
            split = "test" if u < test_fraction else ("val" if u < test_fraction + val_fraction else "train")
            queries.append((i, k, split))
    if test_fraction > 0 and not any(q[2] == "test" for q in queries):
        queries[-1] = (queries[-1][0], queries[-1][1], "test")
    if test_fraction < 1 and not any(q[2] == "train" for q in queries):
        queries[0] = (queries[0][0], queries[0][1], "train")
    query_path = {}
    for i, k, _ in queries:
        img = render_query(catalogue[i], _rng(seed, 4, i, k), image_size)
        query_path[(i, k)] = write(f"images/queries/q{i:06d}_{k}.jpg", img, "JPEG")

    def base_record(i: int, k: int, split: str) -> dict[str, Any]:
        return {"query_image": query_path[(i, k)], "query_id": f"q{i:06d}_{k}", "item_id": item_ids[i],
                "item_index": i, "item_images": None, "title": texts[i]["title"],
                "category": texts[i]["category"], "attributes": texts[i]["attributes"], "split": split}

    def distractors(exclude_categories: list[int], count: int, rng: np.random.Generator) -> list[int]:
        cats = [c for c in range(len(CATEGORIES)) if c not in exclude_categories and by_category[c]]
        chosen = rng.permutation(len(cats))[:count]
        return [by_category[cats[int(c)]][int(rng.integers(len(by_category[cats[int(c)]])))] for c in chosen]

    records: list[dict[str, Any]] = []
    mosaic_rng = _rng(seed, 5)
    train_mosaic = []
    for i, k, split in queries:
        if split != "train":
            continue
        if mosaic_rng.random() < mosaic_fraction:
            train_mosaic.append((i, k))
            continue
        rec = base_record(i, k, split)
        rec.update(item_images=item_images[i], layout="normal", target_box=item_box[i])
        records.append(rec)

    # Training mosaics: several targets (different categories) share one canvas and mosaic_id.
    order = [train_mosaic[int(j)] for j in mosaic_rng.permutation(len(train_mosaic))]
    canvases: list[list[tuple[int, int]]] = []
    while order:
        target_size = int(mosaic_rng.integers(3, 6))
        members, rest = [], []
        for i, k in order:
            if len(members) < target_size and catalogue[i].category not in [catalogue[m].category for m, _ in members]:
                members.append((i, k))
            else:
                rest.append((i, k))
        canvases.append(members)
        order = rest
    for m, members in enumerate(canvases):
        rng = _rng(seed, 6, m)
        target_size = max(3, len(members))
        specs_idx = [i for i, _ in members]
        specs_idx += distractors([catalogue[i].category for i in specs_idx], target_size - len(members), rng)
        img, boxes = render_mosaic([catalogue[i] for i in specs_idx], rng, image_size)
        mosaic_id = f"mtrain{m:06d}"
        path = write(f"images/mosaics/{mosaic_id}.{ext}", img, image_format)
        for (i, k), box in zip(members, boxes):
            rec = base_record(i, k, "train")
            rec.update(item_images=[path], layout="mosaic", target_box=box, mosaic_id=mosaic_id)
            records.append(rec)

    # Val/test: each query with the item's normal images and with the item's mosaic canvas.
    eval_mosaic: dict[tuple[str, int], tuple[str, list[int]]] = {}
    for split in ("val", "test"):
        for i, k, s in queries:
            if s != split:
                continue
            rec = base_record(i, k, split)
            rec.update(item_images=item_images[i], layout="normal", target_box=item_box[i])
            records.append(rec)
            if (split, i) not in eval_mosaic:
                rng = _rng(seed, 7 if split == "test" else 8, i)
                n_dis = int(rng.integers(2, 5))
                idx = [i] + distractors([catalogue[i].category], n_dis, rng)
                img, boxes = render_mosaic([catalogue[j] for j in idx], rng, image_size)
                mosaic_id = f"m{split}{i:06d}"
                eval_mosaic[(split, i)] = (write(f"images/mosaics/{mosaic_id}.{ext}", img, image_format), boxes[0])
            path, box = eval_mosaic[(split, i)]
            rec = base_record(i, k, split)
            rec.update(item_images=[path], layout="mosaic", target_box=box, mosaic_id=f"m{split}{i:06d}")
            records.append(rec)

    manifest = out / "manifest.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    return manifest
