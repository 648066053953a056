"""Generative retrieval on KuaiSearch: a sequence model reads the query and generates the semantic IDs of the
items to return, decoding only SIDs that exist (a trie-constrained beam search).

    ecomax gr sids --config configs/gr.py:tiny --out runs/gr_sids            # item texts -> SID table + trie
    ecomax train --config configs/gr.py:tiny --workdir runs/gr_dsi --set data.sid_table=runs/gr_sids
    ecomax train --config configs/gr.py:ltrgr_tiny --workdir runs/gr_ltrgr --set data.sid_table=runs/gr_sids \\
        --set init_from.model.path=runs/gr_dsi/checkpoints

Arguments:
  ``tiny``: DSI (Tay et al. 2022) on the synthetic KuaiSearch world: a 2 + 2-layer, 64-wide T5 over the
    world's sentencepiece pieces plus one block of code tokens per SID level, trained on query -> SID of a
    clicked or purchased item, mixed with item text -> SID (DSI's indexing examples); CPU, minutes.
  ``tiger_tiny``: TIGER-style sequential recommendation (Rajput et al. 2023) on the same world and SIDs:
    a user's last 20 clicked items' SIDs -> the next item's SID, leave-one-out split.
  ``ltrgr_tiny``: LTRGR (Li et al. 2024): DSI's loss plus a margin rank loss over the model's own
    beam candidates, continued from a DSI checkpoint (``init_from``).
  ``lite``: the KuaiSearch paper's official GR setup on KuaiSearch-Lite (``data.root``): mT5-base
    (12 + 12 layers, 768 wide, 12 heads x 64, gated-GELU MLP 2048, untied head, 250,112 pieces),
    query length 32, SIDs = residual k-means 3 x 512 on title embeddings + a dedup digit, beam 50.
    Start from mT5-base weights with ``init_from`` after ``ecomax import`` (see the README).
"""

import ml_collections

from configs.common import KUAISEARCH_SYNTHETIC, base_config, init_from_entry

VARIANTS = ("tiny", "ltrgr_tiny", "tiger_tiny", "lite", "ltrgr_lite")


def t5_model(tiny: bool) -> ml_collections.ConfigDict:
    """The encoder-decoder: tiny, or mT5-base's shapes (``lite``)."""
    return ml_collections.ConfigDict({
        "arch": "encoder_decoder",          # encoder_decoder (T5) | decoder_only
        "text_vocab": 0 if tiny else 250_112,  # 0: the tokenizer's size; codes follow the text pieces
        "d_model": 64 if tiny else 768,
        "num_heads": 4 if tiny else 12,
        "head_dim": 16 if tiny else 64,
        "d_ff": 256 if tiny else 2048,
        "encoder_layers": 2 if tiny else 12,
        "decoder_layers": 2 if tiny else 12,
        "feed_forward": "gated-gelu",        # gated-gelu (T5 v1.1, mT5) | relu (T5 v1.0)
        "relative_buckets": 32,
        "relative_max_distance": 128,
        "tie_embeddings": False,
        "vocab_multiple": 128,              # embedding rows padded to a multiple (shardable; padding never read)
        "sid_sizes": (),                    # codes per SID level; empty: the SID table's (set to lower without data)
    })


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise KeyError(arg)
    tiny, ltrgr, tiger = arg.endswith("tiny"), arg.startswith("ltrgr"), arg.startswith("tiger")
    c = base_config()
    c.task = "gr_ltrgr" if ltrgr else "gr_tiger" if tiger else "gr_dsi"
    c.model = t5_model(tiny)

    c.data.root = ""                    # empty: the synthetic world below
    c.data.synthetic = ml_collections.ConfigDict(KUAISEARCH_SYNTHETIC)
    c.data.tokenizer = ""               # a sentencepiece .model; empty: root/spm.model or trained once
    c.data.tokenizer_vocab_size = 2000 if tiny else 21128
    c.data.tokenizer_model_type = "char"
    c.data.query_len = 16 if tiny else 32
    c.data.item_len = 48 if tiny else 64  # DSI indexing examples: item title + brand + categories
    c.data.sid_table = ""               # a folder written by `ecomax gr sids` or `ecomax sid build`
    c.data.index_repeats = 1            # item text -> SID examples per item per pass (0: queries only)
    c.data.max_history = 20             # TIGER: the last clicked items a history holds (TIGER keeps 20)

    # `ecomax gr sids`: the item vectors (TF-IDF -> LSA of the item texts) and the SID tokenizer fitted on them
    c.sids = ml_collections.ConfigDict({
        "tokenizer": "configs/sid.py:tiny" if tiny else "configs/sid.py:lite_kuaisearch",
        "dim": 32 if tiny else 768,
    })

    c.eval.split = "test"
    c.eval.ks = (10, 20, 50)
    c.eval.beams = 50                   # the paper's beam; >= max(ks) so every K has K candidates
    c.eval.batch_size = 64 if tiny else 256
    c.eval.max_examples = 0             # 0: every test session
    c.eval.bm25 = True

    if ltrgr:  # LTRGR's learning-to-rank phase (Li et al. 2024, Sec. 3.3), continued from a DSI run
        c.ltrgr = ml_collections.ConfigDict({
            "beams": 10 if tiny else 50,     # candidates per query from the model's own beam search
            "loss": "pairs",                 # pairs: the released code's two pairs; all: every beam negative
            "margin": 1.0,                   # m of the margin rank loss
            "random_margin": 1.0,            # m' of the drawn pair (the released code: m + 100 at m = 300)
            "gen_weight": 1.0,               # lambda: L = L_rank + lambda * L_dsi
            "max_relevant": 8,               # relevant SIDs per query kept to tell negatives apart
        })
        c.init_from.model = init_from_entry("", format="ecomax")  # path: the DSI run

    if not tiny:  # mT5-base weights (a Hugging Face folder; data.tokenizer = its spiece.model), the code rows new
        c.init_from.mt5 = ml_collections.ConfigDict({"format": "hf", "path": "", "target": "", "skip": "",
                                                     "family": "t5", "grow": "embedding|lm_head"})

    if tiger:  # TIGER's metrics: Recall@5/10, NDCG@5/10 of the next item, on the leave-one-out test item
        c.eval.ks, c.eval.beams, c.eval.bm25 = (5, 10), 20, False

    c.train.batch_size = 64 if tiny else 256
    c.train.steps = (300 if ltrgr else 1500) if tiny else 100_000
    c.train.log_every = 50 if tiny else 100
    c.train.checkpoint_every = 500 if tiny else 5000
    c.optimizer.learning_rate = (3e-4 if ltrgr else 3e-3) if tiny else 1e-4  # LTRGR fine-tunes a trained model
    c.optimizer.warmup_steps = 50 if tiny else 2000
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 0.01
    c.train.grad_clip_norm = 1.0
    c.sharding.rules.relpos = ""          # the shared relative-position table, replicated
    return c
