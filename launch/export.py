"""``ecomax export``: a trained workdir -> a serving or hand-off artifact.

    ecomax export --workdir runs/tt --out exports/tt-params --format params [--step N] [--dtype bfloat16]
    ecomax export --workdir runs/tt --out exports/tt-st     --format safetensors
    ecomax export --workdir runs/tt --out exports/tt-hlo    --format stablehlo [--platforms cpu,cuda,tpu]
    ecomax export --workdir runs/tt --out exports/tt-index  --format scann [--corpus eval] [--corpus-size N]
    ecomax export --workdir runs/tt --out exports/tt-items  --format embeddings [--corpus eval] [--corpus-size N]

The parameters come from the newest finished checkpoint of ``WORKDIR/checkpoints`` (or ``--step``),
restored params-only onto one device (the optimizer state is not read), with the resolved config from
``WORKDIR/config.json``. ``--dtype bfloat16`` casts floating parameters. Every artifact folder holds
``config.json`` (the run's config) and ``export.json`` (format, step, config hash, dtype, the tensors or
functions written). Export refuses a non-empty ``--out`` unless ``--force`` (which replaces only the
files it writes), a workdir without a finished checkpoint, and a checkpoint whose files do not match
its integrity record (``trainers.checkpoints``: the same check a resuming run makes).

Formats
-------
``params``
    ``params/``: an Orbax checkpoint of the parameter tree alone (``ocp.StandardCheckpointer``).
    Restorable on any topology: ``restore_params(out)`` restores onto one device
    (``SingleDeviceSharding``), ``restore_params(out, mesh=m)`` straight into a new mesh's shardings
    (from the parameters' logical axis names and the config's rules). Without ecomax::

        ckpt = ocp.StandardCheckpointer(); meta = ckpt.metadata(out / "params").item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
        params = ckpt.restore(out / "params", target)   # list indices come back as "0", "1", ... keys

``safetensors``
    ``model.safetensors``: one tensor per parameter, named by its path in the parameter tree joined with
    ``/`` (``image/blocks/0/up/kernel``, ``text/embed/embedding``, ``logit_scale``): Linear kernels are
    ``[in, out]`` (JAX layout, not torch's ``[out, in]``). The header metadata holds ``format``,
    ``config_hash``, ``step``, ``task`` and ``dtype``. Load with ``safetensors.numpy.load_file``; no
    ecomax needed.

``stablehlo``
    ``<tower>.jax_exported``: for each tower of ``Task.towers()`` (two-tower: ``image``, ``text``),
    ``jax.export`` of the serving function ``inputs [b, ...] -> embeddings [b, d]`` with a symbolic batch
    dimension ``b``. **Parameters are baked in** as constants: the artifact is self-contained and is
    called with the inputs alone, with only jax installed::

        exp = jax.export.deserialize(bytearray(open("image.jax_exported", "rb").read()))
        emb = exp.call(images)       # images [b, 32, 32, 3] float32, any b

    Lowered for ``--platforms`` (default ``cpu,cuda,tpu``). A serialized module must stay under
    protobuf's 2 GiB, so models above ~1.5 GiB of parameters are refused (export ``params`` instead).
    Serialization needs the ``flatbuffers`` package.

``scann``
    ``index/``: a ScaNN index (``trainers.evaluators.retrieval.RetrievalIndex``: the searcher, the id map,
    ``index_params.json`` with the build parameters) of the *item* embeddings of a corpus, restored with
    ``load_index(out)``. The corpus comes from the task's ``Task.export_corpus(name, size)`` (two-tower:
    the ``eval`` images of the task's held-out source, ``--corpus-size`` of them, ids 0..n-1, embedded by
    the ``image`` tower). ``--ann``
    follows the evaluator: ``auto`` (ScaNN brute force below 20k items, a tree above), ``scann`` (a tree
    from 1000 items), ``exact``.

``embeddings``
    ``items.npy`` (``[N, d]`` float32) + ``items.ids.npy`` (``[N]`` int64): the same corpus as ``scann``
    (``Task.export_corpus``, ``--corpus``, ``--corpus-size``) through the same item tower, row ``i`` the
    tower's output for item ``ids[i]``, as the tower returns it (not re-normalised). Exactly what
    ``ecomax sid build --embeddings OUT/items.npy`` reads (``data_pipelines.sid.embeddings.open_embeddings``);
    with numpy alone: ``np.load(out / "items.npy")``, ``np.load(out / "items.ids.npy")``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.tasks import Corpus

import numpy as np

FORMATS = ("params", "safetensors", "stablehlo", "scann", "embeddings")
EXPORT_FORMAT = "ecomax.export/1"
EXIT_ERROR = 2
MAX_BAKED_BYTES = int(1.5 * 2**30)


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says why and what to do."""


# --- reading a workdir ------------------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    """A restored model: config, task, model spec and parameters (one device), at ``step``."""

    config: Any
    task: Any
    spec: Any  # trainers.state.ModelSpec
    params: Any  # nested dict of jax.Array
    step: int
    config_hash: str

    @property
    def model(self) -> Any:
        from flax import nnx

        return nnx.merge(self.spec.graphdef, self.params)


def finished_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the finished checkpoints in ``workdir/checkpoints`` (Orbax lists committed steps only)."""
    import orbax.checkpoint as ocp

    directory = workdir.absolute() / "checkpoints"
    if not directory.is_dir():
        return []
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def load_config_json(path: pathlib.Path) -> Any:
    import ml_collections

    if not path.is_file():
        raise ExportError(f"{path} not found: is {path.parent} an ecomax workdir (written by `ecomax train`)?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def verify_checkpoint(workdir: pathlib.Path, step: int, steps: Sequence[int]) -> None:
    """Check ``step``'s files against its integrity record, as a resuming run does; refuse a corrupt one."""
    from trainers.checkpoints import IntegrityError, directory_uses_records, has_record, verify_step

    directory = workdir.absolute() / "checkpoints"
    step_dir = directory / str(step)
    if not has_record(step_dir) and not directory_uses_records(directory):
        print(f"ecomax export: warning: checkpoint step {step} has no integrity record (written before records "
              "existed): exporting it unverified", file=sys.stderr)
        return
    try:
        verify_step(step_dir, step)
    except IntegrityError as e:
        others = [s for s in steps if s != step]
        hint = (f"other finished steps: {', '.join(map(str, others))} (pass --step N; each is verified the same way)"
                if others else "there is no other finished step")
        raise ExportError(f"{e} — not exporting it ({step_dir}); {hint}") from None


def load_trained(workdir: str | os.PathLike[str], step: int | None = None) -> Trained:
    """Restore the parameters of ``workdir``'s checkpoint ``step`` (default: the newest finished one).

    Only ``state.params`` is read (a partial Orbax restore), onto ``jax.devices()[0]``, whatever mesh
    the run used.
    """
    import jax
    import orbax.checkpoint as ocp

    from trainers.state import model_spec
    from trainers.tasks import get_task

    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"workdir {workdir} does not exist")
    config = load_config_json(workdir / "config.json")
    steps = finished_steps(workdir)
    if not steps:
        raise ExportError(f"{workdir} has no finished checkpoint (looked in {workdir / 'checkpoints'}): train it "
                          "first, or wait for the run to save one")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{workdir} has no finished checkpoint at step {step}; finished steps: {steps}")
    verify_checkpoint(workdir, step, steps)
    task = get_task(config)
    spec = model_spec(task.build_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                     spec.abstract_params)}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=device), target)
    manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints", item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    meta = restored["meta"] or {}
    from trainers.checkpoints import config_fingerprint

    return Trained(config, task, spec, restored["state"]["params"], int(step),
                   str(meta.get("config_hash") or config_fingerprint(config)))


# --- parameter trees --------------------------------------------------------------------------------


def cast_params(params: Any, dtype: str | None) -> Any:
    """Floating leaves cast to ``dtype`` (None: unchanged); integer leaves are kept."""
    if dtype is None:
        return params
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """``{"image/blocks/0/up/kernel": array, ...}``: each leaf's tree path joined with ``/``, as host numpy."""
    import jax

    from models.partitioning import path_name

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[path_name(path)] = np.asarray(jax.device_get(leaf))
    return flat


def unflatten_params(flat: dict[str, Any], like: Any) -> Any:
    """The inverse of ``flatten_params`` for a tree shaped like ``like`` (e.g. ``ModelSpec.abstract_params``)."""
    import jax

    from models.partitioning import path_name

    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [path_name(path) for path, _ in paths]
    missing = [n for n in names if n not in flat]
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        raise ExportError(f"tensor names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def _tensor_table(flat: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()}


# --- output folder ----------------------------------------------------------------------------------


def prepare_out(out: pathlib.Path, artifacts: Sequence[str], force: bool) -> None:
    """Create ``out``; refuse a non-empty one without ``force``; with it, remove only ``artifacts``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} exists and is not empty; pass --force to write into it (only the "
                              f"files this export writes are replaced: {', '.join(artifacts)})")
        for name in artifacts:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _manifest(trained: Trained, fmt: str, dtype: str | None, **extra: Any) -> dict[str, Any]:
    import jax

    model_config = trained.task.model_config()
    if model_config is not None:
        try:
            model_config = dataclasses.asdict(model_config)
        except TypeError:
            model_config = None
    return {"format": EXPORT_FORMAT, "kind": fmt, "task": trained.config.task, "step": trained.step,
            "config_hash": trained.config_hash, "dtype": dtype or "float32 (as trained)",
            "num_params": trained.spec.num_params, "model_config": model_config, "jax_version": jax.__version__,
            "created_unix": time.time(), **extra}


def _write_common(out: pathlib.Path, trained: Trained, manifest: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(trained.config.to_dict(), indent=2, default=str))
    (out / "export.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


# --- formats ----------------------------------------------------------------------------------------


def export_params(trained: Trained, out: pathlib.Path, dtype: str | None) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    params = cast_params(trained.params, dtype)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((out / "params").absolute(), params)
    ckpt.wait_until_finished()
    ckpt.close()
    manifest = _manifest(trained, "params", dtype, path="params",
                         tensors=_tensor_table(flatten_params(params)))
    _write_common(out, trained, manifest)
    return manifest


def restore_params(export_dir: str | os.PathLike[str], *, sharding: Any = None, mesh: Any = None) -> Any:
    """Parameters of a ``params`` export, onto one device (default: ``jax.devices()[0]``), onto the
    given ``sharding`` (one for every leaf), or sharded over ``mesh`` by the config's rules."""
    import jax
    import orbax.checkpoint as ocp

    from trainers.mesh import parse_rules
    from trainers.state import model_spec, param_shardings
    from trainers.tasks import get_task

    d = pathlib.Path(export_dir)
    manifest = json.loads((d / "export.json").read_text())
    if manifest.get("kind") != "params":
        raise ExportError(f"{d} holds a {manifest.get('kind')!r} export, not 'params'")
    config = load_config_json(d / "config.json")
    spec = model_spec(get_task(config).build_model)
    if mesh is not None:
        shardings = param_shardings(spec, mesh, parse_rules(config.sharding.rules))
    else:
        one = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, spec.abstract_params)
    tensors = manifest["tensors"]
    flat_names = list(flatten_params_names(spec.abstract_params))
    dtypes = [jax.numpy.dtype(tensors[n]["dtype"]) for n in flat_names]
    leaves, treedef = jax.tree.flatten(spec.abstract_params)
    target = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s.shape, dt, sharding=sh) for s, dt, sh in
                                          zip(leaves, dtypes, jax.tree.leaves(shardings))])
    ckpt = ocp.StandardCheckpointer()
    try:
        return ckpt.restore((d / "params").absolute(), target)
    finally:
        ckpt.close()


def flatten_params_names(tree: Any) -> Iterator[str]:
    import jax

    from models.partitioning import path_name

    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_name(path)


def export_safetensors(trained: Trained, out: pathlib.Path, dtype: str | None) -> dict[str, Any]:
    import safetensors.numpy

    flat = flatten_params(cast_params(trained.params, dtype))
    metadata = {"format": "ecomax.safetensors/1", "config_hash": trained.config_hash, "step": str(trained.step),
                "task": str(trained.config.task), "dtype": dtype or "float32",
                "naming": "parameter tree path joined with '/'; Linear kernels are [in, out]"}
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in flat.items()},
                                str(out / "model.safetensors"), metadata=metadata)
    manifest = _manifest(trained, "safetensors", dtype, path="model.safetensors", tensors=_tensor_table(flat))
    _write_common(out, trained, manifest)
    return manifest


def export_stablehlo(trained: Trained, out: pathlib.Path, dtype: str | None,
                     platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> dict[str, Any]:
    import jax
    from flax import nnx

    try:
        import flatbuffers  # noqa: F401  (jax.export's serializer needs it)
    except ImportError:
        raise ExportError("--format stablehlo needs the 'flatbuffers' package (jax.export serialization): "
                          "pip install flatbuffers") from None
    towers = trained.task.towers()
    if not towers:
        raise ExportError(f"task {trained.config.task!r} defines no serving towers (Task.towers()); nothing to export")
    params = cast_params(trained.params, dtype)
    size = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    if size > MAX_BAKED_BYTES:
        raise ExportError(f"the parameters take {size / 2**30:.2f} GiB: too large to bake into a serialized "
                          "StableHLO module (protobuf's 2 GiB limit); export --format params or safetensors")
    graphdef = trained.spec.graphdef
    (batch,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
    written = {}
    for name, tower in towers.items():
        def serve(*arrays, _fn=tower.fn):
            return _fn(nnx.merge(graphdef, params), *arrays)

        args = [jax.ShapeDtypeStruct((batch, *s.shape), s.dtype) for s in tower.inputs.values()]
        exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*args)
        file = f"{name}.jax_exported"
        (out / file).write_bytes(exported.serialize())
        written[name] = {
            "file": file,
            "inputs": [{"name": k, "shape": ["b", *map(int, s.shape)], "dtype": str(np.dtype(s.dtype))}
                       for k, s in tower.inputs.items()],
            "outputs": [{"shape": [str(d) if not isinstance(d, int) else d for d in a.shape], "dtype": str(a.dtype)}
                        for a in exported.out_avals],
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
        }
    manifest = _manifest(trained, "stablehlo", dtype, params="baked in as constants", towers=written,
                         load="jax.export.deserialize(bytearray(open(file, 'rb').read())).call(*inputs)")
    _write_common(out, trained, manifest)
    return manifest


# --- scann: the corpus hook -------------------------------------------------------------------------


def export_corpus(task: Any, task_name: str, name: str = "eval", size: int | None = None) -> Corpus:
    """The task's corpus to index (``Task.export_corpus``)."""
    corpus = task.export_corpus(name, size)
    if corpus is None:
        raise ExportError(f"task {task_name!r} has no export corpus: give it Task.export_corpus(name, size) -> "
                          "trainers.tasks.Corpus")
    return corpus


def embed_corpus(trained: Trained, corpus: Corpus, dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n], embeddings [n, d] float32)`` of a corpus through its tower, jitted on one device."""
    import jax
    from flax import nnx

    towers = trained.task.towers()
    if corpus.tower not in towers:
        raise ExportError(f"corpus tower {corpus.tower!r} is not one of the task's towers {sorted(towers)}")
    fn = towers[corpus.tower].fn
    graphdef = trained.spec.graphdef
    apply = jax.jit(lambda p, *xs: fn(nnx.merge(graphdef, p), *xs))
    params = cast_params(trained.params, dtype)
    ids, embs = [], []
    for batch_ids, inputs in corpus.batches:
        embs.append(np.asarray(apply(params, *inputs), dtype=np.float32))
        ids.append(np.asarray(batch_ids))
    if not embs:
        raise ExportError("the export corpus is empty")
    return np.concatenate(ids), np.concatenate(embs)


def export_scann(trained: Trained, out: pathlib.Path, dtype: str | None, *, corpus_name: str = "eval",
                 corpus_size: int | None = None, ann: str = "auto", num_neighbors: int = 10) -> dict[str, Any]:
    from trainers.evaluators.retrieval import (MIN_TREE_ITEMS, ExactSearcher, RetrievalIndex, ScannSearcher,
                                               l2_normalize, scann_params_for)

    corpus = export_corpus(trained.task, trained.config.task, corpus_name, corpus_size)
    ids, emb = embed_corpus(trained, corpus, dtype)
    gallery = l2_normalize(emb)
    t0 = time.perf_counter()
    if ann == "exact":
        searcher: Any = ExactSearcher(gallery)
    elif ann in ("auto", "scann"):
        if ann == "scann" and len(ids) < MIN_TREE_ITEMS:
            raise ExportError(f"--ann scann builds a tree from {MIN_TREE_ITEMS} items; the corpus has {len(ids)} "
                              "(use --ann auto for brute force)")
        searcher = ScannSearcher(gallery, scann_params_for(len(ids), num_neighbors, force_tree=(ann == "scann")))
    else:
        raise ExportError(f"--ann must be auto, scann or exact, got {ann!r}")
    build_s = time.perf_counter() - t0
    queries = sorted(set(trained.task.towers()) - {corpus.tower})
    index = RetrievalIndex(searcher=searcher, ids=ids, normalize=True,
                           info={"build_s": build_s, "dim": int(gallery.shape[1]), "item_tower": corpus.tower,
                                 "query_towers": queries, "step": trained.step, "config_hash": trained.config_hash,
                                 "corpus": corpus.description})
    index.save(out / "index")
    manifest = _manifest(trained, "scann", dtype, path="index", item_tower=corpus.tower, query_towers=queries,
                         corpus=corpus.description, index_kind=searcher.kind, index_params=searcher.params(),
                         num_items=int(len(ids)), build_s=build_s,
                         load="trainers.evaluators.retrieval.load_index(out)")
    _write_common(out, trained, manifest)
    return manifest


def export_embeddings(trained: Trained, out: pathlib.Path, dtype: str | None, *, corpus_name: str = "eval",
                      corpus_size: int | None = None) -> dict[str, Any]:
    """The item corpus's embeddings: ``out/items.npy`` ``[N, d]`` float32 and ``out/items.ids.npy`` ``[N]``
    int64 (the ``scann`` format's corpus and tower, written as arrays instead of an index)."""
    corpus = export_corpus(trained.task, trained.config.task, corpus_name, corpus_size)
    ids, emb = embed_corpus(trained, corpus, dtype)
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ExportError(f"the {corpus_name!r} corpus of task {trained.config.task!r} repeats item ids; an id map "
                          "needs unique ids")
    np.save(out / "items.npy", np.ascontiguousarray(emb, dtype=np.float32))
    np.save(out / "items.ids.npy", ids)
    manifest = _manifest(trained, "embeddings", dtype, path="items.npy", ids="items.ids.npy",
                         item_tower=corpus.tower, corpus=corpus.description, num_items=int(len(ids)),
                         dim=int(emb.shape[1]), normalized=False,
                         load="data_pipelines.sid.embeddings.open_embeddings(out / 'items.npy')")
    _write_common(out, trained, manifest)
    return manifest


# --- entry points -----------------------------------------------------------------------------------

ARTIFACTS = {
    "params": ("params", "config.json", "export.json"),
    "safetensors": ("model.safetensors", "config.json", "export.json"),
    "stablehlo": ("config.json", "export.json"),  # + one <tower>.jax_exported per tower
    "scann": ("index", "config.json", "export.json"),
    "embeddings": ("items.npy", "items.ids.npy", "config.json", "export.json"),
}


def export(workdir: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str, *, step: int | None = None,
           dtype: str | None = None, force: bool = False, corpus: str = "eval", corpus_size: int | None = None,
           ann: str = "auto", num_neighbors: int = 10,
           platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> dict[str, Any]:
    """Export ``workdir``'s checkpoint as ``fmt`` into ``out``; returns the manifest (``out/export.json``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype must be float32, bfloat16 or float16; got {dtype!r}")
    out = pathlib.Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:  # before the slow restore
        prepare_out(out, ARTIFACTS[fmt], force)
    trained = load_trained(workdir, step)
    artifacts = list(ARTIFACTS[fmt])
    if fmt == "stablehlo":
        artifacts += [f"{name}.jax_exported" for name in trained.task.towers()]
    prepare_out(out, artifacts, force)
    if fmt == "params":
        return export_params(trained, out, dtype)
    if fmt == "safetensors":
        return export_safetensors(trained, out, dtype)
    if fmt == "stablehlo":
        return export_stablehlo(trained, out, dtype, platforms)
    if fmt == "embeddings":
        return export_embeddings(trained, out, dtype, corpus_name=corpus, corpus_size=corpus_size)
    return export_scann(trained, out, dtype, corpus_name=corpus, corpus_size=corpus_size, ann=ann,
                        num_neighbors=num_neighbors)


def _export(args: argparse.Namespace) -> int:
    try:
        manifest = export(args.workdir, args.out, args.format, step=args.step, dtype=args.dtype, force=args.force,
                          corpus=args.corpus, corpus_size=args.corpus_size, ann=args.ann,
                          num_neighbors=args.num_neighbors,
                          platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()))
    except ExportError as e:
        print(f"ecomax export: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"ecomax export: wrote {args.format} of step {manifest['step']} (config {manifest['config_hash']}) "
          f"to {args.out}")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the CLI's subparsers (sets ``func(args) -> int``)."""
    p = subparsers.add_parser("export", help="export a trained workdir: params, safetensors, stablehlo, scann, "
                              "embeddings",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by `ecomax train`")
    p.add_argument("--out", required=True, help="the folder to write (must be empty or new, unless --force)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest finished one)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="cast floating parameters (default: as trained)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (replaces our files only)")
    p.add_argument("--corpus", default="eval",
                   help="scann, embeddings: which corpus of the task to embed (default: eval)")
    p.add_argument("--corpus-size", type=int, default=None,
                   help="scann, embeddings: number of corpus items (default: the task's)")
    p.add_argument("--ann", default="auto", choices=("auto", "scann", "exact"), help="scann: index kind")
    p.add_argument("--num-neighbors", type=int, default=10, help="scann: default neighbours per query")
    p.add_argument("--platforms", default="cpu,cuda,tpu", help="stablehlo: platforms to lower for")
    p.set_defaults(func=_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
