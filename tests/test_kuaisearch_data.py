"""KuaiSearch data layer: schema validation, JSONL -> TFDS ArrayRecord, readers, builders, synthetic world."""

from __future__ import annotations

import collections
import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from data_pipelines.kuaisearch import records, schema
from data_pipelines.kuaisearch.prepare import TooManyBadLinesError, prepare
from data_pipelines.kuaisearch.reader import available_splits, open_split
from data_pipelines.kuaisearch.schema import KINDS, KuaiSearchFormatError, parse_line, validate
from data_pipelines.kuaisearch.synthetic import synthesize

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_kuaisearch_data")

DEMO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "kuaisearch_demo"


def _demo_dir() -> pathlib.Path:
    if not DEMO.is_dir():
        pytest.skip(f"KuaiSearch demo files not found at {DEMO}")
    return DEMO


def _lines(path: pathlib.Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _json_rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in _lines(path) if x.strip()]


def _read_split(out: pathlib.Path, kind: str, split: str) -> list[dict]:
    src = open_split(out, kind, split)
    return [records.to_json_row(src[i]) for i in range(len(src))]


def _expected_by_split(kind: str, rows: list[dict]) -> dict[str, list[dict]]:
    by = collections.defaultdict(list)
    for r in rows:
        n = validate(kind, r)
        by[schema.row_split(kind, n)].append(n)
    return dict(by)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("ks_demo_out")
    summary = prepare(_demo_dir(), out, workers=1, progress=False, verbose=False)
    assert {k: summary.kinds[k].total_rows for k in KINDS} == {k: 200 for k in KINDS}
    return out


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("ks_synth")
    return synthesize(out, num_users=60, num_items=400, num_sessions=300, seed=7)


# ----------------------------------------------------------------------------- schema


def test_schema_matches_demo_keys_and_types():
    demo = _demo_dir()
    for kind in KINDS:
        rows = _json_rows(demo / f"{kind}.jsonl")
        assert list(rows[0]) == list(schema.FIELD_NAMES[kind]), kind
        for r in rows:
            assert validate(kind, r) == r  # real rows are already in normal form


def test_validate_normalises():
    row = {"query": "q", "item_title": "t", "brand": "b", "seller_name": "s", "attr_value": "a",
           "score": 2.0, "extra": 1}
    assert validate("relevance", row) == {"query": "q", "item_title": "t", "brand": "b",
                                          "seller_name": "s", "attr_value": "a", "score": 2}
    counter = collections.Counter()
    validate("relevance", row, unknown=counter)
    assert counter == {"extra": 1}
    with pytest.raises(KuaiSearchFormatError, match=r"x\.jsonl:4: .*field 'score': value 5 not in"):
        validate("relevance", {**row, "score": 5}, source="x.jsonl", line=4)
    with pytest.raises(KuaiSearchFormatError, match="expected int, got float"):
        validate("relevance", {**row, "score": 1.5})
    with pytest.raises(ValueError, match="unknown KuaiSearch kind"):
        validate("nope", row)
    with pytest.raises(KuaiSearchFormatError, match="'query': string is not valid Unicode"):
        parse_line("relevance", json.dumps({**row, "query": "a\ud800"}).encode())
    with pytest.raises(KuaiSearchFormatError, match="'score': expected int, got null"):
        parse_line("relevance", json.dumps({**row, "score": None}).encode())
    with pytest.raises(KuaiSearchFormatError, match="expected a finite number"):
        validate("rank", {**_json_rows(_demo_dir() / "rank.jsonl")[0], "target_item_price": float("nan")})


def test_int_beyond_int64_is_a_bad_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    row = _json_rows(_demo_dir() / "items.jsonl")[0]
    (src / "items.jsonl").write_text(json.dumps({**row, "item_id": 2 ** 70}) + "\n", encoding="utf-8")
    with pytest.raises(KuaiSearchFormatError, match=r"items\.jsonl:1: .*cannot encode row"):
        prepare(src, tmp_path / "out", kinds=["items"], workers=1, progress=False, verbose=False)


def test_find_source_files_both_layouts(tmp_path):
    (tmp_path / "items_lite").mkdir()
    (tmp_path / "items_lite" / "train.jsonl").write_text("")
    (tmp_path / "users.jsonl").write_text("")
    assert schema.find_source_files(tmp_path, "items") == [tmp_path / "items_lite" / "train.jsonl"]
    assert schema.find_source_files(tmp_path, "users") == [tmp_path / "users.jsonl"]
    with pytest.raises(FileNotFoundError, match="rank_lite"):
        schema.find_source_files(tmp_path, "rank")


# ----------------------------------------------------------------------------- demo round trip


@pytest.mark.parametrize("kind", KINDS)
def test_demo_roundtrip_every_field(demo_out, kind):
    rows = _json_rows(_demo_dir() / f"{kind}.jsonl")
    expected = _expected_by_split(kind, rows)
    assert available_splits(demo_out, kind) == {s: len(v) for s, v in expected.items()}
    for split, exp in expected.items():
        got = _read_split(demo_out, kind, split)
        assert got == exp  # file order is kept, every field equal
    # and against the raw JSON rows (demo rows are already normal)
    assert [r for s in sorted(expected) for r in _read_split(demo_out, kind, s)] == [
        r for s in sorted(expected) for r in rows if schema.row_split(kind, r) == s]


def test_decoded_types(demo_out):
    rec = open_split(demo_out, "rank")[0]
    assert isinstance(rec["query"], str) and isinstance(rec["user_id"], int)
    assert rec["recently_clicked_item_ids"].dtype == np.int64
    assert rec["recently_clicked_item_ids"].shape == (20,)
    assert isinstance(rec["target_item_price"], float)
    assert set(rec["user_statistical_features"]) == set(schema.USER_STAT_KEYS)
    recall = open_split(demo_out, "recall")
    empty = [recall[i]["purchased_item_ids"] for i in range(len(recall))
             if len(recall[i]["purchased_item_ids"]) == 0]
    assert empty and empty[0].dtype == np.int64


@pytest.mark.parametrize("kind", KINDS)
def test_tfds_reads_prepared_output(demo_out, kind):
    import tensorflow_datasets as tfds

    ours = open_split(demo_out, kind)
    via_name = tfds.data_source(f"kuaisearch_{kind}", data_dir=str(demo_out), split="train")
    builder = tfds.builder_from_directory(str(demo_out / f"kuaisearch_{kind}" / "1.0.0"))
    assert builder.info.file_format.value == "array_record"
    via_dir = builder.as_data_source(split="train")
    assert len(via_name) == len(via_dir) == len(ours)
    for i in (0, 1, len(ours) // 2, len(ours) - 1):
        mine = records.to_json_row(ours[i])
        assert records.to_json_row(via_name[i]) == mine
        assert records.to_json_row(via_dir[i]) == mine


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_matches_tfds_example_serializer(kind):
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.proto import tf_example_pb2

    feats = records.features(kind)
    ser = example_serializer.ExampleSerializer(feats.get_serialized_info())
    enc = records.RecordEncoder(kind)
    for r in _json_rows(_demo_dir() / f"{kind}.jsonl")[:20]:
        row = validate(kind, r)
        ref = tf_example_pb2.Example.FromString(ser.serialize_example(feats.encode_example(row)))
        mine = tf_example_pb2.Example.FromString(enc.encode(row))
        assert mine == ref
        decoded = records.RecordDecoder(kind).decode(enc.encode(row))
        assert records.to_json_row(decoded) == row
        assert records.to_json_row(feats.deserialize_example_np(enc.encode(row))) == row


def test_parallel_workers_write_several_shards_in_order(tmp_path):
    demo = _demo_dir()
    out = tmp_path / "out"
    summary = prepare(demo, out, workers=2, shard_bytes=40_000, progress=False, verbose=False)
    assert summary.workers == 2
    assert summary.kinds["recall"].shards["train"] > 1
    assert summary.kinds["rank"].shards["train"] > 1
    for kind in KINDS:
        rows = _json_rows(demo / f"{kind}.jsonl")
        assert _read_split(out, kind, "train") == rows
    saved = json.loads((out / "kuaisearch_prepare_summary.json").read_text())
    assert saved["kinds"]["rank"]["total_rows"] == 200


def test_grain_source_and_pickle(demo_out):
    import grain

    src = open_split(demo_out, "rank")
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone) == len(src)
    assert records.to_json_row(clone[-1]) == records.to_json_row(src[len(src) - 1])
    ds = (grain.MapDataset.source(src).shuffle(seed=0)
          .map(lambda r: {"label": np.int32(r["is_clicked"]),
                          "hist": r["recently_clicked_item_ids"][:20]})
          .batch(16))
    batch = ds[0]
    assert batch["label"].shape == (16,) and batch["hist"].shape == (16, 20)
    items = src.__getitems__([0, 5, -1])
    assert [x["target_item_id"] for x in items] == [src[0]["target_item_id"], src[5]["target_item_id"],
                                                    src[-1]["target_item_id"]]
    with pytest.raises(IndexError):
        src[len(src)]
    with pytest.raises(KeyError, match="no split 'test'"):
        open_split(demo_out, "rank", "test")
    with pytest.raises(FileNotFoundError, match="run"):
        open_split(demo_out.parent / "nowhere", "rank")


def test_tfds_generator_builder_matches_prepare(demo_out, tmp_path):
    import tensorflow_datasets as tfds

    import data_pipelines.kuaisearch.builders  # noqa: F401  registers kuaisearch_* builders

    for kind in ("users", "rank"):
        b = tfds.builder(f"kuaisearch_{kind}", data_dir=str(tmp_path), file_format="array_record")
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(_demo_dir())))
        assert b.info.features.to_json_content() == records.features(kind).to_json_content()
        via_builder = _read_split(tmp_path, kind, "train")
        via_prepare = _read_split(demo_out, kind, "train")
        key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
        assert sorted(map(key, via_builder)) == sorted(map(key, via_prepare))


def test_blank_lines_bom_crlf_and_unknown_fields(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = _json_rows(_demo_dir() / "users.jsonl")[:5]
    rows[2] = {**rows[2], "vip_level": 3}
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:3]) + "\r\n\r\n"
    text += "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[3:])  # no final newline
    (src / "users.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    summary = prepare(src, tmp_path / "out", kinds=["users"], workers=1, progress=False, verbose=False)
    ks = summary.kinds["users"]
    assert ks.rows == {"train": 5} and ks.blank_lines == 1 and ks.unknown_fields == {"vip_level": 1}
    assert _read_split(tmp_path / "out", "users", "train") == [validate("users", r) for r in rows]
    assert "unknown fields dropped" in str(summary)


def test_split_field_routes_rows_to_tfds_splits(tmp_path, small_world):
    out = tmp_path / "out"
    prepare(small_world["rank"].parent, out, kinds=["recall"], workers=1, progress=False, verbose=False)
    rows = _json_rows(small_world["recall"])
    splits = available_splits(out, "recall")
    assert splits == dict(collections.Counter(r["split"] for r in rows))
    assert _read_split(out, "recall", "test") == [r for r in rows if r["split"] == "test"]
    both = open_split(out, "recall", None)
    assert len(both) == len(rows)


# ----------------------------------------------------------------------------- malformed lines

_BAD_LINE_NO = 7


def _corrupt(kind: str, row: dict, defect: str) -> bytes:
    fields = schema.SCHEMAS[kind]
    if defect == "bad_json":
        return json.dumps(row, ensure_ascii=False).encode("utf-8")[:-9]
    if defect == "missing_field":
        r = dict(row)
        del r[fields[1].name]
        return json.dumps(r, ensure_ascii=False).encode("utf-8")
    if defect == "wrong_type":
        f = next(f for f in fields if f.type == schema.INT)
        return json.dumps({**row, f.name: "12"}, ensure_ascii=False).encode("utf-8")
    if defect == "not_a_list":
        f = next(f for f in fields if f.type == schema.INT_LIST)
        return json.dumps({**row, f.name: 5}, ensure_ascii=False).encode("utf-8")
    if defect == "row_not_object":
        return json.dumps(list(row.values()), ensure_ascii=False).encode("utf-8")
    if defect == "invalid_utf8":
        f = next(f for f in fields if f.type == schema.STR)
        raw = json.dumps({**row, f.name: "@@BAD@@"}, ensure_ascii=False).encode("utf-8")
        return raw.replace(b"@@BAD@@", b"ok\xff\xfeok")
    raise AssertionError(defect)


_EXPECTED_REASON = {
    "bad_json": "invalid JSON",
    "missing_field": "missing field",
    "wrong_type": "expected int, got str",
    "not_a_list": "expected a list of int, got int",
    "row_not_object": "expected a JSON object, got list",
    "invalid_utf8": "invalid UTF-8 at byte",
}
_LIST_KINDS = [k for k in KINDS if any(f.type == schema.INT_LIST for f in schema.SCHEMAS[k])]
_CASES = [(k, d) for k in KINDS for d in _EXPECTED_REASON if d != "not_a_list" or k in _LIST_KINDS]


def _write_with_bad_line(tmp_path: pathlib.Path, kind: str, bad: bytes, line_no: int,
                         layout: str = "demo") -> pathlib.Path:
    src = tmp_path / "src"
    lines = _lines(_demo_dir() / f"{kind}.jsonl")
    lines[line_no - 1] = bad
    if layout == "demo":
        path = src / f"{kind}.jsonl"
    else:
        path = src / schema.RELEASE_FOLDERS[kind] / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind,defect", _CASES)
def test_malformed_line_names_file_and_line(tmp_path, kind, defect):
    row = _json_rows(_demo_dir() / f"{kind}.jsonl")[_BAD_LINE_NO - 1]
    bad = _corrupt(kind, row, defect)
    path = _write_with_bad_line(tmp_path, kind, bad, _BAD_LINE_NO)
    out = tmp_path / "out"
    with pytest.raises(KuaiSearchFormatError) as ei:
        prepare(path.parent, out, kinds=[kind], workers=1, progress=False, verbose=False)
    msg = str(ei.value)
    assert f"{path}:{_BAD_LINE_NO}:" in msg
    assert _EXPECTED_REASON[defect] in msg
    assert ei.value.line == _BAD_LINE_NO and ei.value.source == str(path)
    # nothing half-written
    assert not (out / f"kuaisearch_{kind}" / "1.0.0").exists()
    assert not list((out / f"kuaisearch_{kind}").glob("*incomplete*"))
    # the same message from the line parser itself
    with pytest.raises(KuaiSearchFormatError, match=_EXPECTED_REASON[defect]):
        parse_line(kind, bad, source=str(path), line=_BAD_LINE_NO)


def test_struct_field_not_an_object(tmp_path):
    row = _json_rows(_demo_dir() / "rank.jsonl")[0]
    bad = json.dumps({**row, "user_statistical_features": [0.0, 1.0]}).encode()
    with pytest.raises(KuaiSearchFormatError, match="'user_statistical_features': expected an object"):
        parse_line("rank", bad, source="rank.jsonl", line=1)
    bad = json.dumps({**row, "target_item_statistical_features": {"item_show_cnt_30d_hist": 1.0}}).encode()
    with pytest.raises(KuaiSearchFormatError, match="missing key 'item_click_cnt_30d_hist'"):
        parse_line("rank", bad, source="rank.jsonl", line=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_in_a_later_range_reports_absolute_line(tmp_path, workers):
    line_no = 181
    row = _json_rows(_demo_dir() / "recall.jsonl")[line_no - 1]
    path = _write_with_bad_line(tmp_path, "recall", _corrupt("recall", row, "not_a_list"), line_no,
                                layout="release")
    with pytest.raises(KuaiSearchFormatError) as ei:
        prepare(tmp_path / "src", tmp_path / "out", kinds=["recall"], workers=workers,
                shard_bytes=30_000, progress=False, verbose=False)
    assert f"{path}:{line_no}:" in str(ei.value)
    assert "recall_lite/train.jsonl" in str(ei.value)


# ----------------------------------------------------------------------------- skip cap


def _users_with_bad_lines(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    src.mkdir()
    lines = _lines(_demo_dir() / "users.jsonl")
    bad = [b'{"user_id": 1, "gender": ', b'{"user_id": "x"}', b"\xff\xfe"]
    for pos, b in zip((10, 50, 120), bad, strict=True):
        lines.insert(pos, b)  # bad lines end up at 1-based lines 11, 51, 121
    (src / "users.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return src


def test_skip_cap_under_cap_counts_skips(tmp_path):
    src = _users_with_bad_lines(tmp_path)
    summary = prepare(src, tmp_path / "out", kinds=["users"], workers=1, max_bad_fraction=0.05,
                      progress=False, verbose=False)
    ks = summary.kinds["users"]
    assert ks.rows == {"train": 200} and ks.skipped == 3
    assert len(ks.bad_examples) == 3
    assert "users.jsonl:11:" in ks.bad_examples[0] and "invalid JSON" in ks.bad_examples[0]
    assert "users.jsonl:51:" in ks.bad_examples[1] and "'user_id': expected int" in ks.bad_examples[1]
    assert "users.jsonl:121:" in ks.bad_examples[2] and "invalid UTF-8" in ks.bad_examples[2]
    assert "skipped" in str(summary)
    assert len(open_split(tmp_path / "out", "users")) == 200


def test_skip_cap_over_cap_fails(tmp_path):
    src = _users_with_bad_lines(tmp_path)
    with pytest.raises(TooManyBadLinesError) as ei:
        prepare(src, tmp_path / "out", kinds=["users"], workers=2, shard_bytes=8_000,
                max_bad_fraction=0.01, progress=False, verbose=False)
    msg = str(ei.value)
    assert "users: 3 bad line(s) of 203" in msg and "max_bad_fraction=0.01" in msg
    assert "users.jsonl:11:" in msg
    assert not (tmp_path / "out" / "kuaisearch_users" / "1.0.0").exists()
    with pytest.raises(KuaiSearchFormatError, match="users.jsonl:11:"):
        prepare(src, tmp_path / "out", kinds=["users"], workers=1, progress=False, verbose=False)


# ----------------------------------------------------------------------------- synthetic world


def test_synthetic_is_deterministic(tmp_path):
    kw = dict(num_users=30, num_items=200, num_sessions=60)
    a = synthesize(tmp_path / "a", seed=3, **kw)
    b = synthesize(tmp_path / "b", seed=3, **kw)
    c = synthesize(tmp_path / "c", seed=4, **kw)
    assert sorted(a) == list(sorted(KINDS))
    for kind in KINDS:
        assert a[kind].name == f"{kind}.jsonl"
        assert a[kind].read_bytes() == b[kind].read_bytes(), kind
    assert any(a[k].read_bytes() != c[k].read_bytes() for k in KINDS)
    assert a["recall"].read_bytes() != c["recall"].read_bytes()


def test_synthetic_is_joinable_and_in_schema(small_world):
    rows = {k: _json_rows(p) for k, p in small_world.items()}
    for kind, rs in rows.items():
        for r in rs:
            assert list(r) == list(schema.FIELD_NAMES[kind])
            assert validate(kind, r) == r
    users = {r["user_id"] for r in rows["users"]}
    items = {r["item_id"]: r for r in rows["items"]}
    titles = {r["item_title"] for r in rows["items"]}
    assert len(users) == 60 and len(items) == 400
    sessions = {}
    for r in rows["recall"]:
        assert r["user_id"] in users
        assert r["session_id"] not in sessions
        sessions[r["session_id"]] = r
        imp = r["impressed_item_ids"]
        assert imp and len(set(imp)) == len(imp) and set(imp) <= set(items)
        assert set(r["clicked_item_ids"]) <= set(imp)
        assert set(r["purchased_item_ids"]) <= set(r["clicked_item_ids"])
    assert {r["split"] for r in rows["recall"]} == {"train", "test"}
    times = [r["time_index"] for r in rows["recall"]]
    assert times == sorted(times)
    pairs = collections.Counter()
    for r in rows["rank"]:
        s = sessions[r["session_id"]]
        assert r["user_id"] == s["user_id"] and r["query"] == s["query"] and r["split"] == s["split"]
        assert len(r["recently_clicked_item_ids"]) == 20 and len(r["recently_purchased_item_ids"]) == 20
        assert set(r["recently_clicked_item_ids"]) <= set(items)
        assert set(r["recently_purchased_item_ids"]) <= set(items)
        assert r["is_clicked"] == int(r["target_item_id"] in s["clicked_item_ids"])
        assert r["is_purchased"] == int(r["target_item_id"] in s["purchased_item_ids"])
        assert r["search_entrance"] in ("mall", "homepage")
        pairs[(r["session_id"], r["target_item_id"])] += 1
    assert pairs == collections.Counter(
        (sid, i) for sid, s in sessions.items() for i in s["impressed_item_ids"])
    for r in rows["relevance"]:
        assert r["item_title"] in titles and r["score"] in (0, 1, 2, 3)
    for r in rows["items"]:
        if r["category_level3_id"] == 0:
            assert r["category_level3_name"] == "UNKNOWN"
    assert any(r["category_level3_id"] == 0 for r in rows["items"])
    assert any(any(c.isascii() and c.isalpha() for c in r["brand_name"]) for r in rows["items"])


def test_synthetic_signal_is_learnable(small_world):
    """Cheap proxies of the signal the models need: query-title overlap drives clicks and grades."""
    items = {r["item_id"]: r for r in _json_rows(small_world["items"])}

    def overlap(q: str, t: str) -> float:
        return len(set(q) & set(t)) / len(set(q))

    clicks = collections.defaultdict(list)
    for r in _json_rows(small_world["rank"]):
        hi = overlap(r["query"], items[r["target_item_id"]]["item_title"]) >= 0.5
        clicks[hi].append(r["is_clicked"])
    ctr_hi, ctr_lo = np.mean(clicks[True]), np.mean(clicks[False])
    assert 0.02 < np.mean(clicks[True] + clicks[False]) < 0.5
    assert ctr_hi > 2 * ctr_lo
    rel = _json_rows(small_world["relevance"])
    ov = np.array([overlap(r["query"], r["item_title"]) for r in rel])
    score = np.array([r["score"] for r in rel])
    assert np.corrcoef(ov, score)[0, 1] > 0.5
    assert len(set(score.tolist())) == 4
    recall = _json_rows(small_world["recall"])
    purchases = sum(len(r["purchased_item_ids"]) for r in recall)
    assert 0 < purchases < sum(len(r["clicked_item_ids"]) for r in recall)


def test_synthetic_world_prepares(tmp_path, small_world):
    summary = prepare(small_world["users"].parent, tmp_path / "out", workers=1, progress=False,
                      verbose=False)
    n_rank = sum(1 for _ in open(small_world["rank"], "rb"))
    assert summary.kinds["rank"].total_rows == n_rank
    assert set(summary.kinds["rank"].rows) == {"train", "test"}
    assert all(ks.skipped == 0 for ks in summary.kinds.values())


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_bad_fraction"):
        prepare(_demo_dir(), tmp_path, max_bad_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="unknown KuaiSearch kind"):
        prepare(_demo_dir(), tmp_path, kinds=["clicks"], progress=False)
    with pytest.raises(FileNotFoundError, match="no KuaiSearch 'users' file"):
        prepare(tmp_path, tmp_path / "out", kinds=["users"], progress=False)


def test_prepare_replaces_previous_version(tmp_path):
    demo = _demo_dir()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(demo / "relevance.jsonl", src / "relevance.jsonl")
    prepare(src, tmp_path / "out", kinds=["relevance"], workers=1, progress=False, verbose=False)
    lines = _lines(src / "relevance.jsonl")[:50]
    (src / "relevance.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    prepare(src, tmp_path / "out", kinds=["relevance"], workers=1, progress=False, verbose=False)
    assert len(open_split(tmp_path / "out", "relevance")) == 50
