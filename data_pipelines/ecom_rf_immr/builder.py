"""JSONL manifest + image files -> ArrayRecord shards readable by ``tfds.data_source``.

Two routes over the same record definition (``schema.py``):

* ``build(manifest, out_dir, ...)``: the fast, one-machine route for up to ~10M pairs. The manifest
  is cut into byte ranges aligned on lines; a pool of worker processes handles one range each:
  it streams the range line by line, reads and checks the images (decodes them), serializes each
  record with the TFDS feature serializer, and writes its own ArrayRecord shard per split. Memory
  stays bounded (one record at a time per worker); nothing holds the manifest. Then the shards are
  renamed to TFDS names and ``tfds.folder_dataset.write_metadata(..., check_data=False)`` is called
  with explicit split infos. Output: ``out_dir/ecom_rf_immr/1.0.0/`` (a standard TFDS folder), plus
  ``mosaic_groups-<split>.npy`` (int64 per record, ``-1`` = no mosaic) for mosaic batching,
  ``build_summary.json`` and, when records were skipped, ``skipped.jsonl``.
* ``EcomRfImmr``: a ``tfds.core.GeneratorBasedBuilder`` over the same manifest, for
  ``download_and_prepare`` on one machine, or on Apache Beam (``beam_shards=N`` plus a
  ``DownloadConfig(beam_runner=...)``) past one machine.

Bad input (unreadable JSON, a missing field, a missing/undecodable image, a box outside the image)
raises ``ManifestError("<manifest>:<line>: <reason>")``. With ``max_bad_fraction > 0`` such records
are skipped and counted instead, and the build fails (``BuildError``) once the skipped fraction of
the manifest's records exceeds the cap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.ecom_rf_immr import schema
from data_pipelines.ecom_rf_immr.schema import DATASET_NAME, SPLITS, VERSION, ManifestError, RecordError

import tensorflow_datasets as tfds  # noqa: E402  (array_record path only: no TensorFlow needed)

SHARD_SUFFIX = "array_record"
DEFAULT_TARGET_SHARD_BYTES = 512 * 2**20
MAX_LISTED_SKIPS = 1000


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


def _filename_template(data_dir: os.PathLike | str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(data_dir=Path(data_dir), template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
                                         dataset_name=DATASET_NAME, filetype_suffix=SHARD_SUFFIX)


# ----------------------------------------------------------------------------- manifest ranges


def _line_aligned_ranges(path: str, n: int) -> list[tuple[int, int]]:
    """Split the file into up to ``n`` byte ranges whose starts are line starts."""
    size = os.path.getsize(path)
    offsets = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            target = k * size // n
            if target <= offsets[-1]:
                continue
            f.seek(target - 1)
            f.readline()  # to the start of the next line (or stays, if target-1 was a newline)
            pos = f.tell()
            if offsets[-1] < pos < size:
                offsets.append(pos)
    offsets.append(size)
    return [(a, b) for a, b in zip(offsets[:-1], offsets[1:]) if b > a]


def _count_newlines(path: str, start: int, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def _estimate_tasks(path: str, workers: int, target_shard_bytes: int) -> int:
    """Number of byte-range tasks (= shards per split, at most) from a sample of the first lines."""
    size = os.path.getsize(path)
    base = os.path.dirname(os.path.abspath(path))
    line_bytes = rec_bytes = n = 0
    with open(path, "rb") as f:
        for raw in f:
            if n >= 64:
                break
            line_bytes += len(raw)
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


# ----------------------------------------------------------------------------- the worker


@dataclasses.dataclass(frozen=True)
class _Task:
    index: int
    manifest: str
    start: int
    end: int
    first_line: int
    work_dir: str
    max_bad: int  # -1: fail on the first bad record; else abort once more than this are skipped
    full_decode: bool


@dataclasses.dataclass
class _PartResult:
    count: int
    num_bytes: int
    path: str
    groups_path: str


@dataclasses.dataclass
class _TaskResult:
    index: int
    lines: int
    parts: dict[str, _PartResult]
    skipped: int
    skipped_head: list[SkippedRecord]
    skipped_log: str | None


class _Progress:
    """Counts processed lines; a shared ``multiprocessing.Value`` in pool workers."""

    def __init__(self, value=None, callback=None):
        self._value, self._callback = value, callback

    def add(self, n: int) -> None:
        if n <= 0:
            return
        if self._value is not None:
            with self._value.get_lock():
                self._value.value += n
        elif self._callback is not None:
            self._callback(n)


_PROGRESS = _Progress()


def _init_worker(value) -> None:
    global _PROGRESS
    _PROGRESS = _Progress(value=value)


def _iter_lines(path: str, start: int, end: int, first_line: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no = start, first_line
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            yield line_no, raw
            line_no += 1


def _run_task(task: _Task) -> _TaskResult:
    import array_record.python.array_record_module as arm

    features = _features()
    base_dir = os.path.dirname(os.path.abspath(task.manifest))
    writers: dict[str, Any] = {}
    parts: dict[str, _PartResult] = {}
    groups: dict[str, list[int]] = {}
    skipped, head = 0, []
    log_path = os.path.join(task.work_dir, f"task{task.index:05d}.skipped.jsonl")
    log = None
    lines = pending = 0
    try:
        for line_no, raw in _iter_lines(task.manifest, task.start, task.end, task.first_line):
            pending += 1
            if pending >= 64:
                _PROGRESS.add(pending)
                pending = 0
            if not raw.strip():
                continue
            lines += 1
            try:
                fields = schema.parse_manifest_line(raw)
                record = schema.load_record(fields, base_dir, full_decode=task.full_decode)
                try:
                    data = features.serialize_example(schema.to_tfds_example(record))
                except Exception as e:  # noqa: BLE001 - any serializer failure is this record's
                    raise RecordError(f"cannot be serialized ({type(e).__name__}: {e})") from None
            except RecordError as e:
                if task.max_bad < 0:
                    raise ManifestError(task.manifest, line_no, str(e)) from None
                skipped += 1
                if len(head) < MAX_LISTED_SKIPS:
                    head.append(SkippedRecord(line_no, str(e)))
                if log is None:
                    log = open(log_path, "w", encoding="utf-8")
                log.write(json.dumps({"line": line_no, "reason": str(e)}, ensure_ascii=False) + "\n")
                if skipped > task.max_bad:  # this range alone passes the cap: stop early
                    listed = "\n".join(f"  {task.manifest}:{s.line}: {s.reason}" for s in head[:10])
                    raise BuildError(
                        f"{task.manifest}: more than {task.max_bad} bad records (over max_bad_fraction) "
                        f"in lines {task.first_line}..{line_no} alone:\n{listed}") from None
                continue
            split = record["split"]
            if split not in writers:
                path = os.path.join(task.work_dir, f"task{task.index:05d}-{split}.{SHARD_SUFFIX}")
                writers[split] = arm.ArrayRecordWriter(path, "group_size:1")
                parts[split] = _PartResult(0, 0, path, path + ".groups.npy")
                groups[split] = []
            writers[split].write(data)
            parts[split].count += 1
            mosaic_id = record["mosaic_id"]
            groups[split].append(schema.stable_group_hash(mosaic_id) if mosaic_id else -1)
        _PROGRESS.add(pending)
    finally:
        for w in writers.values():
            w.close()
        if log is not None:
            log.close()
    for split, part in parts.items():
        part.num_bytes = os.path.getsize(part.path)
        np.save(part.groups_path, np.asarray(groups[split], np.int64), allow_pickle=False)
    return _TaskResult(task.index, lines, parts, skipped, head, log_path if log is not None else None)


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
) -> BuildSummary:
    """Build ArrayRecord shards + TFDS metadata from a JSONL manifest; returns the summary.

    Args:
      manifest: the JSONL manifest (see ``schema``); image paths are relative to its folder.
      out_dir: the data dir; the dataset goes to ``out_dir/ecom_rf_immr/1.0.0/``.
      workers: processes that read and check images (default: all CPUs); ``<= 1`` runs in-process.
      shards: byte-range tasks, each writing one shard per split it meets (default: from a size
        estimate, ~``target_shard_bytes`` per shard, at least ``workers``).
      max_bad_fraction: 0 fails on the first bad record (``ManifestError`` naming file:line); > 0
        skips and counts bad records, and fails (``BuildError``) above that fraction of records.
      full_decode: decode every image (catches truncated files); False checks headers only.
      overwrite: replace an existing build of the same version.
      progress: show a tqdm bar (stderr) and print the summary at the end.
    """
    t0 = time.time()
    manifest = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    if not 0.0 <= max_bad_fraction < 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    root = Path(out_dir) / DATASET_NAME
    final_dir = root / VERSION
    if final_dir.exists() and not overwrite:
        raise BuildError(f"{final_dir} already exists (pass overwrite=True to replace it)")
    if os.path.getsize(manifest) == 0:
        raise BuildError(f"{manifest}: the manifest is empty")
    n_tasks = shards if shards is not None else _estimate_tasks(manifest, max(1, workers), target_shard_bytes)
    ranges = _line_aligned_ranges(manifest, max(1, int(n_tasks)))

    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = root / f".incomplete-{VERSION}-{uuid.uuid4().hex[:8]}"
    work_dir = tmp_dir / "_work"
    work_dir.mkdir(parents=True)
    try:
        results = _run_tasks(manifest, ranges, work_dir, workers, max_bad_fraction, full_decode, progress)
        summary = _finalize(manifest, results, tmp_dir, final_dir, workers, max_bad_fraction, overwrite, t0)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if progress:
        print(str(summary), file=sys.stderr)
    return summary


def _run_tasks(manifest, ranges, work_dir, workers, max_bad_fraction, full_decode, progress) -> list[_TaskResult]:
    from tqdm.auto import tqdm

    in_process = workers <= 1 or len(ranges) == 1
    pool = None
    try:
        if in_process:
            counts = [_count_newlines(manifest, a, b) for a, b in ranges]
        else:
            ctx = mp.get_context("spawn")  # fork after TFDS/absl threads start is unsafe
            value = ctx.Value("q", 0)
            pool = ctx.Pool(min(workers, len(ranges)), initializer=_init_worker, initargs=(value,))
            counts = pool.starmap(_count_newlines, [(manifest, a, b) for a, b in ranges])
        total_lines = sum(counts) + (1 if _last_line_unterminated(manifest) else 0)
        max_bad = -1 if max_bad_fraction == 0 else int(math.floor(max_bad_fraction * total_lines))
        first_lines = np.cumsum([1] + counts[:-1]).tolist()
        tasks = [_Task(i, manifest, a, b, int(first_lines[i]), str(work_dir), max_bad, full_decode)
                 for i, (a, b) in enumerate(ranges)]
        bar = tqdm(total=total_lines, unit="rec", desc="ecom_rf_immr build", disable=not progress,
                   dynamic_ncols=True)
        with bar:
            if in_process:
                global _PROGRESS
                saved, _PROGRESS = _PROGRESS, _Progress(callback=bar.update)
                try:
                    results = [_run_task(t) for t in tasks]
                finally:
                    _PROGRESS = saved
            else:
                pending = {t.index: pool.apply_async(_run_task, (t,)) for t in tasks}
                results, seen = [], 0
                while pending:
                    for i in [i for i, r in pending.items() if r.ready()]:
                        results.append(pending.pop(i).get())  # re-raises a worker's error here
                    now = value.value
                    bar.update(now - seen)
                    seen = now
                    if pending:
                        time.sleep(0.05)
                results.sort(key=lambda r: r.index)
        return results
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _last_line_unterminated(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _finalize(manifest, results, tmp_dir: Path, final_dir: Path, workers, max_bad_fraction, overwrite, t0):
    num_lines = sum(r.lines for r in results)
    num_skipped = sum(r.skipped for r in results)
    head = [s for r in results for s in r.skipped_head][:MAX_LISTED_SKIPS]
    if num_lines and num_skipped / num_lines > max_bad_fraction:
        listed = "\n".join(f"  {manifest}:{s.line}: {s.reason}" for s in head[:10])
        raise BuildError(f"{manifest}: {num_skipped} of {num_lines} records are bad "
                         f"({num_skipped / num_lines:.2%} > max_bad_fraction {max_bad_fraction:.2%}):\n{listed}")
    template = _filename_template(tmp_dir)
    split_infos, records, shard_counts, num_bytes = [], {}, {}, {}
    for split in SPLITS:
        parts = [r.parts[split] for r in results if split in r.parts and r.parts[split].count > 0]
        if not parts:
            continue
        lengths = []
        for k, part in enumerate(parts):
            name = template.replace(split=split).sharded_filepath(shard_index=k, num_shards=len(parts))
            os.replace(part.path, name)
            lengths.append(part.count)
        hashes = np.concatenate([np.load(p.groups_path, allow_pickle=False) for p in parts])
        dense = np.full(hashes.shape, -1, np.int64)
        has = hashes >= 0
        if has.any():
            dense[has] = np.unique(hashes[has], return_inverse=True)[1]
        np.save(tmp_dir / f"mosaic_groups-{split}.npy", dense, allow_pickle=False)
        records[split], shard_counts[split] = sum(lengths), len(parts)
        num_bytes[split] = sum(p.num_bytes for p in parts)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes[split],
                                               filename_template=template.replace(split=split)))
    if not split_infos:
        raise BuildError(f"{manifest}: no valid records (read {num_lines}, skipped {num_skipped})")
    tfds.folder_dataset.write_metadata(
        data_dir=tmp_dir, features=_features(), split_infos=split_infos, version=VERSION,
        filename_template=template, check_data=False,
        description="ECom-RF-IMMR image-to-multimodal product retrieval pairs (ecomax schema).")
    skipped_log = None
    logs = [r.skipped_log for r in results if r.skipped_log]
    if logs:
        skipped_log = str(final_dir / "skipped.jsonl")
        with open(tmp_dir / "skipped.jsonl", "wb") as out:
            for p in logs:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
    shutil.rmtree(tmp_dir / "_work")
    summary = BuildSummary(
        manifest=manifest, dataset_dir=str(final_dir), records=records, shards=shard_counts,
        num_bytes=num_bytes, num_lines=num_lines, num_skipped=num_skipped, skipped=head,
        skipped_log=skipped_log, seconds=time.time() - t0, workers=workers, tasks=len(results))
    with open(tmp_dir / "build_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary.to_json(), f, ensure_ascii=False, indent=1)
    if final_dir.exists():
        if not overwrite:
            raise BuildError(f"{final_dir} appeared during the build")
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    summary.seconds = time.time() - t0
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


def _examples_in_range(rng: tuple[int, int, int], *, manifest: str, split: str, max_bad_fraction: float,
                       full_decode: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, TFDS example) for the records of ``split`` in one byte range of the manifest."""
    start, end, first_line = rng
    base_dir = os.path.dirname(os.path.abspath(manifest))
    lines = bad = 0
    for line_no, raw in _iter_lines(manifest, start, end, first_line):
        if not raw.strip():
            continue
        lines += 1
        try:
            fields = schema.parse_manifest_line(raw)
            if fields["split"] != split:
                continue
            record = schema.load_record(fields, base_dir, full_decode=full_decode)
        except RecordError as e:
            if max_bad_fraction == 0:
                raise ManifestError(manifest, line_no, str(e)) from None
            bad += 1
            print(f"ecom_rf_immr: skipping {manifest}:{line_no}: {e}", file=sys.stderr)
            continue
        yield line_no, schema.to_tfds_example(record)
    if lines and bad / lines > max_bad_fraction:
        raise BuildError(f"{manifest}: {bad} of {lines} records bad (> max_bad_fraction {max_bad_fraction})")


def _splits_in_manifest(manifest: str) -> list[str]:
    found = set()
    with open(manifest, "rb") as f:
        for raw in f:
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
    Bad-record rules are the same as ``build``'s; skipped lines are logged to stderr.
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
        self._max_bad_fraction = float(max_bad_fraction)
        self._full_decode = full_decode
        self._beam_shards = beam_shards
        super().__init__(**kwargs)
        self._original_state.update(manifest=manifest, max_bad_fraction=max_bad_fraction,
                                    full_decode=full_decode, beam_shards=beam_shards)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=schema.tfds_features(),
            description="ECom-RF-IMMR image-to-multimodal product retrieval pairs (ecomax schema).")

    def _split_generators(self, dl_manager):
        if not self._manifest:
            raise ValueError("EcomRfImmr needs manifest=<path to manifest.jsonl> to prepare the dataset")
        return {split: self._generate_examples(split=split) for split in _splits_in_manifest(self._manifest)}

    def _generate_examples(self, split: str):
        kwargs = dict(manifest=self._manifest, split=split, max_bad_fraction=self._max_bad_fraction,
                      full_decode=self._full_decode)
        if self._beam_shards:
            beam = tfds.core.lazy_imports.apache_beam
            ranges = _line_aligned_ranges(self._manifest, self._beam_shards)
            counts = [_count_newlines(self._manifest, a, b) for a, b in ranges]
            firsts = np.cumsum([1] + counts[:-1]).tolist()
            elems = [(a, b, int(f)) for (a, b), f in zip(ranges, firsts)]
            return (f"Ranges_{split}" >> beam.Create(elems)
                    | f"Examples_{split}" >> beam.FlatMap(_examples_in_range, **kwargs))
        return _examples_in_range((0, os.path.getsize(self._manifest), 1), **kwargs)
