"""ECom-RF-IMMR data layer: schema round trip, bad records, synthetic determinism, grain pipeline."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.ecom_rf_immr import builder, pipeline, schema, synthetic
from data_pipelines.ecom_rf_immr.builder import BuildError, build, open_split
from data_pipelines.ecom_rf_immr.schema import ManifestError

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_ecom_rf_immr")

IMAGE_SIZE = 48


# ----------------------------------------------------------------------------- fixtures


def _lines(path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return synthetic.synthesize(out, items=40, queries_per_item=2, seed=0, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    summary = build(synth, out, workers=2, shards=3, progress=False)
    return out, summary


class _SpmTokenizer:
    """The ``encode_batch`` interface over a tiny in-memory sentencepiece model."""

    def __init__(self, texts):
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=160,
            hard_vocab_limit=False, character_coverage=1.0, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
            num_threads=1, minloglevel=2)
        self.sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def encode_batch(self, texts, max_len):
        ids = np.zeros((len(texts), max_len), np.int32)
        for i, pieces in enumerate(self.sp.encode(list(texts))):
            pieces = pieces[:max_len]
            ids[i, :len(pieces)] = pieces
        return ids, (ids != 0).astype(np.int32)


@pytest.fixture(scope="module")
def tokenizer(synth):
    texts = []
    for line in _lines(synth):
        f = schema.parse_manifest_line(line)
        texts.append(schema.item_text(f["title"], f["category"], f["attribute_keys"], f["attribute_values"]))
    return _SpmTokenizer(sorted(set(texts)))


def _expected_records(manifest: Path, split: str) -> list[schema.Record]:
    out = []
    for line in _lines(manifest):
        fields = schema.parse_manifest_line(line)
        if fields and fields["split"] == split:
            out.append(schema.load_record(fields, str(manifest.parent)))
    return out


def _assert_record_equal(got: schema.Record, want: schema.Record) -> None:
    assert set(got) == set(want)
    for key in want:
        if key == "target_box":
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == np.float32
        else:
            assert got[key] == want[key], key
            assert type(got[key]) is type(want[key]), key


# ----------------------------------------------------------------------------- schema round trip


def test_round_trip_every_field(synth, built):
    out, summary = built
    assert summary.num_skipped == 0 and summary.num_records == len(_lines(synth))
    assert set(summary.records) == {"train", "test"}
    for split in ("train", "test"):
        src = open_split(out, split)
        want = _expected_records(synth, split)
        assert len(src) == len(want) == summary.records[split]
        for i, rec in enumerate(want):  # build keeps manifest order within a split
            _assert_record_equal(src[i], rec)
        groups = src.mosaic_group_ids()
        ids = [r["mosaic_id"] for r in want]
        for i in range(len(ids)):
            for j in range(len(ids)):
                assert (groups[i] == groups[j] and groups[i] >= 0) == (ids[i] != "" and ids[i] == ids[j])


def test_tfds_readers_see_the_build(built):
    import tensorflow_datasets as tfds

    out, summary = built
    ds_dir = Path(summary.dataset_dir)
    assert ds_dir == out / "ecom_rf_immr" / "1.0.0"
    b = tfds.builder_from_directory(os.fspath(ds_dir))
    assert {k: v.num_examples for k, v in b.info.splits.items()} == summary.records
    src = tfds.data_source("ecom_rf_immr", data_dir=os.fspath(out), split="test")
    ex = src[0]  # decoded by TFDS itself
    assert ex["query_image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and ex["query_image"].dtype == np.uint8
    assert len(src) == summary.records["test"]


def test_generator_based_builder_matches_build(synth, built, tmp_path):
    out, _ = built
    b = builder.EcomRfImmr(manifest=os.fspath(synth), data_dir=os.fspath(tmp_path), file_format="array_record")
    b.download_and_prepare()
    for split in ("train", "test"):
        mine = open_split(out, split)
        theirs = open_split(tmp_path, split)  # record order is hashed by the TFDS writer
        assert len(theirs) == len(mine)
        key = lambda r: (r["query_id"], r["layout"])  # noqa: E731
        by_key = {key(mine[i]): mine[i] for i in range(len(mine))}
        for i in range(len(theirs)):
            r = theirs[i]
            _assert_record_equal(r, by_key[key(r)])


# ----------------------------------------------------------------------------- bad records


def _png(path: Path, w=20, h=16, colour=(200, 40, 40)) -> str:
    Image.new("RGB", (w, h), colour).save(path, format="PNG")
    return path.name


def _mini_manifest(tmp_path: Path, n: int = 10) -> tuple[Path, list[dict]]:
    lines = []
    for i in range(n):
        q = _png(tmp_path / f"q{i}.png", colour=(i * 20, 10, 10))
        it = _png(tmp_path / f"i{i}.png", w=30, h=24)
        lines.append({"query_image": q, "item_id": f"sku{i}", "item_images": [it], "title": f"商品 item {i}",
                      "category": "箱包 bags > 托特包 tote", "attributes": {"color": "红色 red"},
                      "split": "test" if i % 3 == 0 else "train", "target_box": [2, 3, 28, 20]})
    return tmp_path / "manifest.jsonl", lines


def _write(path: Path, lines: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write((obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n")
    return path


def _corrupt(tmp_path: Path, lines: list, idx: int, kind: str) -> None:
    if kind == "missing_image":
        lines[idx]["query_image"] = "nope/missing.png"
    elif kind == "undecodable_image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        lines[idx]["item_images"] = ["bad.png"]
    elif kind == "truncated_jpeg":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="JPEG")
        (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        lines[idx]["query_image"] = "cut.jpg"
    elif kind == "missing_field":
        del lines[idx]["title"]
    elif kind == "box_outside":
        lines[idx]["target_box"] = [2, 3, 31, 20]  # the item image is 30 px wide
    elif kind == "bad_json":
        lines[idx] = '{"query_image": "q0.png", '
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind, words", [
    ("missing_image", "not found"),
    ("undecodable_image", "cannot be decoded"),
    ("truncated_jpeg", "cannot be decoded"),
    ("missing_field", "missing field 'title'"),
    ("box_outside", "outside item_images[0] (30x24"),
    ("bad_json", "invalid JSON"),
])
def test_bad_record_names_manifest_line(tmp_path, kind, words):
    manifest, lines = _mini_manifest(tmp_path)
    _corrupt(tmp_path, lines, 6, kind)
    _write(manifest, lines)
    with pytest.raises(ManifestError) as e:
        build(manifest, tmp_path / "out", workers=0, progress=False)
    assert str(e.value).startswith(f"{manifest}:7: ") and words in str(e.value)
    assert e.value.line == 7
    assert not (tmp_path / "out" / "ecom_rf_immr" / "1.0.0").exists()
    assert not [p for p in (tmp_path / "out" / "ecom_rf_immr").iterdir()]  # no half-built leftovers


def test_bad_record_error_from_a_worker_process(tmp_path):
    manifest, lines = _mini_manifest(tmp_path, n=12)
    _corrupt(tmp_path, lines, 10, "missing_image")
    _write(manifest, lines)
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:11: query_image 'nope/missing.png' not found"):
        build(manifest, tmp_path / "out", workers=2, shards=4, progress=False)


def test_skip_cap(tmp_path):
    manifest, lines = _mini_manifest(tmp_path, n=10)
    _corrupt(tmp_path, lines, 3, "missing_image")
    _write(manifest, lines)
    summary = build(manifest, tmp_path / "ok", workers=0, max_bad_fraction=0.2, progress=False)
    assert summary.num_skipped == 1 and summary.num_records == 9 and summary.num_lines == 10
    assert summary.skipped[0].line == 4 and "not found" in summary.skipped[0].reason
    assert "manifest.jsonl:4:" in str(summary)
    log = [json.loads(x) for x in _lines(summary.skipped_log)]
    assert [x["line"] for x in log] == [4]
    assert sum(len(open_split(tmp_path / "ok", s)) for s in summary.records) == 9

    _corrupt(tmp_path, lines, 8, "bad_json")  # unparsable lines count as records too: 2 of 10
    _write(manifest, lines)
    assert build(manifest, tmp_path / "ok2", workers=0, max_bad_fraction=0.2, progress=False).num_skipped == 2

    _corrupt(tmp_path, lines, 9, "box_outside")
    _write(manifest, lines)
    with pytest.raises(BuildError, match=r"manifest\.jsonl:4: .*not found"):
        build(manifest, tmp_path / "over", workers=0, max_bad_fraction=0.15, progress=False)
    assert not (tmp_path / "over" / "ecom_rf_immr" / "1.0.0").exists()


def test_manifest_forms_and_refusals(tmp_path):
    manifest, lines = _mini_manifest(tmp_path, n=3)
    lines[0].pop("attributes")
    lines[0].update(attribute_keys=["color", "size"], attribute_values=["red", "L"], item_images="i0.png",
                    category=["a", "b"], item_index=7, x_note="ignored")
    lines[1]["attributes"] = ["color:red:dark", "size: L"]
    lines[2]["target_box"] = None
    _write(manifest, lines + ["   "])
    build(manifest, tmp_path / "out", workers=0, progress=False)
    recs = {r["item_id"]: r for s in ("train", "test") for r in open_split(tmp_path / "out", s)}
    assert recs["sku0"]["attribute_keys"] == ["color", "size"] and recs["sku0"]["item_index"] == 7
    assert recs["sku0"]["category"] == ["a", "b"]
    assert recs["sku1"]["attribute_values"] == ["red:dark", "L"]
    assert recs["sku1"]["category"] == ["箱包 bags", "托特包 tote"]
    assert recs["sku1"]["item_index"] == schema.stable_item_index("sku1")
    assert not recs["sku2"]["has_box"] and recs["sku2"]["layout"] == "normal"
    with pytest.raises(BuildError, match="already exists"):
        build(manifest, tmp_path / "out", workers=0, progress=False)
    with pytest.raises(schema.RecordError, match=r"unknown field\(s\) \['item_image'\]"):
        schema.parse_manifest_object({**lines[1], "item_image": "x.png"})


# ----------------------------------------------------------------------------- synthetic generator


def _tree_digest(root: Path) -> dict[str, str]:
    return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(tmp_path):
    kw = dict(items=12, queries_per_item=2, image_size=32)
    a = _tree_digest(synthetic.synthesize(tmp_path / "a", seed=3, **kw).parent)
    b = _tree_digest(synthetic.synthesize(tmp_path / "b", seed=3, **kw).parent)
    c = _tree_digest(synthetic.synthesize(tmp_path / "c", seed=4, **kw).parent)
    assert a == b
    # Another process with another string-hash seed writes the same bytes.
    code = ("import sys; from data_pipelines.ecom_rf_immr import synthetic; "
            "synthetic.synthesize(sys.argv[1], seed=3, items=12, queries_per_item=2, image_size=32)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, os.fspath(tmp_path / "d")], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1])
    assert _tree_digest(tmp_path / "d") == a
    assert a["manifest.jsonl"] != c["manifest.jsonl"]
    assert set(a) & set(c) and all(a[k] != c[k] for k in set(a) & set(c) if k.endswith(".jpg"))


def test_synthetic_content(synth):
    recs = [json.loads(x) for x in _lines(synth)]
    layouts = {(r["split"], r["layout"]) for r in recs}
    assert {("train", "normal"), ("train", "mosaic"), ("test", "normal"), ("test", "mosaic")} <= layouts
    train_q = {r["query_id"] for r in recs if r["split"] == "train"}
    test_q = {r["query_id"] for r in recs if r["split"] == "test"}
    assert train_q and test_q and not train_q & test_q
    by_mosaic: dict[str, list[dict]] = {}
    for r in recs:
        if r["layout"] == "mosaic" and r["split"] == "train":
            by_mosaic.setdefault(r["mosaic_id"], []).append(r)
    assert any(len(v) >= 2 for v in by_mosaic.values())
    for members in by_mosaic.values():  # cross-category targets on one canvas
        cats = [m["category"][1] for m in members]
        assert len(set(cats)) == len(cats) and len({m["item_images"][0] for m in members}) == 1
    titles = {r["item_id"]: r["title"] for r in recs}
    assert len(set(titles.values())) == len(titles)  # distinct products
    # Fine-grained: some pairs of items differ in exactly one attribute.
    attrs = {r["item_id"]: dict(a.split(":", 1) for a in r["attributes"] if not a.startswith("size:")) for r in recs}
    ids = sorted(attrs)
    one_off = sum(1 for i in ids for j in ids if i < j and attrs[i].keys() == attrs[j].keys()
                  and sum(attrs[i][k] != attrs[j][k] for k in attrs[i]) == 1)
    assert one_off >= 5
    assert "红色" in "".join(titles.values()) or "蓝色" in "".join(titles.values())


# ----------------------------------------------------------------------------- pipeline


EXPECTED = {
    "query_image": ((IMAGE_SIZE // 2, IMAGE_SIZE // 2, 3), np.float32),
    "item_image": ((IMAGE_SIZE // 2, IMAGE_SIZE // 2, 3), np.float32),
    "item_ids": ((24,), np.int32),
    "item_mask": ((24,), np.bool_),
    "item_index": ((), np.int64),
    "target_box": ((4,), np.float32),
    "has_box": ((), np.bool_),
    "is_mosaic": ((), np.bool_),
}


def _pipe(src, tok, *, seed, train, **kw):
    return pipeline.make_pipeline(src, batch_size=4, image_size=IMAGE_SIZE // 2, tokenizer=tok, max_text_len=24,
                                  train=train, seed=seed, **kw)


def test_pipeline_batches_shapes_and_dtypes(built, tokenizer):
    out, _ = built
    src = open_split(out, "train")
    ds = _pipe(src, tokenizer, seed=0, train=True,
               augment=pipeline.AugmentConfig(item_crop_scale=(0.7, 1.0)))
    assert len(ds) == len(src) // 4
    for b in (ds[0], ds[1]):
        assert set(b) == set(EXPECTED)
        for k, (shape, dtype) in EXPECTED.items():
            assert b[k].shape == (4, *shape) and b[k].dtype == dtype, k
        assert np.isfinite(b["query_image"]).all()
        assert (b["target_box"] >= 0).all() and (b["target_box"] <= 1).all()
        box = b["target_box"][b["has_box"]]
        assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
        assert b["item_mask"].any(axis=1).all()
        assert (b["item_ids"][~b["item_mask"]] == 0).all()

    test = open_split(out, "test")
    ev = _pipe(test, tokenizer, seed=0, train=False)
    assert len(ev) == -(-len(test) // 4)  # keeps the short last batch
    first = ev[0]
    t = pipeline.make_transform(image_size=IMAGE_SIZE // 2, tokenizer=tokenizer, max_text_len=24, train=False)
    ref = pipeline.stack_examples([t(test[i]) for i in range(4)])
    for k in EXPECTED:
        np.testing.assert_array_equal(first[k], ref[k])
    assert first["is_mosaic"].tolist() == [test[i]["layout"] == "mosaic" for i in range(4)]
    # Eval target box: the record's pixel box over the image size.
    rec = test[0]
    np.testing.assert_allclose(first["target_box"][0], rec["target_box"] / IMAGE_SIZE, rtol=1e-6)


def test_augmentation_reproducible_from_seed(built, tokenizer):
    out, _ = built
    src = open_split(out, "train")
    a = _pipe(src, tokenizer, seed=7, train=True)
    b = _pipe(src, tokenizer, seed=7, train=True)
    c = _pipe(src, tokenizer, seed=8, train=True)
    for k in EXPECTED:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert not np.array_equal(a[1]["query_image"], c[1]["query_image"])
    # Same record order, different augmentation: the rng alone changes the pixels.
    na = _pipe(src, tokenizer, seed=7, train=True, shuffle=False)
    nc = _pipe(src, tokenizer, seed=8, train=True, shuffle=False)
    np.testing.assert_array_equal(na[0]["item_index"], nc[0]["item_index"])
    assert not np.array_equal(na[0]["query_image"], nc[0]["query_image"])


def test_grouped_permutation_keeps_groups_in_one_block():
    rng = np.random.default_rng(0)
    groups = []
    for g in range(40):
        groups += [g] * int(rng.integers(2, 6))
    ids = np.asarray(groups + [-1] * 300, np.int64)[rng.permutation(len(groups) + 300)]
    perms = []
    for epoch in range(2):
        perm = pipeline.grouped_permutation(ids, block_size=8, seed=1, epoch=epoch)
        assert sorted(perm.tolist()) == list(range(len(ids)))
        block_of = np.empty(len(ids), np.int64)
        block_of[perm] = np.arange(len(ids)) // 8
        for g in range(40):
            assert len(set(block_of[ids == g].tolist())) == 1, g
        perms.append(perm)
    assert not np.array_equal(perms[0], perms[1])
    np.testing.assert_array_equal(perms[0], pipeline.grouped_permutation(ids, block_size=8, seed=1, epoch=0))


def test_mosaic_grouping_in_the_pipeline(built, tokenizer):
    out, _ = built
    src = open_split(out, "train")
    groups = src.mosaic_group_ids()
    assert (groups >= 0).sum() >= 4 and len(set(groups[groups >= 0].tolist())) >= 2
    ds = _pipe(src, tokenizer, seed=3, train=True, mosaic_grouping=True, num_epochs=2)
    order = pipeline.MosaicGroupedOrder(groups, block_size=4, seed=3)
    n, m = len(src), len(order)
    assert m == n - n % 4 and len(ds) == 2 * m // 4
    for epoch in range(2):
        full = order.epoch_order(epoch)
        assert sorted(full.tolist()) == list(range(n))
        rec = np.asarray([order(p) for p in range(epoch * m, epoch * m + m)])
        np.testing.assert_array_equal(rec, full[:m])
        batch_of = np.full(n, -1, np.int64)
        batch_of[rec] = np.arange(m) // 4
        for g in set(groups[groups >= 0].tolist()):
            if (groups == g).sum() <= 4:
                assert len(set(batch_of[groups == g].tolist())) == 1
        k = int(batch_of[np.nonzero(groups >= 0)[0][0]])  # a batch holding a mosaic
        batch = ds[epoch * (m // 4) + k]
        want = [src[int(r)]["item_index"] for r in rec[4 * k:4 * k + 4]]
        assert batch["item_index"].tolist() == want
        assert batch["is_mosaic"].sum() >= 2


def test_transform_composes_with_the_shared_loader(built, tokenizer):
    loader = pytest.importorskip("data_pipelines.loader")
    out, _ = built
    src = open_split(out, "train")
    t = pipeline.make_transform(image_size=16, tokenizer=tokenizer, max_text_len=8, train=True)
    grouped = pipeline.MosaicGroupedSource(src, block_size=4, seed=0, num_epochs=1)
    it = loader.process_batches(grouped, global_batch_size=4, seed=0, transform=t, shuffle=False, num_epochs=1,
                                read_threads=1, prefetch=2)
    b = next(iter(it))
    assert b["query_image"].shape == (4, 16, 16, 3) and b["item_ids"].shape == (4, 8)
    assert b["item_index"].tolist() == [src[grouped.record_index(p)]["item_index"] for p in range(4)]


def test_pipeline_with_the_project_tokenizer(built, tmp_path):
    tok_mod = pytest.importorskip("data_pipelines.tokenizer")
    out, _ = built
    src = open_split(out, "test")
    texts = [schema.item_text(r["title"], r["category"], r["attribute_keys"], r["attribute_values"]) for r in src]
    tok = tok_mod.Tokenizer(tok_mod.train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=400))
    b = pipeline.make_pipeline(src, batch_size=2, image_size=16, tokenizer=tok, max_text_len=12, train=False,
                               seed=0)[0]
    assert b["item_ids"].shape == (2, 12) and b["item_ids"].dtype == np.int32 and b["item_mask"].dtype == np.bool_
    assert b["item_mask"].all()  # synthetic item texts are longer than 12 pieces


# ----------------------------------------------------------------------------- fast decode, device photometric


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))  # smooth, photo-like
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,min_size,factor", [(48, 48, None, 1), (256, 256, (224, 224), 1),
                                                 (801, 611, (289, 289), 2), (640, 480, (100, 50), 4),
                                                 (90, 300, (10, 30), 8)])
def test_jpeg_decode_equals_pillow_at_the_same_scale(w, h, min_size, factor):
    data = _jpeg(w, h)
    got, orig = pipeline.decode_rgb(data, min_size)
    im = Image.open(io.BytesIO(data))
    if min_size is not None:
        im.draft("RGB", min_size)
    want = np.asarray(im.convert("RGB"))
    assert orig == (w, h) and got.dtype == np.uint8
    assert got.shape == want.shape == (-(-h // factor), -(-w // factor), 3)  # the DCT reduction happened
    np.testing.assert_array_equal(got, want)  # simplejpeg at Pillow's DCT scale: the same pixels


def test_png_decodes_through_pillow():
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    got, orig = pipeline.decode_rgb(buf.getvalue(), (10, 10))
    assert orig == (30, 20)
    np.testing.assert_array_equal(got, img)


def test_photometric_by_hand():
    img = np.array([[[255, 0, 51], [102, 204, 0]]], np.uint8)  # [1, 2, 3]
    b, c, s = 1.1, 0.8, 1.2
    x = img / 255.0 * b
    x = (x - x.mean()) * c + x.mean()
    g = x.mean(axis=2, keepdims=True)
    x = np.clip((x - g) * s + g, 0, 1)
    want = (x - np.array(pipeline.IMAGENET_MEAN)) / np.array(pipeline.IMAGENET_STD)
    got = pipeline.photometric(img, np.array([b, c, s], np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(pipeline.photometric(img, None),
                               (img / 255.0 - np.array(pipeline.IMAGENET_MEAN)) / np.array(pipeline.IMAGENET_STD),
                               atol=1e-6)


def test_device_photometric_gives_the_host_pixels(built, tokenizer):
    import jax.numpy as jnp

    out, _ = built
    src = open_split(out, "train")
    kw = dict(image_size=IMAGE_SIZE // 2, tokenizer=tokenizer, max_text_len=24, train=True,
              augment=pipeline.AugmentConfig(item_crop_scale=(0.7, 1.0)))
    host = pipeline.make_transform(**kw)
    device = pipeline.make_transform(**kw, photometric="device")
    for i in range(6):
        a = host(src[i], np.random.default_rng(i))
        d = device(src[i], np.random.default_rng(i))
        assert d["query_image"].dtype == np.uint8 and d["query_jitter"].shape == (3,)
        assert set(d) == set(a) | {"query_jitter", "item_jitter"}
        for k in ("query", "item"):
            on_device = pipeline.photometric(jnp.asarray(d[f"{k}_image"])[None], jnp.asarray(d[f"{k}_jitter"])[None],
                                             xp=jnp)[0]
            np.testing.assert_allclose(np.asarray(on_device), a[f"{k}_image"], atol=2e-6)
        for k in ("item_ids", "item_mask", "target_box", "has_box", "item_index"):
            np.testing.assert_array_equal(a[k], d[k])
    evaluation = pipeline.make_transform(**{**kw, "train": False}, photometric="device")(src[0], None)
    np.testing.assert_array_equal(evaluation["query_jitter"], np.ones(3, np.float32))


def test_device_pipeline_is_the_same_across_process_counts(built, tokenizer):
    from data_pipelines.loader import process_batches

    out, _ = built
    src = open_split(out, "train")
    t = pipeline.make_transform(image_size=16, tokenizer=tokenizer, max_text_len=8, train=True, photometric="device")

    def batches(p, count):
        it = iter(process_batches(src, global_batch_size=4, seed=3, transform=t, process_index=p,
                                  process_count=count, read_threads=2, prefetch=2))
        return [next(it) for _ in range(3)]

    one, halves = batches(0, 1), [batches(p, 2) for p in range(2)]
    for k in range(3):
        for key in ("query_image", "query_jitter", "item_image", "item_index"):
            np.testing.assert_array_equal(one[k][key], np.concatenate([halves[0][k][key], halves[1][k][key]]))


def test_a_stored_image_that_does_not_decode_names_its_record(built, tokenizer):
    out, _ = built
    record = dict(open_split(out, "train")[0])
    record["query_image"] = b"\xff\xd8\xff" + b"\x00" * 64  # a JPEG header and nothing after it
    t = pipeline.make_transform(image_size=16, tokenizer=tokenizer, max_text_len=8, train=False)
    with pytest.raises(pipeline.RecordDecodeError, match=rf"query_id='{record['query_id']}'.*query_image"):
        t(record, None)


def test_text_tokens_are_cached_per_text(built, tokenizer):
    out, _ = built
    record = open_split(out, "train")[0]
    t = pipeline.make_transform(image_size=16, tokenizer=tokenizer, max_text_len=8, train=False)
    a, b = t(record, None), t(record, None)
    assert a["item_ids"] is b["item_ids"] and not a["item_ids"].flags.writeable
    assert len(t._texts) == 1
    assert set(t.__getstate__()) == {"config", "tokenizer"}  # worker processes get no caches or clocks


def test_synthetic_items_are_jpeg_by_default_png_on_request(synth, tmp_path):
    recs = [json.loads(x) for x in _lines(synth)]
    paths = {p for r in recs for p in r["item_images"]}
    assert paths and all(p.endswith(".jpg") for p in paths)
    assert Image.open(synth.parent / next(iter(paths))).format == "JPEG"
    png = synthetic.synthesize(tmp_path / "png", items=4, queries_per_item=1, seed=0, image_size=32,
                               image_format="PNG")
    png_paths = {p for x in _lines(png) for p in json.loads(x)["item_images"]}
    assert all(p.endswith(".png") for p in png_paths)
    with pytest.raises(ValueError, match="image_format"):
        synthetic.synthesize(tmp_path / "bad", items=2, image_format="WEBP")


def test_build_image_size_reencodes_and_scales_boxes(synth, built, tmp_path):
    out, _ = built
    small = IMAGE_SIZE // 2
    summary = build(synth, tmp_path / "small", workers=1, progress=False, image_size=small)
    assert summary.image_size == small
    assert json.loads((Path(summary.dataset_dir) / "build_summary.json").read_text())["image_size"] == small
    full, shrunk = open_split(out, "train"), open_split(tmp_path / "small", "train")
    assert len(full) == len(shrunk)
    for a, b in zip(full, shrunk):
        assert a["query_id"] == b["query_id"]
        for data in (b["query_image"], *b["item_images"]):
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG" and min(im.size) == small
        if a["has_box"]:
            np.testing.assert_allclose(b["target_box"], a["target_box"] * small / IMAGE_SIZE, rtol=1e-6)
