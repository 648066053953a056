"""SID data: the dedup digit, the table and trie round trips, the trie against a brute-force oracle, and
the embedding checks that name the bad row."""

import itertools

import jax
import numpy as np
import pytest

from data_pipelines.sid.embeddings import EmbeddingError, EmbeddingRows, open_embeddings
from data_pipelines.sid.table import dedup_digit, load_table, write_table
from data_pipelines.sid.trie import accepts, advance, allowed, build_trie, leaf_rows, load_trie, save_trie


def test_dedup_digit_numbers_colliding_items_in_row_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]])
    np.testing.assert_array_equal(dedup_digit(codes), [0, 0, 1, 0, 2, 1])
    full = np.concatenate([codes, dedup_digit(codes)[:, None]], 1)
    assert len({tuple(r) for r in full}) == len(codes)


def _table(seed, n=60, sizes=(3, 4, 2), dedup=True):
    codes = np.random.default_rng(seed).integers(0, sizes, size=(n, len(sizes)))
    table = np.concatenate([codes, dedup_digit(codes)[:, None]], 1) if dedup else codes
    return table, list(sizes) + ([int(table[:, -1].max()) + 1] if dedup else [])


@pytest.mark.parametrize("dense_levels", [0, 1, 2, 4])
@pytest.mark.parametrize("dedup", [True, False])
def test_trie_accepts_exactly_the_sids_in_the_table(dense_levels, dedup):
    table, sizes = _table(dense_levels, dedup=dedup)
    trie = build_trie(table, sizes, dense_levels=min(dense_levels, len(sizes)))
    every = np.array(list(itertools.product(*map(range, sizes))), np.int32)  # brute force: every code tuple
    in_table = {tuple(r) for r in table.tolist()}
    got = np.asarray(jax.jit(accepts)(trie, every))
    np.testing.assert_array_equal(got, [tuple(r) in in_table for r in every.tolist()])
    # prefix by prefix, the allowed mask is exactly the codes some SID continues with
    for level in range(len(sizes)):
        prefixes = sorted({tuple(r[:level]) for r in table.tolist()})
        ids = np.zeros(len(prefixes), np.int32)
        for j in range(level):
            ids = np.asarray(advance(trie, j, ids, np.array([p[j] for p in prefixes], np.int32)))
        assert (ids >= 0).all() and list(ids) == list(range(len(prefixes)))  # lexicographic numbering
        mask = np.asarray(jax.jit(allowed, static_argnums=1)(trie, level, ids))
        for p, row in zip(prefixes, mask):
            assert set(np.flatnonzero(row)) == {r[level] for r in table.tolist() if tuple(r[:level]) == p}
    assert not np.asarray(allowed(trie, 0, np.array([-1], np.int32))).any()  # a dead beam allows nothing


def test_trie_leaves_point_to_table_rows_and_round_trip(tmp_path):
    table, sizes = _table(7, dedup=False)
    trie = build_trie(table, sizes, dense_levels=1)
    save_trie(trie, tmp_path)
    loaded = load_trie(tmp_path)
    assert (loaded.sizes, loaded.dense_levels, loaded.max_degree) == (trie.sizes, trie.dense_levels, trie.max_degree)
    assert loaded.arrays.keys() == trie.arrays.keys()
    for k in trie.arrays:
        np.testing.assert_array_equal(loaded.arrays[k], trie.arrays[k])
    sids = sorted({tuple(r) for r in table.tolist()})
    for leaf, sid in enumerate(sids):
        assert sorted(leaf_rows(loaded, leaf)) == [i for i, r in enumerate(table.tolist()) if tuple(r) == sid]


def test_table_round_trip(tmp_path):
    codes = np.array([[1, 2], [1, 2], [0, 3]])
    written = write_table(tmp_path, codes, np.array([10, 11, 12]), [4, 4], dedup=True)
    table, ids, meta = load_table(tmp_path)
    np.testing.assert_array_equal(table, written)
    np.testing.assert_array_equal(table, [[1, 2, 0], [1, 2, 1], [0, 3, 0]])
    assert ids.tolist() == [10, 11, 12] and table.dtype == np.int32
    assert meta == {"items": 3, "levels": 2, "dedup": True, "sizes": [4, 4, 2]}


def test_bad_embeddings_name_the_row(tmp_path):
    x = np.ones((10, 4), np.float32)
    path = tmp_path / "items.npy"
    x[7, 2] = np.nan
    np.save(path, x)
    with pytest.raises(EmbeddingError, match="row 7 is not finite"):
        open_embeddings(path, 4)
    x[7, 2] = 0
    np.save(path, x)
    with pytest.raises(EmbeddingError, match=r"dimension 4 differs from the config's model.dim 8"):
        open_embeddings(path, 8)
    np.save(tmp_path / "items.ids.npy", np.array([5, 6, 7, 8, 9, 1, 2, 3, 6, 0]))
    with pytest.raises(EmbeddingError, match="id 6 appears at rows 1 and 8"):
        open_embeddings(path, 4)
    np.save(tmp_path / "items.ids.npy", np.arange(100, 110))
    vectors, ids = open_embeddings(path, 4)
    assert ids.tolist() == list(range(100, 110)) and isinstance(vectors, np.memmap)
    np.save(path, x.astype(np.float64))
    with pytest.raises(EmbeddingError, match="dtype float64, expected float32"):
        open_embeddings(path, 4)


def test_embedding_rows_pad_with_zero_weight():
    rows = EmbeddingRows(np.arange(10, dtype=np.float32).reshape(5, 2), padded_len=8)
    assert len(rows) == 8
    batch = rows.gather(np.arange(8))
    np.testing.assert_array_equal(batch["w"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["x"][5:], [[8, 9]] * 3)
