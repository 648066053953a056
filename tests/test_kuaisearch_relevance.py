"""KuaiSearch relevance: split and label rules on the real demo, pair encoding, a real tiny run against the
majority class, lite compiles."""

from __future__ import annotations

import json
import os
import random

import jax
import numpy as np
import pytest

from conftest import load_test_config
from data_pipelines.kuaisearch import examples as ex
from trainers.evaluators.metrics import majority_metrics
from trainers.loop import Trainer
from trainers.tasks import get_task


def test_split_and_label_rules_on_the_real_demo(kuaisearch_demo_dir):
    raw = [json.loads(line) for line in (kuaisearch_demo_dir / "relevance.jsonl").read_text("utf-8").splitlines()
           if line.strip()]
    assert all("label" not in r for r in raw)  # why the rule is applied explicitly
    splits = ex.relevance_splits(ex.read_rows(kuaisearch_demo_dir, "relevance"))

    # The official relevance/data/process.py, re-stated: skip empty, every 10th kept record is test,
    # random.seed(42) + random.shuffle of the rest, the first int(1%) are validation.
    kept = []
    for r in raw:
        parts = [str(r[k]).strip() for k in ("item_title", "brand", "seller_name", "attr_value")]
        text = " ".join(p for i, p in enumerate(parts) if p and not (i == 1 and p == "无品牌"))
        if r["query"].strip() and text:
            kept.append((r["query"].strip(), text, int(r["score"] == 3), r["score"]))
    test = [x for i, x in enumerate(kept) if i % 10 == 0]
    rest = [x for i, x in enumerate(kept) if i % 10 != 0]
    random.seed(42)
    random.shuffle(rest)
    n_valid = int(len(rest) * 0.01)
    expected = {"test": test, "validation": rest[:n_valid], "train": rest[n_valid:]}

    as_tuples = {k: [(e.query, e.text, e.label, e.score) for e in v] for k, v in splits.items()}
    assert as_tuples == expected
    assert (len(splits["test"]), len(splits["validation"]), len(splits["train"])) == (20, 1, 179)
    for e in (e for v in splits.values() for e in v):
        assert e.label == (1 if e.score == 3 else 0)
    assert {e.score for v in splits.values() for e in v} == {0, 1, 2, 3}
    assert 0 < sum(e.label for v in splits.values() for e in v) < len(kept)


def test_prepared_and_raw_folders_give_the_same_splits(kuaisearch_demo_dir, tmp_path):
    from data_pipelines.kuaisearch.prepare import prepare

    prepare(kuaisearch_demo_dir, tmp_path, workers=1, kinds=["relevance"], progress=False, verbose=False)
    assert ex.is_prepared(tmp_path, "relevance")
    assert ex.relevance_splits(ex.read_rows(tmp_path, "relevance")) == \
        ex.relevance_splits(ex.read_rows(kuaisearch_demo_dir, "relevance"))


class _CharTokenizer:
    """One id per character (ids from 10): enough to check pair layout and truncation."""

    def encode(self, text):
        return [10 + (ord(c) % 50) for c in text]


def test_pair_encoding_segments_and_longest_first_truncation():
    ids, mask, types = ex.encode_pairs(_CharTokenizer(), ["ab", "abcdefgh"], ["xyz", "stuvwxyz"], 10)
    # <s> a b </s> x y z </s> pad pad
    assert ids[0, :8].tolist()[0] == 2 and ids[0, 3] == 3 and ids[0, 7] == 3 and mask[0].sum() == 8
    assert types[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    # 16 tokens into a budget of 7: longest-first keeps 4 + 3
    assert mask[1].all() and types[1].tolist() == [0] * 6 + [1] * 4
    assert ex._pair_lengths(3, 20, 7) == (3, 4) and ex._pair_lengths(20, 2, 7) == (5, 2)


def test_majority_baseline_metrics():
    labels = np.array([0, 0, 0, 1])
    m = majority_metrics(labels, 0)
    assert m["accuracy"] == 0.75 and m["roc_auc"] == 0.5 and m["pr_auc"] == pytest.approx(0.25)
    assert m["macro_f1"] == pytest.approx((2 * 3 / 7 + 0) / 2)


def test_tiny_bi_encoder_beats_the_majority_class(tmp_path):
    config = load_test_config("configs/kuaisearch_relevance.py:tiny", "model.name=bi", "model.pooling=mean",
                              "train.steps=150", "train.log_every=50", "train.checkpoint_every=1000")
    result = Trainer.create(config, tmp_path, jax.devices()[:2]).run()
    m = result.eval_metrics
    assert m["num_records"] == 1200
    assert m["accuracy"] > m["majority/accuracy"] + 0.15, m
    assert m["macro_f1"] > m["majority/macro_f1"] + 0.3, m
    assert m["roc_auc"] > 0.75 and m["pr_auc"] > m["majority/pr_auc"] + 0.2, m


def test_cross_encoder_batches_match_its_spec():
    task = get_task(load_test_config("configs/kuaisearch_relevance.py:tiny"))
    source, transform = task.train_source()
    example = transform(source[0], np.random.default_rng(0))
    spec = task.batch_spec(2)
    assert {k: (2, *np.shape(v)) for k, v in example.items()} == {k: v.shape for k, v in spec.items()}
    assert example["token_type_ids"].max() == 1 and example["label"] in (0.0, 1.0)


FULL = os.environ.get("ECOMAX_FULL_COMPILE") == "1"


@pytest.mark.parametrize("name", ["cross", "bi"])
def test_lite_config_lowers_and_compiles_at_paper_shapes(tmp_path, name):
    """The paper's shapes (BERT-base, length 512, batch 16) on 8 fake devices with no data present.

    The cross-encoder (the lite default) lowers and compiles (~30 s on 2 busy cores). The bi-encoder
    lowers; its compile (two encoder passes, ~55 s) runs with
    ``ECOMAX_FULL_COMPILE=1 pytest tests/test_kuaisearch_relevance.py -k lite``.
    """
    config = load_test_config("configs/kuaisearch_relevance.py:lite", f"data.root={tmp_path}", f"model.name={name}")
    trainer = Trainer.create(config, tmp_path)
    spec = trainer.task.batch_spec(config.train.batch_size)
    assert spec["ids" if name == "cross" else "item_ids"].shape == (16, 512)
    assert 101e6 < trainer.spec.num_params < 103e6  # BERT-base, vocabulary 21128
    lowered = trainer.lower()
    if name == "cross" or FULL:
        assert lowered.compile() is not None
