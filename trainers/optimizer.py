"""The optimizer from the config: schedule, global-norm clipping, AdamW/SGD, weight-decay masks."""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

from models.partitioning import path_name


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine (to ``end_lr_ratio``), linear or constant."""
    peak, warmup = opt.learning_rate, opt.warmup_steps
    end = peak * opt.get("end_lr_ratio", 0.0)
    decay_steps = max(total_steps, warmup + 1)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, end_value=end)
    after = (optax.constant_schedule(peak) if opt.schedule == "constant"
             else optax.linear_schedule(peak, end, decay_steps - warmup))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def frozen_labels(params: Any, frozen: str) -> Any:
    """``"frozen"`` for parameters whose ``a/b/c`` path matches the regex ``frozen``, else ``"train"``."""
    pattern = re.compile(frozen) if frozen else None
    return jax.tree.map_with_path(lambda path, _: "frozen" if pattern and pattern.search(path_name(path)) else "train",
                                  params)


def decay_mask(params: Any, no_decay: str) -> Any:
    """True where weight decay applies: matrices and higher, except paths matching ``no_decay``.

    Biases, LayerNorm scales and scalars (ndim < 2) never decay; ``no_decay`` (a regex over
    ``a/b/c`` parameter paths, e.g. ``"pos|logit_scale|embedding"``) exempts more.
    """
    pattern = re.compile(no_decay) if no_decay else None

    def keep(path, leaf) -> bool:
        return leaf.ndim >= 2 and not (pattern and pattern.search(path_name(path)))

    return jax.tree.map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``params`` may be abstract (ShapeDtypeStructs): only shapes and paths are read."""
    opt = config.optimizer
    schedule = make_schedule(opt, config.train.steps)
    mask = decay_mask(params, opt.get("no_decay", ""))
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8),
                           weight_decay=opt.weight_decay, mask=mask)
    elif opt.name == "sgd":
        core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask),
                           optax.sgd(schedule, momentum=opt.get("momentum", 0.9)))
    else:
        raise ValueError(f"optimizer.name must be adamw or sgd, got {opt.name!r}")
    clip = config.train.grad_clip_norm
    tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
    if opt.get("frozen", ""):
        # Frozen parameters (e.g. a distillation teacher) get no update and no optimizer state.
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   frozen_labels(params, opt.frozen))
    return tx, schedule
