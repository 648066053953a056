"""JSONL manifest + image files -> ArrayRecord shards readable by ``tfds.data_source``.

Two routes over the same record definition (``schema.py``):

* ``build(manifest, out_dir, ...)``: the fast, one-machine route for up to ~10M pairs, through the
  shared converter ``data_pipelines.jsonl_convert`` (byte ranges at line boundaries, a worker pool,
  the JSONL reader, the bad-line policy, progress, TFDS metadata). This module plugs in what is
  ECom-RF-IMMR's own, ``ManifestEncoder``: the manifest schema, reading and checking the images
  (decoding them), the TFDS feature serializer, the split field, and the mosaic group of each
  record. Memory stays bounded (one record at a time per worker). Output:
  ``out_dir/ecom_rf_immr/1.0.0/`` (a standard TFDS folder), plus ``mosaic_groups-<split>.npy``
  (int64 per record, ``-1`` = no mosaic) for mosaic batching, ``build_summary.json`` and, when
  records were skipped, ``skipped.jsonl``.
* ``EcomRfImmr``: a ``tfds.core.GeneratorBasedBuilder`` over the same manifest, for
  ``download_and_prepare`` on one machine, or on Apache Beam (``beam_shards=N`` plus a
  ``DownloadConfig(beam_options=...)``) past one machine; ``build(..., runner="beam")`` drives it.

Bad input (unreadable JSON, a missing field, a missing/undecodable image, a box outside the image)
raises ``ManifestError("<manifest>:<line>: <reason>")``. With ``0 < max_bad_fraction < 1`` such
records are skipped and counted instead, and the build fails (``BuildError``) when the skipped
fraction of the manifest's records exceeds the cap (the converter's rule, ``0 <= f < 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import jsonl_convert
from data_pipelines.ecom_rf_immr import schema
from data_pipelines.ecom_rf_immr.schema import DATASET_NAME, SPLITS, VERSION, ManifestError, RecordError

import tensorflow_datasets as tfds  # noqa: E402  (array_record path only: no TensorFlow needed)

SHARD_SUFFIX = jsonl_convert.SHARD_SUFFIX
DEFAULT_TARGET_SHARD_BYTES = 512 * 2**20
MAX_LISTED_SKIPS = jsonl_convert.MAX_LISTED_BAD_LINES
RUNNERS = ("local", "beam")
DESCRIPTION = "ECom-RF-IMMR image-to-multimodal product retrieval pairs (ecomax schema)."


class BuildError(RuntimeError):
    """The build as a whole failed (too many skipped records, no records, output exists, ...)."""


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    line: int
    reason: str


@dataclasses.dataclass
class BuildSummary:
    """What a build wrote; ``str(summary)`` is the closing report."""

    manifest: str
    dataset_dir: str
    records: dict[str, int]
    shards: dict[str, int]
    num_bytes: dict[str, int]
    num_lines: int
    num_skipped: int
    skipped: list[SkippedRecord]  # the first MAX_LISTED_SKIPS; all are in skipped_log
    skipped_log: str | None
    seconds: float
    workers: int
    tasks: int
    image_size: int | None = None  # images stored re-encoded at this shorter side (build(image_size=))

    @property
    def num_records(self) -> int:
        return sum(self.records.values())

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_records"] = self.num_records
        return d

    def __str__(self) -> str:
        rate = self.num_lines / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"ecom_rf_immr build: {self.num_records} records from {self.num_lines} manifest records "
            f"in {self.seconds:.1f}s ({rate:.0f} rec/s, {self.workers} workers, {self.tasks} tasks)",
            f"  manifest: {self.manifest}",
            f"  output:   {self.dataset_dir}",
        ]
        for split, n in self.records.items():
            lines.append(f"  {split:<5} {n:>10} records  {self.shards[split]:>5} shards  "
                         f"{self.num_bytes[split] / 2**20:10.1f} MiB")
        if self.num_skipped:
            lines.append(f"  skipped {self.num_skipped} bad records"
                         f" ({self.num_skipped / max(1, self.num_lines):.2%}); all in {self.skipped_log}:")
            for s in self.skipped[:20]:
                lines.append(f"    {self.manifest}:{s.line}: {s.reason}")
            if self.num_skipped > 20:
                lines.append(f"    ... and {self.num_skipped - 20} more")
        else:
            lines.append("  skipped 0 records")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- TFDS helpers


class KeepEncoded(tfds.decode.Decoder):
    """TFDS decoder that returns image bytes as stored (``SkipDecoding`` lacks the numpy batch path
    that ``Sequence(Image)`` needs)."""

    def decode_example(self, serialized_example):
        return serialized_example

    def decode_example_np(self, serialized_example):
        return serialized_example

    def decode_batch_example_np(self, serialized_example):
        return serialized_example


KEEP_ENCODED = {"query_image": KeepEncoded(), "item_images": KeepEncoded()}

_FEATURES = None


def _features():
    global _FEATURES
    if _FEATURES is None:
        _FEATURES = schema.tfds_features()
    return _FEATURES


# ----------------------------------------------------------------------------- the encoder


class ManifestEncoder:
    """The ECom-RF-IMMR part of the conversion: one manifest line -> (split, serialized record).

    Parses and validates the line, reads and checks its images (paths relative to the manifest's
    folder), serializes the record with the TFDS feature serializer and keeps the mosaic group of
    each record per split (``finish``).
    """

    bad_line_errors = (RecordError,)

    def __init__(self, path: str, *, full_decode: bool = True, image_size: int | None = None):
        self._base_dir = os.path.dirname(os.path.abspath(path))
        self._full_decode = full_decode
        self._image_size = image_size
        self._groups: dict[str, list[int]] = {}

    def record(self, line: bytes, split: str | None = None) -> schema.Record | None:
        """The loaded record of ``line`` (``None`` when ``split`` is given and is not the line's)."""
        fields = schema.parse_manifest_line(line)
        if fields is None:
            raise RecordError("blank line")
        if split is not None and fields["split"] != split:
            return None
        return schema.load_record(fields, self._base_dir, full_decode=self._full_decode, image_size=self._image_size)

    def encode(self, line: bytes) -> tuple[str, bytes]:
        record = self.record(line)
        try:
            data = _features().serialize_example(schema.to_tfds_example(record))
        except Exception as e:  # noqa: BLE001 - any serializer failure is this record's
            raise RecordError(f"cannot be serialized ({type(e).__name__}: {e})") from None
        mosaic_id = record["mosaic_id"]
        self._groups.setdefault(record["split"], []).append(schema.stable_group_hash(mosaic_id) if mosaic_id else -1)
        return record["split"], data

    @staticmethod
    def locate(error: RecordError, path: str, line: int) -> ManifestError:
        return ManifestError(path, line, str(error))

    def finish(self) -> dict[str, np.ndarray]:
        return {s: np.asarray(g, np.int64) for s, g in self._groups.items()}


def _estimate_tasks(path: str, workers: int, target_shard_bytes: int) -> int:
    """Number of byte-range tasks (= shards per split, at most) from a sample of the first lines."""
    size = os.path.getsize(path)
    base = os.path.dirname(os.path.abspath(path))
    line_bytes = rec_bytes = n = 0
    for _, raw in jsonl_convert.iter_file_lines(path):
        if n >= 64:
            break
        line_bytes += len(raw) + 1
        try:
            obj = json.loads(raw)
            paths = [obj["query_image"]] + list(obj["item_images"] if isinstance(obj["item_images"], list)
                                                else [obj["item_images"]])
            rec_bytes += sum(os.path.getsize(schema.resolve_path(base, p)) for p in paths)
        except Exception:  # estimate only; errors are reported by the build itself
            pass
        n += 1
    if n == 0:
        return 1
    est_records = size / (line_bytes / n)
    est_bytes = est_records * (rec_bytes / n + 256)
    tasks = max(workers, math.ceil(est_bytes / target_shard_bytes))
    return max(1, min(tasks, int(est_records) + 1))


# ----------------------------------------------------------------------------- build


def dataset_dir(out_dir: os.PathLike | str) -> Path:
    """The TFDS dataset folder under ``out_dir`` (``out_dir`` itself if it holds dataset_info.json)."""
    out = Path(out_dir)
    if (out / "dataset_info.json").exists():
        return out
    root = out / DATASET_NAME
    versions = sorted((d for d in root.iterdir() if d.is_dir() and tfds.core.Version.is_valid(d.name)),
                      key=lambda d: tfds.core.Version(d.name)) if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no built {DATASET_NAME} dataset under {out} (expected {root}/<version>/)")
    return versions[-1]


def build(
    manifest: os.PathLike | str,
    out_dir: os.PathLike | str,
    *,
    workers: int | None = None,
    shards: int | None = None,
    max_bad_fraction: float = 0.0,
    full_decode: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
    runner: str = "local",
    beam_options: Sequence[str] | None = None,
    image_size: int | None = None,
) -> BuildSummary:
    """Build ArrayRecord shards + TFDS metadata from a JSONL manifest; returns the summary.

    Args:
      manifest: the JSONL manifest (see ``schema``); image paths are relative to its folder.
      out_dir: the data dir; the dataset goes to ``out_dir/ecom_rf_immr/1.0.0/``.
      workers: processes that read and check images (default: all CPUs); ``<= 1`` runs in-process.
      shards: byte-range tasks, each writing one shard per split it meets (default: from a size
        estimate, ~``target_shard_bytes`` per shard, at least ``workers``); with ``runner="beam"``
        the number of Beam ranges.
      max_bad_fraction: in ``[0, 1)``. 0 fails on the first bad record (``ManifestError`` naming
        file:line); > 0 skips and counts bad records, and fails (``BuildError``) above that
        fraction of records.
      full_decode: decode every image (catches truncated files); False checks headers only.
      overwrite: replace an existing build of the same version.
      progress: show a tqdm bar (stderr) and print the summary at the end.
      runner: "local" (this machine's worker pool) or "beam" (``build_beam``).
      beam_options: Beam pipeline options for ``runner="beam"`` (default: the DirectRunner).
      image_size: store images re-encoded (JPEG 90) with the shorter side at most this many pixels, boxes
        scaled (``schema.load_record``); recorded as ``image_size`` in ``build_summary.json``. The local
        runner only.
    """
    t0 = time.time()
    manifest = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    max_bad_fraction = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    final_dir = Path(out_dir) / DATASET_NAME / VERSION
    if final_dir.exists() and not overwrite:
        raise BuildError(f"{final_dir} already exists (pass overwrite=True to replace it)")
    if os.path.getsize(manifest) == 0:
        raise BuildError(f"{manifest}: the manifest is empty")
    if image_size is not None and (int(image_size) < 16):
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if runner == "beam":
        if image_size:
            raise ValueError("image_size re-encoding runs with runner='local' only")
        return build_beam(manifest, out_dir, shards=shards, max_bad_fraction=max_bad_fraction,
                          full_decode=full_decode, overwrite=overwrite, progress=progress,
                          beam_options=beam_options)
    workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    n_tasks = shards if shards is not None else _estimate_tasks(manifest, max(1, workers), target_shard_bytes)
    summaries: list[BuildSummary] = []

    def on_written(res: jsonl_convert.DatasetResult, tmp_dir: Path) -> None:
        for split in res.rows:
            _write_dense_groups(tmp_dir / f"mosaic_groups-{split}.npy",
                                [r.extra[split] for r in res.ranges if split in (r.extra or {})])
        summaries.append(BuildSummary(
            manifest=manifest, dataset_dir=res.path, records=dict(res.rows), shards=dict(res.shards),
            num_bytes=dict(res.num_bytes), num_lines=res.lines, num_skipped=res.skipped,
            skipped=[SkippedRecord(b.line, b.reason) for b in res.bad_lines], skipped_log=res.skipped_log,
            seconds=time.time() - t0, workers=workers, tasks=len(res.ranges), image_size=image_size))
        with open(tmp_dir / "build_summary.json", "w", encoding="utf-8") as f:
            json.dump(summaries[-1].to_json(), f, ensure_ascii=False, indent=1)

    dataset = jsonl_convert.Dataset(
        name=DATASET_NAME, version=VERSION, files=[manifest],
        encoder_factory=functools.partial(ManifestEncoder, full_decode=full_decode, image_size=image_size),
        features=_features(),
        description=DESCRIPTION, split_order=SPLITS, num_ranges=max(1, int(n_tasks)), on_written=on_written)
    try:
        jsonl_convert.convert([dataset], out_dir, workers=workers, max_bad_fraction=max_bad_fraction,
                              overwrite=overwrite, progress=progress, desc="ecom_rf_immr build",
                              title="ECom-RF-IMMR build")
    except (jsonl_convert.TooManyBadLinesError, jsonl_convert.NoRecordsError, FileExistsError) as e:
        raise BuildError(str(e)) from None
    summary = summaries[0]
    summary.seconds = time.time() - t0
    if progress:
        print(str(summary), file=sys.stderr)
    return summary


def _write_dense_groups(path: Path, parts: list[np.ndarray]) -> None:
    """``mosaic_groups-<split>.npy``: the stable group hashes of a split made dense (``-1`` kept)."""
    hashes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    dense = np.full(hashes.shape, -1, np.int64)
    has = hashes >= 0
    if has.any():
        dense[has] = np.unique(hashes[has], return_inverse=True)[1]
    np.save(path, dense, allow_pickle=False)


def build_beam(
    manifest: os.PathLike | str,
    out_dir: os.PathLike | str,
    *,
    shards: int | None = None,
    max_bad_fraction: float = 0.0,
    full_decode: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    beam_options: Sequence[str] | None = None,
) -> BuildSummary:
    """The same dataset as ``build``, made by ``EcomRfImmr`` on Apache Beam (``beam_shards`` line
    ranges of the manifest, one Beam element each; default one per 64 MiB of manifest, at least 1).

    ``beam_options`` are Beam pipeline options (default: the DirectRunner in this process); the
    manifest and images must be readable by the Beam workers. Record order in a split is TFDS's
    (hashed keys); the records are the same as ``build``'s. No ``mosaic_groups-*.npy`` is written
    (``RecordSource.mosaic_group_ids`` computes them). With ``max_bad_fraction > 0`` the cap is
    applied to each range (stricter than ``build``'s global cap). Requires ``apache-beam``.
    """
    import apache_beam as beam  # noqa: PLC0415  (a clear ImportError when it is missing)

    t0 = time.time()
    manifest = os.path.abspath(os.fspath(manifest))
    final_dir = Path(out_dir) / DATASET_NAME / VERSION
    if final_dir.exists():
        if not overwrite:
            raise BuildError(f"{final_dir} already exists (pass overwrite=True to replace it)")
        shutil.rmtree(final_dir)
    n = shards if shards else max(1, -(-os.path.getsize(manifest) // (64 << 20)))
    b = EcomRfImmr(manifest=manifest, data_dir=os.fspath(out_dir), file_format="array_record",
                   max_bad_fraction=max_bad_fraction, full_decode=full_decode, beam_shards=n)
    options = beam.options.pipeline_options.PipelineOptions(list(beam_options or ()))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=options))
    splits = b.info.splits
    summary = BuildSummary(
        manifest=manifest, dataset_dir=str(b.data_path), records={s: v.num_examples for s, v in splits.items()},
        shards={s: v.num_shards for s, v in splits.items()}, num_bytes={s: v.num_bytes for s, v in splits.items()},
        num_lines=sum(v.num_examples for v in splits.values()), num_skipped=0, skipped=[], skipped_log=None,
        seconds=time.time() - t0, workers=0, tasks=n)
    if progress:
        print(str(summary), file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------- reading


class RecordSource:
    """Random-access records of one split (``schema.Record`` dicts, images still encoded).

    Works as a grain source (``grain.MapDataset.source(src)``); picklable for grain workers.
    """

    def __init__(self, tfds_source, *, split: str, groups_path: str | None = None):
        self._src = tfds_source
        self.split = split
        self._groups_path = groups_path

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> schema.Record:
        return schema.from_tfds_example(self._src[int(index)])

    def __iter__(self) -> Iterator[schema.Record]:
        for i in range(len(self)):
            yield self[i]

    def __getitems__(self, indices) -> list[schema.Record]:
        return [schema.from_tfds_example(ex) for ex in self._src.__getitems__([int(i) for i in indices])]

    def mosaic_group_ids(self) -> np.ndarray:
        """int64 [len] dense mosaic group per record (``-1`` = not grouped).

        Read from ``mosaic_groups-<split>.npy`` when ``build`` wrote it; otherwise (e.g. data made by
        ``EcomRfImmr``, whose record order is hashed) computed by reading every record once.
        """
        if self._groups_path is not None:
            groups = np.load(self._groups_path, allow_pickle=False)
            if len(groups) == len(self):
                return groups
        ids = [self[i]["mosaic_id"] for i in range(len(self))]
        out = np.full(len(ids), -1, np.int64)
        names = sorted({m for m in ids if m})
        lookup = {m: k for k, m in enumerate(names)}
        for i, m in enumerate(ids):
            if m:
                out[i] = lookup[m]
        return out

    def __repr__(self) -> str:
        return f"RecordSource(split={self.split!r}, len={len(self)})"


def open_split(out_dir: os.PathLike | str, split: str) -> RecordSource:
    """Random-access source over one split of a built dataset (``build`` or ``EcomRfImmr`` output).

    ``out_dir`` is the ``build`` out_dir (data dir) or the dataset version folder itself.
    """
    ddir = dataset_dir(out_dir)
    builder = tfds.builder_from_directory(os.fspath(ddir))
    if split not in builder.info.splits:
        raise KeyError(f"split {split!r} not in {ddir} (has {sorted(builder.info.splits)})")
    src = builder.as_data_source(split, decoders=KEEP_ENCODED)
    groups = ddir / f"mosaic_groups-{split}.npy"
    return RecordSource(src, split=split, groups_path=str(groups) if groups.exists() else None)


# ----------------------------------------------------------------------------- TFDS builder


def _examples_in_range(rng: tuple[str, int, int], *, split: str, max_bad_fraction: float,
                       full_decode: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, TFDS example) for the records of ``split`` in one byte range of the manifest."""
    encoder = ManifestEncoder(rng[0], full_decode=full_decode)
    records = jsonl_convert.iter_range_records(
        rng, functools.partial(encoder.record, split=split), ManifestEncoder.bad_line_errors,
        ManifestEncoder.locate, max_bad_fraction=max_bad_fraction, log_name=DATASET_NAME)
    for offset, record in records:
        if record is not None:
            yield offset, schema.to_tfds_example(record)


def _splits_in_manifest(manifest: str) -> list[str]:
    found = set()
    for _, raw in jsonl_convert.iter_file_lines(manifest):
        try:
            split = json.loads(raw).get("split")
        except Exception:
            continue  # reported (with its line) while generating
        if split in SPLITS:
            found.add(split)
    return [s for s in SPLITS if s in found]


class EcomRfImmr(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over an ECom-RF-IMMR JSONL manifest (same features as ``build``).

    ``EcomRfImmr(manifest=M, data_dir=D, file_format="array_record").download_and_prepare()``.
    With ``beam_shards=N`` the examples come from a Beam ``FlatMap`` over N line ranges of the
    manifest (run it with ``download_config=tfds.download.DownloadConfig(beam_runner=...)``).
    Bad-record rules are ``build``'s, the cap applied per range (``jsonl_convert.iter_range_records``);
    skipped lines are logged to stderr.
    """

    VERSION = tfds.core.Version(schema.VERSION)

    # TFDS 4.9.10 resolves the code path of a builder that lives in a package through the optional
    # `importlib_resources` backport (not a dependency here); the file path is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath

        return epath.Path(__file__)

    RELEASE_NOTES = {schema.VERSION: "ecomax ECom-RF-IMMR schema."}

    def __init__(self, *, manifest: str | None = None, max_bad_fraction: float = 0.0, full_decode: bool = True,
                 beam_shards: int | None = None, **kwargs):
        self._manifest = os.path.abspath(manifest) if manifest else None
        self._max_bad_fraction = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
        self._full_decode = full_decode
        self._beam_shards = beam_shards
        super().__init__(**kwargs)
        self._original_state.update(manifest=manifest, max_bad_fraction=max_bad_fraction,
                                    full_decode=full_decode, beam_shards=beam_shards)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=schema.tfds_features(), description=DESCRIPTION)

    def _split_generators(self, dl_manager):
        if not self._manifest:
            raise ValueError("EcomRfImmr needs manifest=<path to manifest.jsonl> to prepare the dataset")
        return {split: self._generate_examples(split=split) for split in _splits_in_manifest(self._manifest)}

    def _generate_examples(self, split: str):
        kwargs = dict(split=split, max_bad_fraction=self._max_bad_fraction, full_decode=self._full_decode)
        if self._beam_shards:
            beam = tfds.core.lazy_imports.apache_beam
            ranges = [(self._manifest, a, b) for a, b in jsonl_convert.plan_ranges(self._manifest, self._beam_shards)]
            return (f"Ranges_{split}" >> beam.Create(ranges)
                    | f"Examples_{split}" >> beam.FlatMap(_examples_in_range, **kwargs))
        return _examples_in_range((self._manifest, 0, os.path.getsize(self._manifest)), **kwargs)
