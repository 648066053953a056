"""Per-process batches from a random-access source, with a global, index-based shuffle.

The stream of examples is defined once for the whole job: ``source`` shuffled with the config seed
(a fresh permutation every epoch), transformed, and cut into *global* batches of ``global_batch_size``.
Process ``p`` of ``P`` reads rows ``[p * B/P, (p + 1) * B/P)`` of every global batch and decodes only
those. So a seed gives the same global batches whatever the number of processes, and the iterator
state (``{"next_index": k}``, the number of global batches consumed) is the same on every process:
a checkpoint written by 2 processes resumes on 1, or on 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


Transform = Callable[[Any, np.random.Generator], Any]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def _allow_multiprocessing() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def process_batches(
    source: RandomAccessSource,
    *,
    global_batch_size: int,
    seed: int,
    transform: Transform | None = None,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    read_threads: int = 4,
    prefetch: int = 16,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """This process's slices of the global batches, as a checkpointable grain ``IterDataset``.

    ``transform(record, rng)`` runs per example with a generator derived from (seed, global index), so
    augmentation is identical whatever the number of processes. ``num_epochs=None`` repeats forever.
    ``worker_count > 0`` decodes in that many prefetch processes (``mp_prefetch``).
    """
    local = local_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.random_map(transform)
    # Local batches in global order; global batch k is local batches k*P .. k*P + P-1.
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _allow_multiprocessing()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                          per_worker_buffer_size=worker_buffer_size))
    return it


def eval_batches(source: RandomAccessSource, batch_size: int,
                 transform: Callable[[Any], Any] | None = None) -> Sequence[Any]:
    """One ordered pass over ``source`` in batches (the last one may be short); for evaluators."""
    ds = grain.MapDataset.source(source)
    if transform is not None:
        ds = ds.map(transform)
    return ds.batch(batch_size, drop_remainder=False)
