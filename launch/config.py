"""Config loading: ``configs/NAME.py:ARG`` files, typed ``--set`` overrides, validation, the resolved JSON.

A config file defines ``get_config(arg: str) -> ml_collections.ConfigDict``. Overrides are
``dotted.key=value`` strings typed by the value already in the config; an unknown key or a value of
the wrong type is an error naming the key and the closest valid one, raised before anything compiles.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key, the file or the value at fault."""


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:arg]``, apply ``--set`` overrides, validate the result."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    module_spec = importlib.util.spec_from_file_location(f"ecomax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} defines no get_config(arg)")
    try:
        config = module.get_config(arg)
    except KeyError as e:
        raise ConfigError(f"{file}: unknown config argument {arg!r} ({e})") from None
    config = ml_collections.ConfigDict(config)  # a fresh, unlocked copy
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def all_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a nested config, leaves and sub-dicts."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            keys.extend(all_keys(value, dotted + "."))
    return keys


# Keys that were renamed (old -> new): one vocabulary across tasks. A config or an override that still uses
# an old key is rejected with the new one named.
RENAMED = {
    "data.data_dir": "data.root",
    "data.eval_batch_size": "eval.batch_size",
    "data.max_eval_examples": "eval.max_examples",
    "eval.max_queries": "eval.max_examples",
    "eval.max_records": "eval.max_examples",
}


def _renamed(key: str) -> ConfigError:
    return ConfigError(f"{key} was renamed: use {RENAMED[key]}")


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    if key in RENAMED:
        return _renamed(key)
    close = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_value(text: str, current: Any, key: str) -> Any:
    """Parse ``text`` into the type of ``current`` (the value the config already holds)."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--set {key}={text}: cannot parse {text!r} as {type(current).__name__}") from None
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(current)(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise ConfigError(f"--set {key}={text}: expected {type(current).__name__} "
                          f"(like the current value {current!r}), got {type(value).__name__}")
    return value


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    key, sep, text = override.partition("=")
    if not sep:
        raise ConfigError(f"--set expects dotted.key=value, got {override!r}")
    key = key.strip()
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(config, key)
        node = node[part]
    if leaf not in node:
        raise _unknown_key(config, key)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"--set {key}: {key!r} is a group of keys, set one of its fields")
    with node.unlocked():
        node[leaf] = parse_value(text.strip(), node[leaf], key)


# --- validation -------------------------------------------------------------------------------------

_REQUIRED = {
    "task": str, "seed": int,
    "train.steps": int, "train.batch_size": int, "train.microbatches": int, "train.log_every": int,
    "train.eval_every": int, "train.checkpoint_every": int, "train.keep_checkpoints": int,
    "train.compute_dtype": str, "train.grad_clip_norm": float,
    "optimizer.name": str, "optimizer.learning_rate": float, "optimizer.warmup_steps": int,
    "optimizer.schedule": str, "optimizer.weight_decay": float,
    "mesh.data": int, "mesh.fsdp": int, "mesh.tensor": int,
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the keys every trainer reads; errors name the key and what is wrong."""
    for key in all_keys(config):
        if key in RENAMED:
            raise _renamed(key)
    for dotted, kind in _REQUIRED.items():
        try:
            value = _get(config, dotted)
        except (KeyError, AttributeError):
            raise ConfigError(f"config is missing required key {dotted!r}") from None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config key {dotted!r} must be {kind.__name__}, got {value!r}")
    train = config.train
    if train.batch_size <= 0 or train.steps < 0:
        raise ConfigError("train.batch_size must be positive and train.steps non-negative")
    if train.microbatches < 1 or train.batch_size % train.microbatches:
        raise ConfigError(f"train.batch_size={train.batch_size} must be divisible by "
                          f"train.microbatches={train.microbatches}")
    if train.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"train.compute_dtype must be float32, bfloat16 or float16, got {train.compute_dtype!r}")
    if config.optimizer.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"optimizer.schedule must be cosine, constant or linear, got {config.optimizer.schedule!r}")
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.get("expert", 1), config.mesh.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes {sizes}: each must be positive, and at most one may be -1")
    batch = [a.strip() for a in config.get("sharding", {}).get("rules", {}).get("batch", "").split(",")]
    if "data" in batch and "fsdp" in batch and batch.index("data") < batch.index("fsdp"):
        raise ConfigError("sharding.rules.batch='data,fsdp': jaxlib 0.10.2's SPMD partitioner swaps batch rows "
                          "in matmuls with fsdp-sharded weights under this order (wrong gradients); use 'fsdp,data'")
    for name, axes in config.get("sharding", {}).get("rules", {}).items():
        for axis in filter(None, axes.split(",")):
            if axis.strip() not in ("data", "fsdp", "expert", "tensor"):
                raise ConfigError(f"sharding.rules.{name}={axes!r}: unknown mesh axis {axis!r} "
                                  "(use data, fsdp, expert, tensor)")
