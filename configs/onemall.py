"""OneMall (multi-behaviour generative recommendation, sparse MoE generator) on KuaiSearch.

    ecomax gr sids --config configs/onemall.py:tiny --out runs/gr_sids
    ecomax train --config configs/onemall.py:tiny --workdir runs/onemall --set data.sid_table=runs/gr_sids

Arguments:
  ``tiny``: the synthetic KuaiSearch world; per user the last 256 clicks, 64 purchases and 32 search queries
    before a session, each compressed by a 2-block Query-Former into 8 tokens, a 2-layer 64-wide T5 decoder
    whose feed-forward layers are sparse MoE (8 experts of width 128, top-2: the active width of the dense
    256), next-session item SIDs. CPU, minutes.
  ``tiny_last``: the truncation baseline: the last 8 events of each behaviour through the same blocks.
  ``tiny_dense``: the dense generator at equal active parameters (feed-forward width 256).
  ``tiny_search``: ``tiny`` that also encodes the session's query (personalised search; 2 encoder layers).
  ``tiny_scenario``: ``tiny`` with a scenario token: a session's scenario is its ``search_entrance`` (``mall`` |
    ``homepage``, from its rank rows), HR@k reported per scenario.
  ``tiny_rl``: the RL phase on ``tiny``: GRPO with the KuaiSearch ranker as the reward, from a ``tiny`` run
    (``init_from.model.path``) and a ``configs/kuaisearch_rank.py:onemall`` run (``rl.ranker``) on the same world.
  ``base``: the paper-scale shapes (lowered, not trained, on CPU): 2,048 clicks, 512 purchases, 256 queries,
    32 Query-Former tokens each, a 768-wide 12-layer decoder with a 64-expert top-2 MoE every second layer
    (experts over the ``expert`` mesh axis: ``mesh.expert=8``), 3 x 512 codes + a dedup digit.
"""

import ml_collections

from configs.common import KUAISEARCH_SYNTHETIC, base_config, init_from_entry
from configs.gr import t5_model

VARIANTS = ("tiny", "tiny_last", "tiny_dense", "tiny_search", "tiny_scenario", "tiny_rl", "base")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise KeyError(arg)
    tiny = arg.startswith("tiny")
    c = base_config()
    c.task = "gr_onemall_rl" if arg == "tiny_rl" else "gr_onemall"
    c.model = t5_model(tiny)
    m = c.model
    m.encoder_layers = 2 if arg == "tiny_search" else 0     # 0: no query encoder (recommendation)
    m.behaviours = ("click", "purchase", "query")
    m.num_queries = 8 if tiny else 32                        # K memory tokens per behaviour
    m.qformer_layers = 2
    m.compress = "last" if arg == "tiny_last" else "qformer"
    m.moe = ml_collections.ConfigDict({
        "num_experts": 0 if arg == "tiny_dense" else 8 if tiny else 64,   # 0: dense feed-forward layers
        "top_k": 2,
        "capacity_factor": 1.25,        # GShard / Switch; 0: dropless (grouped matmuls)
        "d_ff": 128 if tiny else 1024,  # per expert: top-2 x 128 = the dense tiny's 256 (equal active width)
        "every": 1 if tiny else 2,      # MoE in every n-th decoder layer
        "group_size": 0 if tiny else 64,    # tokens per routing group in training, 0: per row (decoding: per row)
        "balance_weight": 0.01,         # Switch Transformer's alpha (Fedus et al. 2022, Sec. 2.2)
        "z_weight": 1e-3,               # ST-MoE's router z-loss weight (Zoph et al. 2022, Sec. 3.1)
    })
    if not tiny:
        m.update({"text_vocab": 21128, "decoder_layers": 12, "sid_sizes": (512, 512, 512, 32)})

    c.data.root = ""
    # a longer-lived world than the other tiny configs': 400 users x 40 sessions, so histories reach hundreds
    c.data.synthetic = ml_collections.ConfigDict({**KUAISEARCH_SYNTHETIC, "num_users": 400, "num_sessions": 16000})
    c.data.tokenizer = ""
    c.data.tokenizer_vocab_size = 2000 if tiny else 21128
    c.data.tokenizer_model_type = "char"
    c.data.sid_table = ""
    c.data.lengths = ml_collections.ConfigDict(
        {"click": 256, "purchase": 64, "query": 32} if tiny else {"click": 2048, "purchase": 512, "query": 256})
    # scenarios (one model, a scenario token): the session's search_entrance; () = no scenario token
    c.data.scenarios = ("mall", "homepage") if arg == "tiny_scenario" else ()
    c.data.piece_len = 12 if tiny else 16      # pieces per past query
    c.data.query_len = 16 if tiny else 32      # the session's own query (when model.encoder_layers > 0)
    c.data.item_len = 48 if tiny else 64        # `ecomax gr sids`: the item texts the SIDs are fitted on
    c.sids = ml_collections.ConfigDict({"tokenizer": "configs/sid.py:tiny" if tiny else "configs/sid.py:lite_kuaisearch",
                                        "dim": 32 if tiny else 768})

    c.eval.split = "test"
    c.eval.ks = (10, 20, 50)
    c.eval.beams = 50
    c.eval.batch_size = 64 if tiny else 256
    c.eval.max_examples = 0

    c.train.batch_size = 64 if tiny else 256
    c.train.steps = 600 if tiny else 100_000
    c.train.log_every = 50 if tiny else 100
    c.train.checkpoint_every = 500 if tiny else 5000
    c.optimizer.learning_rate = 3e-3 if tiny else 1e-4
    c.optimizer.warmup_steps = 50 if tiny else 2000
    c.optimizer.weight_decay = 0.01
    c.sharding.rules.relpos = ""
    # RL (task gr_onemall_rl; OneMall Sec. 3.3) and ranker@k in every evaluation once rl.ranker is set
    c.rl = ml_collections.ConfigDict({
        "ranker": "",           # a KuaiSearch ranking run (workdir or params export): the frozen reward model
        "group": 8,             # GRPO's G: SIDs sampled per user
        "temperature": 1.0,
        "clip": 0.2,            # GRPO (Shao et al. 2024): epsilon
        "kl": 0.04,             # GRPO: beta, to the SFT generator
        "pg_weight": 1.0,       # x the GRPO objective (0: the control, SFT continued on the same batches)
        "sft_weight": 1.0,      # x the SFT loss on the session's own item, beside the policy gradient
        "hit_weight": 0.0,      # reward + this for an item the user interacted with (0: the ranker alone)
        "ranker_batch": 1024,
        "eval_k": 10,           # ranker@k: the ranker's mean click probability of the top-k generated items
    })
    if arg == "tiny_rl":
        c.init_from.model = init_from_entry("", format="ecomax")   # path: the `tiny` run
        c.train.batch_size = 16                                    # users per step (x group = 128 samples)
        c.train.steps = 150
        c.train.log_every = 25
        c.train.checkpoint_every = 50
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 10
    if not tiny:
        c.mesh.expert = 8
    return c
