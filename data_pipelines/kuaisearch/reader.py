"""Random-access readers over prepared KuaiSearch datasets (for ``grain.MapDataset.source``).

    src = open_split(out_dir, "rank", split="train")
    len(src); src[0]          # {'user_id': 1, ..., 'recently_clicked_item_ids': array([...]), ...}
    ds = grain.MapDataset.source(src).shuffle(seed=0).map(featurize).batch(256)

Records are located through TFDS (``tfds.builder_from_directory(...).as_data_source`` with raw
bytes), so the dataset folder is a plain TFDS dataset, and decoded by ``records.RecordDecoder``
(same values as TFDS's own ``deserialize_example_np``, but strings come back as ``str``, floats as
``float`` and it is several times faster). ``KuaiSearchSource`` pickles by path, so grain worker
processes reopen it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Sequence

from data_pipelines.kuaisearch import records, schema


def dataset_dir(out_dir: str | os.PathLike, kind: str, version: str = records.VERSION) -> pathlib.Path:
    """``out_dir/kuaisearch_<kind>/<version>``."""
    return pathlib.Path(out_dir) / records.dataset_name(kind) / version


class KuaiSearchSource:
    """``len`` + ``__getitem__`` (+ ``__getitems__``) over one split (or ``"train+test"``, or all
    splits with ``split=None``) of a prepared kind; items are row dicts in schema order."""

    def __init__(self, out_dir: str | os.PathLike, kind: str, split: str | None = "train", *,
                 version: str = records.VERSION):
        if kind not in schema.SCHEMAS:
            raise ValueError(f"unknown KuaiSearch kind {kind!r}; expected one of {schema.KINDS}")
        self.out_dir = str(out_dir)
        self.kind = kind
        self.version = version
        self.split = split
        self._raw = None
        self._decoder = None
        self._info = None
        self._open()

    @property
    def path(self) -> pathlib.Path:
        return dataset_dir(self.out_dir, self.kind, self.version)

    def _open(self) -> None:
        import tensorflow_datasets as tfds  # noqa: PLC0415

        path = self.path
        if not (path / "dataset_info.json").is_file():
            raise FileNotFoundError(
                f"no prepared KuaiSearch {self.kind!r} dataset at {path}; run "
                f"`ecomax data prepare kuaisearch --src DIR --out {self.out_dir}` first")
        builder = tfds.builder_from_directory(os.fspath(path))
        available = list(builder.info.splits.keys())
        split = self.split
        if split is None:
            split = "+".join(sorted(available))
        else:
            for part in split.split("+"):
                name = part.split("[", 1)[0]
                if name not in available:
                    raise KeyError(f"KuaiSearch {self.kind!r} at {path} has no split {name!r}; "
                                   f"available: {sorted(available)}")
        self._info = builder.info
        self._raw = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._decoder = records.RecordDecoder(self.kind)

    @property
    def info(self):
        """The TFDS ``DatasetInfo`` (features, splits, shard lengths)."""
        return self._info

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict:
        n = len(self._raw)
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return self._decoder.decode(self._raw[i])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        n = len(self._raw)
        idx = [i + n if i < 0 else i for i in (int(i) for i in indices)]
        for i in idx:
            if not 0 <= i < n:
                raise IndexError(f"index {i} out of range for {n} records")
        decode = self._decoder.decode
        return [decode(r) for r in self._raw.__getitems__(idx)]

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {"out_dir": self.out_dir, "kind": self.kind, "version": self.version,
                "split": self.split}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._raw = self._decoder = self._info = None
        self._open()

    def __repr__(self) -> str:
        return (f"KuaiSearchSource(kind={self.kind!r}, split={self.split!r}, len={len(self)}, "
                f"path={str(self.path)!r})")


def open_split(out_dir: str | os.PathLike, kind: str, split: str | None = "train", *,
               version: str = records.VERSION) -> KuaiSearchSource:
    """A random-access source over ``out_dir/kuaisearch_<kind>/<version>`` (see module docstring).

    ``split``: "train", "test", a TFDS split expression ("train+test", "train[:10%]") or None for
    every split of the kind. Raises FileNotFoundError when the kind was not prepared and KeyError
    for a split it does not have.
    """
    return KuaiSearchSource(out_dir, kind, split, version=version)


def available_splits(out_dir: str | os.PathLike, kind: str,
                     version: str = records.VERSION) -> dict[str, int]:
    """``{split: num_examples}`` of a prepared kind."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    b = tfds.builder_from_directory(os.fspath(dataset_dir(out_dir, kind, version)))
    return {k: v.num_examples for k, v in b.info.splits.items()}
