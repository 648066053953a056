"""Slot attention heat maps of a trained TIGER-FG item tower on a few test items (for plots).

    heat = slot_heatmaps(task, ctx, layout="mosaic", num_items=4)   # task: trainers.tasks.tigerfg.TigerFGTask
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def item_attention_maps(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """TIGER-FG slot attention over the item's patches (``TigerFG.attention_maps``); module level, so that
    ``EvalContext.apply`` compiles it once. uint8 images (``data.photometric="device"``) are normalised here."""
    from data_pipelines.ecom_rf_immr.pipeline import photometric  # noqa: PLC0415

    if images.dtype == jnp.uint8:
        images = photometric(images, None, xp=jnp)
    return model.attention_maps(images, ids, mask)


@dataclasses.dataclass
class HeatMaps:
    """Slot attention of a trained TIGER-FG item tower on a few test items (for heat-map plots)."""

    images: np.ndarray        # [n, h, w, 3] uint8, the item images (denormalised)
    heatmap: np.ndarray       # [n, g, g] slot maps weighted by the slot pooling weights
    slot_maps: np.ndarray     # [n, K, g, g]
    slot_weights: np.ndarray  # [n, K]
    boxes: np.ndarray         # [n, 4] target boxes in [0, 1]
    titles: list[str]


def slot_heatmaps(task: Any, ctx: Any, *, layout: str = "mosaic", num_items: int = 4) -> HeatMaps:
    """Slot attention maps of ``num_items`` test gallery items (``layout`` "mosaic" or "normal") of a
    TIGER-FG task (``task.eval_sets()``) under the model in ``ctx`` (an ``EvalContext``)."""
    from data_pipelines.ecom_rf_immr.pipeline import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    s = task.eval_sets()[layout]
    n = min(num_items, len(s["item_index"]))
    maps = ctx.apply(item_attention_maps, s["item_image"][:n], s["item_ids"][:n], s["item_mask"][:n])
    images = s["item_image"][:n]
    if images.dtype != np.uint8:  # normalised on the host (data.photometric="host"): undo it
        pixels = images * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
        images = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
    return HeatMaps(images=images, heatmap=np.asarray(maps["heatmap"]),
                    slot_maps=np.asarray(maps["slot_maps"]), slot_weights=np.asarray(maps["slot_weights"]),
                    boxes=s["target_box"][:n], titles=[str(t) for t in s["title"][:n]])
