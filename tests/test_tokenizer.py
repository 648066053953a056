"""SentencePiece tokenizer: in-memory training, fixed-length batch encoding, KuaiSearch corpora."""

from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import pytest

from data_pipelines.kuaisearch.synthetic import synthesize
from data_pipelines.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    iter_corpus,
    kuaisearch_corpus,
    tokenizer_main,
    train_sentencepiece,
)

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_tokenizer")

DEMO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "kuaisearch_demo"
SAMPLES = [
    "新款蓝牙耳机 wireless earbuds 防水 2024款",
    "加厚纯棉四件套",
    "GUARCI舞蹈鞋女式网面广场舞蹈",
    "emoji 😀 and ⚡ unseen",
    "",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tok_world")
    synthesize(out, num_users=30, num_items=600, num_sessions=400, seed=1)
    return out


@pytest.fixture(scope="module")
def tok(world, tmp_path_factory) -> Tokenizer:
    path = train_sentencepiece(kuaisearch_corpus(world), tmp_path_factory.mktemp("tok") / "spm.model",
                               vocab_size=900)
    return Tokenizer.load(path)


def test_special_ids_and_files(tok, tmp_path):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert 300 < tok.vocab_size <= 900
    path = train_sentencepiece(["一 二 三", "abc"] * 20, tmp_path / "sub" / "m.model", vocab_size=300)
    assert path.is_file() and path.with_suffix(".vocab").is_file()
    first = path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()[:4]
    assert [x.split("\t")[0] for x in first] == ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_learned_pieces_cover_frequent_words(tok, world):
    titles = [json.loads(x)["item_title"] for x in open(world / "items.jsonl", encoding="utf-8")]
    n_tokens = sum(len(tok.encode(t)) for t in titles[:200])
    n_chars = sum(len(t) for t in titles[:200])
    assert n_tokens < 0.8 * n_chars  # multi-character pieces were learned


def test_encode_batch_pads_truncates_and_masks(tok):
    texts = ["加厚纯棉四件套", "", "新款蓝牙耳机 wireless earbuds 防水 2024款 " * 5]
    ids, mask = tok.encode_batch(texts, max_len=12)
    assert ids.dtype == np.int32 and ids.shape == (3, 12)
    assert mask.dtype == np.bool_ and mask.shape == (3, 12)
    n0 = len(tok.encode(texts[0]))
    assert mask[0].sum() == n0 and (ids[0, :n0] == tok.encode(texts[0])).all()
    assert (ids[0, n0:] == PAD_ID).all() and not mask[0, n0:].any()
    assert not mask[1].any() and (ids[1] == PAD_ID).all()
    assert mask[2].all() and (ids[2] == tok.encode(texts[2])[:12]).all()
    ids2, mask2 = tok.encode_batch(texts, max_len=12, add_bos=True, add_eos=True)
    assert ids2[0, 0] == BOS_ID and ids2[0, n0 + 1] == EOS_ID and mask2[0].sum() == n0 + 2
    assert ids2[2, 0] == BOS_ID and ids2[2, -1] == EOS_ID
    assert (ids2[2, 1:11] == tok.encode(texts[2])[:10]).all()
    assert (ids2[1, :2] == [BOS_ID, EOS_ID]).all() and mask2[1].sum() == 2
    empty_ids, empty_mask = tok.encode_batch([], max_len=4)
    assert empty_ids.shape == (0, 4) and empty_mask.shape == (0, 4)
    with pytest.raises(ValueError):
        tok.encode_batch(["x"], max_len=0)


def test_pickle_and_bytes(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    assert Tokenizer(tok.model_proto).vocab_size == tok.vocab_size


def test_training_is_deterministic(world, tmp_path):
    texts = list(kuaisearch_corpus(world))
    a = train_sentencepiece(texts, tmp_path / "a.model", vocab_size=700, num_threads=1)
    b = train_sentencepiece(texts, tmp_path / "b.model", vocab_size=700, num_threads=1)
    assert a.read_bytes() == b.read_bytes()


def test_kuaisearch_corpus_fields():
    if not DEMO.is_dir():
        pytest.skip(f"KuaiSearch demo files not found at {DEMO}")
    texts = list(kuaisearch_corpus(DEMO))
    assert len(texts) == 800  # item titles, recall queries, relevance queries and titles
    first_title = json.loads(open(DEMO / "items.jsonl", encoding="utf-8").readline())["item_title"]
    assert texts[0] == first_title
    brands = list(kuaisearch_corpus(DEMO, "items.brand_name,items.seller_name"))
    assert len(brands) == 400
    with pytest.raises(ValueError, match="not a text field"):
        list(kuaisearch_corpus(DEMO, ["items.brand_id"]))
    with pytest.raises(ValueError, match="kind.field"):
        list(kuaisearch_corpus(DEMO, ["item_title"]))


def test_iter_corpus_mixes_sources(tmp_path, world):
    (tmp_path / "extra.txt").write_text("第一行\n\n第二行\n", encoding="utf-8")
    texts = list(iter_corpus([tmp_path / "extra.txt", world / "relevance.jsonl"]))
    assert texts[:2] == ["第一行", "第二行"]
    assert len(texts) == 2 + 2 * sum(1 for _ in open(world / "relevance.jsonl", "rb"))
    with pytest.raises(FileNotFoundError):
        list(iter_corpus([tmp_path / "missing.txt"]))
    (tmp_path / "bad.jsonl").write_text('{"query": "a"}\n{"query": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'query' is int"):
        list(iter_corpus([tmp_path / "bad.jsonl"]))


def test_tokenizer_main(world, tmp_path, capsys):
    out = tokenizer_main([str(world)], tmp_path / "spm.model", 800, ["items.item_title", "recall.query"])
    assert out == tmp_path / "spm.model"
    tok = Tokenizer.load(out)
    assert tok.decode(tok.encode("加厚纯棉四件套")) == "加厚纯棉四件套"
    assert "vocab" in capsys.readouterr().err
