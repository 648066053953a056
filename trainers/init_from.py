"""Start towers from pretrained weights: ``config.init_from.<name> = {format, path, target, skip, family}``.

Each entry with a non-empty ``path`` imports a Hugging Face folder (``format="hf"``, ``models/hf_import.py``),
a Qwen2 / Llama folder into tunix's Qwen2 (``format="tunix"``: the search agents' policy, ``models/policy.py``)
or the parameters of another ecomax run (``format="ecomax"``: its workdir or checkpoints folder, the newest
verified step unless ``step``, or an ``ecomax export --format params`` folder; the subtree ``source`` of
them: LTRGR continues a DSI run this way, TIGER-FG takes a trained run's ViT as its teacher) and puts
its parameters at ``target`` (a ``/``-separated path into the model's parameters, e.g. ``query/vit``)
with the shardings the rules give that subtree. Each process places only the shards its own devices
hold (``jax.make_array_from_callback``): the model is never whole on one device. Applied once, when a
run starts from scratch; a resumed run takes its weights from the checkpoint.

    --set init_from.query.path=/models/vit-base-patch16-224 --set init_from.query.skip='pooler\\..*'
    --set init_from.model.path=runs/gr_dsi       # (config: format="ecomax", target="")
    --set init_from.mt5.path=/models/mt5-base    # (config: grow="embedding|lm_head": + the SID code rows)
    --set init_from.teacher.path=runs/teacher    # (config: format="ecomax", source="item_vit", target="teacher")
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from models.partitioning import path_name

log = logging.getLogger(__name__)


def _keys(target: str) -> list[Any]:
    return [int(k) if k.isdigit() else k for k in target.split("/") if k]


def _subtree(tree: dict, target: str, what: str, role: str = "target") -> Any:
    node = tree
    for key in _keys(target):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"init_from {role} {target!r}: {what} has no {key!r} "
                             f"(it has {sorted(map(str, node)) if isinstance(node, dict) else 'a leaf'})")
        node = node[key]
    return node


def _replace(tree: dict, target: str, value: Any) -> dict:
    keys = _keys(target)
    if not keys:
        return value
    return {**tree, keys[0]: _replace(tree[keys[0]], path_name(keys[1:]), value)}


def grow(array: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``array`` enlarged to ``shape`` (no axis smaller): its values in the leading block, new entries drawn
    from ``N(0, std(array))`` seeded by ``name`` (the same on every host). For a pretrained vocabulary
    extended by new tokens, e.g. mT5's 250,112 pieces + the SID code rows of a generative retriever."""
    if len(shape) != array.ndim or any(a > b for a, b in zip(array.shape, shape)):
        raise ValueError(f"init_from {name}: cannot grow {array.shape} to {shape}")
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16)
    out = (np.random.default_rng(seed).standard_normal(shape) * float(array.std() or 1.0)).astype(array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


def place(imported: Any, current: Any, shardings: Any, where: str, grown: str = "") -> Any:
    """Put the host arrays ``imported`` on the devices with ``shardings``, checking ``current``'s shapes;
    tensors whose name matches the regex ``grown`` may be smaller than the model's (see ``grow``)."""
    # keyed by "a/0/kernel" names: a restored checkpoint spells list indices as "0", the model as 0
    flat_current = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(current)[0]}
    flat_imported = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(imported)[0]}
    name = lambda path: where + (path if isinstance(path, str) else path_name(path))  # noqa: E731
    missing = sorted(name(p) for p in flat_current.keys() - flat_imported.keys())
    extra = sorted(name(p) for p in flat_imported.keys() - flat_current.keys())
    if missing or extra:
        raise ValueError(f"init_from {where}: the imported parameters do not match the model; "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")

    def put(path, leaf, sharding):
        array = np.asarray(flat_imported[path_name(path)], dtype=leaf.dtype)
        if array.shape != leaf.shape and grown and re.search(grown, path_name(path)):
            array = grow(array, leaf.shape, name(path))
        if array.shape != leaf.shape:
            raise ValueError(f"init_from {name(path)}: imported shape {array.shape} != model shape {leaf.shape}")
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map_with_path(put, current, shardings)


def checkpoint_params(path: str, step: int | None, source: str) -> Any:
    """The parameters of an ecomax run (``path``: its workdir or its ``checkpoints`` folder, the newest
    finished step unless ``step``, verified) or of an ``ecomax export --format params`` folder, as host
    arrays: the subtree ``source`` of them (default: all)."""
    import json  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    from trainers.checkpoints import Checkpointer  # noqa: PLC0415

    folder = pathlib.Path(path)
    manifest = folder / "export.json"
    if manifest.is_file():
        kind = json.loads(manifest.read_text()).get("kind")
        if kind != "params":
            raise ValueError(f"init_from: {path} is an ecomax {kind!r} export; only 'params' exports hold parameters")
        import orbax.checkpoint as ocp  # noqa: PLC0415

        ckpt = ocp.StandardCheckpointer()
        try:
            params = jax.tree.map(np.asarray, ckpt.restore((folder / "params").absolute()))
        finally:
            ckpt.close()
        return _subtree(params, source, f"params export {folder}", "source")
    folder = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"init_from: {path} is neither an ecomax workdir, its checkpoints folder nor a "
                                "params export")
    ckpt = Checkpointer(folder, use_async=False)
    try:
        params, _ = ckpt.read_params(step)
    finally:
        ckpt.close()
    return _subtree(params, source, f"checkpoint {folder}", "source")


def apply_init_from(params: dict, param_shardings: dict, init_from: ml_collections.ConfigDict) -> dict:
    """``params`` with every configured pretrained subtree replaced (shardings kept)."""
    from models.hf_import import load_hf

    for name, entry in sorted(init_from.items()):
        if not entry.path:
            continue
        if entry.format == "hf":
            skip = tuple(s for s in entry.get("skip", "").split(",") if s)
            imported = load_hf(entry.path, family=entry.get("family", "") or None, skip=skip)
            log.warning("init_from.%s: %s -> %s\n%s", name, entry.path, entry.target, imported.report)
            weights = imported.params
        elif entry.format == "ecomax":
            weights = checkpoint_params(entry.path, entry.get("step", 0) or None, entry.get("source", ""))
            log.warning("init_from.%s: the parameters of checkpoint %s -> %s", name, entry.path, entry.target or "/")
        elif entry.format == "tunix":
            from flax import nnx

            from models import policy

            state = policy.load_params(entry.path, policy.qwen2_config(None, policy.hf_model_config(entry.path)))
            weights = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
            log.warning("init_from.%s: tunix Qwen2 weights of %s -> %s", name, entry.path, entry.target or "/")
        else:
            raise ValueError(f"init_from.{name}.format={entry.format!r}: 'hf' (a Hugging Face folder with "
                             "config.json + model.safetensors), 'ecomax' (a run's checkpoints folder) or "
                             "'tunix' (a Qwen2 / Llama folder for tunix's Qwen2 policy)")
        current = _subtree(params, entry.target, "the model")
        placed = place(weights, current, _subtree(param_shardings, entry.target, "the shardings"),
                       f"{entry.target}/", entry.get("grow", ""))
        params = _replace(params, entry.target, placed)
    return params
