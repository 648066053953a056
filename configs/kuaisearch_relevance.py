"""KuaiSearch relevance (label = score == 3): a cross-encoder (``model.name=cross``) or a bi-encoder (``bi``).

    ecomax train --config configs/kuaisearch_relevance.py:tiny --workdir runs/ks_rel [--set model.name=bi]
    ecomax train --config configs/kuaisearch_relevance.py:lite --workdir W --set data.root=DIR

Arguments:
  ``tiny``: the cached synthetic KuaiSearch world of ``configs/kuaisearch_recall.py:tiny`` (same
    parameters, same cache folder and tokenizer), a 2-layer 64-wide encoder; CPU, well under a minute.
  ``lite``: KuaiSearch-Lite's ``relevance/train.jsonl`` under ``data.root`` (raw or prepared) at the
    paper's settings (official ``relevance/crossencoder/config.json``): BERT-base (768 wide, 12 layers,
    12 heads, vocab 21128 like bert-base-chinese), max length 512, batch 16, lr 2e-5 with 1% warm-up
    then linear decay, weight decay 1e-4, float32; random initialisation (no pretrained import here);
    the tokenizer as in ``configs/kuaisearch_recall.py:lite``.
    ``train.steps`` is a placeholder for 20 epochs of ``#train records / 16`` steps. The bi-encoder
    reads queries at ``data.query_len`` = 64 tokens and item texts at ``data.max_len``.
"""

import ml_collections

from configs.common import KUAISEARCH_SYNTHETIC, base_config, kuaisearch_text_model


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "lite"):
        raise KeyError(arg)
    tiny = arg == "tiny"
    c = base_config()
    c.task = "kuaisearch_relevance"

    c.model = kuaisearch_text_model(tiny, name="cross", max_positions=96)  # cross | bi
    c.model.pooling = "pooler"          # cross: BERT pooler over CLS; bi: try "mean"
    c.model.init_scale = 10.0           # bi: logit = scale * cos + bias
    c.model.init_bias = -5.0

    c.data.root = ""                    # empty: the synthetic world below
    c.data.synthetic = ml_collections.ConfigDict(KUAISEARCH_SYNTHETIC)
    c.data.tokenizer = ""               # a sentencepiece .model; empty: root/spm.model or trained once
    c.data.tokenizer_vocab_size = 2000 if tiny else 21128
    c.data.tokenizer_model_type = "char"   # when a tokenizer is trained here: char | unigram | bpe
    c.data.max_len = 96 if tiny else 512   # cross: the pair; bi: the item text
    c.data.query_len = 16 if tiny else 64  # bi only

    c.eval.split = "test"               # test | validation | train
    c.eval.batch_size = 256 if tiny else 64
    c.eval.max_examples = 0             # 0: all

    c.train.batch_size = 32 if tiny else 16
    c.train.steps = 300 if tiny else 100_000
    c.train.log_every = 50 if tiny else 100
    c.train.checkpoint_every = 300 if tiny else 5000
    c.optimizer.learning_rate = 1e-3 if tiny else 2e-5
    c.optimizer.warmup_steps = 30 if tiny else 1000   # lite: 1% of train.steps
    c.optimizer.schedule = "cosine" if tiny else "linear"
    c.optimizer.weight_decay = 0.01 if tiny else 1e-4
    return c
