"""Global batches: the same seed gives the same global batches at any process count; resumable state."""

import numpy as np
import pytest

from data_pipelines.loader import InMemorySource, local_batch_size, process_batches
from data_pipelines.shapes import ShapesSource


def _take(it, n):
    return [next(it) for _ in range(n)]


def _augment(record, rng):
    return {"image": record["image"], "tokens": record["tokens"], "noise": np.float32(rng.random())}


@pytest.mark.parametrize("processes", [2, 4])
def test_same_seed_same_global_batches_across_process_counts(processes):
    source = ShapesSource(100, image_size=16)
    one = _take(iter(process_batches(source, global_batch_size=8, seed=3, transform=_augment)), 30)
    parts = [_take(iter(process_batches(source, global_batch_size=8, seed=3, transform=_augment,
                                        process_index=p, process_count=processes)), 30)
             for p in range(processes)]
    for step in range(30):  # 30 batches of 8 > 2 epochs of 100: epochs reshuffle identically too
        for key in ("image", "tokens", "noise"):
            np.testing.assert_array_equal(one[step][key], np.concatenate([part[step][key] for part in parts]))
    assert not np.array_equal(one[0]["tokens"], one[13]["tokens"])


@pytest.mark.parametrize("processes", [2, 4])
def test_in_memory_fast_path_same_global_batches_across_process_counts(processes):
    source = InMemorySource(ShapesSource(100, image_size=16))
    one = _take(iter(process_batches(source, global_batch_size=8, seed=3)), 30)
    parts = [_take(iter(process_batches(source, global_batch_size=8, seed=3, process_index=p,
                                        process_count=processes)), 30) for p in range(processes)]
    seen = set()
    for step in range(30):
        np.testing.assert_array_equal(one[step]["image"], np.concatenate([part[step]["image"] for part in parts]))
        seen.update(map(bytes, one[step]["image"].reshape(8, -1)))
    assert len(seen) > 95  # 240 draws over 100 examples in 2.4 reshuffled epochs reach nearly all


def test_in_memory_source_resumes_exactly():
    source = InMemorySource(ShapesSource(64, image_size=16))
    ds = process_batches(source, global_batch_size=8, seed=0)
    it = iter(ds)
    _take(it, 11)  # into the second epoch
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_different_seed_different_order():
    source = ShapesSource(100, image_size=16)
    a = next(iter(process_batches(source, global_batch_size=8, seed=0)))
    b = next(iter(process_batches(source, global_batch_size=8, seed=1)))
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_iterator_state_resumes_exactly():
    source = ShapesSource(64, image_size=16)
    ds = process_batches(source, global_batch_size=8, seed=0, transform=_augment)
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3)):
        np.testing.assert_array_equal(a["noise"], b["noise"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_multiprocess_prefetch_gives_the_same_batches():
    source = ShapesSource(64, image_size=16)
    plain = _take(iter(process_batches(source, global_batch_size=8, seed=0)), 4)
    prefetched = _take(iter(process_batches(source, global_batch_size=8, seed=0, worker_count=2)), 4)
    for a, b in zip(plain, prefetched):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        local_batch_size(8, 3)
