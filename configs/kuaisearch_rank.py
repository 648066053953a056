"""KuaiSearch ranking stage: DNN, Wide&Deep, DCN, DCNv2, DIN (``--set model.name=dnn|wide_deep|dcn|dcnv2|din``).

    ecomax train --config configs/kuaisearch_rank.py:tiny --workdir runs/rank_tiny --set model.name=din
    ecomax train --config configs/kuaisearch_rank.py:lite --workdir runs/rank_lite --set data.root=/data/KuaiSearch

Arguments:
- ``tiny``: a synthetic KuaiSearch world (600 users, 3000 items, 4000 sessions, ~72k rank rows, the last
  10% of sessions as test) generated, prepared and cached on first use, featurized once into arrays;
  synthesis + features + training + evaluation take well under a minute on an idle CPU.
- ``onemall``: ``tiny`` (DIN) on the synthetic world of ``configs/onemall.py`` (400 users, 16,000 sessions): the
  frozen ranker whose click probability is OneMall's RL reward (``configs/onemall.py:tiny_rl``).
- ``lite``: the released KuaiSearch-Lite layout under ``data.root`` (~17.8M rank rows, 100k users, 6.6M
  items) at the paper's hyper-parameters: batch 4096, Adam(W) learning rate 1e-3, weight decay 1e-5.
  Id buckets fit 6.6M items (2^23) and 100k users (2^17) without collisions (ids hash to ``1 + id mod
  (B - 1)``). ``train.steps`` = 4000 is about one epoch of the ~16M train rows (set it to
  ``ceil(epochs * train_rows / 4096)`` for more).
"""

import ml_collections

from configs.common import base_config


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "onemall", "lite"):
        raise KeyError(f"kuaisearch_rank has variants 'tiny', 'onemall' and 'lite', not {arg!r}")
    tiny = arg != "lite"
    c = base_config()
    c.task = "kuaisearch_rank"

    c.train.steps = 300 if tiny else 4000  # tiny: about one epoch of its ~65k train rows
    c.train.batch_size = 256 if tiny else 4096
    c.train.log_every = 50 if tiny else 100
    c.train.checkpoint_every = 10_000 if tiny else 1000
    c.train.grad_clip_norm = 1.0 if tiny else 0.0  # the paper does not clip

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3 if tiny else 1e-3
    c.optimizer.weight_decay = 1e-5
    c.optimizer.no_decay = ""  # the paper's weight decay applies to the embeddings too
    c.optimizer.schedule = "cosine" if tiny else "constant"
    c.optimizer.warmup_steps = 20 if tiny else 100

    c.model = ml_collections.ConfigDict()
    c.model.name = "dnn"  # dnn | wide_deep | dcn | dcnv2 | din
    c.model.embed_dim = 8 if tiny else 32
    c.model.mlp = (64, 32) if tiny else (256, 128, 64)
    c.model.cross_layers = 2 if tiny else 3
    c.model.dcn_structure = "parallel"  # DCNv2: stacked | parallel
    c.model.attention_mlp = (32, 16) if tiny else (64, 32)
    # Hash buckets per id feature (powers of two so that tables split evenly over the mesh).
    c.model.id_buckets = ml_collections.ConfigDict({
        "user": 1024 if tiny else 1 << 17,        # KuaiSearch-Lite: 100k users
        "item": 4096 if tiny else 1 << 23,        # KuaiSearch-Lite: 6.6M items
        "category1": 64 if tiny else 256,
        "category2": 128 if tiny else 2048,
        "category3": 128 if tiny else 8192,
        "text": 8192 if tiny else 1 << 20,        # hashed character uni/bi-grams of query and title
        "wide_cross": 1 << 14 if tiny else 1 << 22,
    })

    d = c.data
    d.root = ""            # "" -> the synthetic world below; else a KuaiSearch folder (raw or prepared)
    d.prepared_dir = ""    # where to write the prepared rank ArrayRecords ("" -> ecomax's cache)
    d.prepare_workers = 0  # 0 -> one per CPU
    d.synthetic = ml_collections.ConfigDict({
        "num_users": 600, "num_items": 3000, "num_sessions": 4000, "seed": 0, "test_fraction": 0.1})
    d.query_len = 24
    d.title_len = 64
    d.history_len = 20
    d.text = "char_ngram"  # char_ngram | sentencepiece
    d.ngrams = (1, 2)
    d.tokenizer = ""       # a SentencePiece .model when text == "sentencepiece"
    d.test_fraction = 0.1  # the time-based split when the rows' split field does not separate them
    d.base_rate_rows = 1_000_000   # train rows read for the constant predictor's rate (evenly spaced)
    d.materialize = tiny  # featurize each split once into arrays (small worlds only)
    d.read_threads = 4
    d.worker_count = 0 if tiny else 8
    d.progress = True

    if arg == "onemall":   # the world of configs/onemall.py (same generator, seed and sizes: the same rows)
        from configs.onemall import get_config as onemall  # noqa: PLC0415

        world = onemall("tiny").data.synthetic
        d.synthetic.update({k: world[k] for k in ("num_users", "num_items", "num_sessions", "seed")})
        d.synthetic.test_fraction = 0.2   # the recall world's split (synthesize's default): OneMall's test
        d.test_fraction = 0.2             # sessions are none of the ranker's training rows
        c.model.name = "din"
    c.eval.batch_size = 1024 if tiny else 8192
    c.eval.max_examples = 0        # 0: every test row (else that many, evenly spaced)
    return c
