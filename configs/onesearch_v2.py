"""OneSearch-V2 (keyword reasoning, reasoning-internalised self-distillation, TPMA-GRPO) on KuaiSearch.

    ecomax gr sids --config configs/onesearch_v2.py:v1 --out runs/os_sids        # 3 k-means levels + 2 OPQ codes
    ecomax train --config configs/onesearch_v2.py:focal --workdir runs/os_focal --set data.sid_table=runs/os_sids
    ecomax train --config configs/onesearch_v2.py:tpma --workdir runs/os_tpma --set data.sid_table=runs/os_sids \\
        --set init_from.model.path=runs/os_focal

Arguments: the paper's ablation ladder (OneSearch-V2, Table 4), each row adding one part to the row before:
  ``v1`` (= ``tiny``): SFT, query + profile -> SID, mixed with item text -> SID (OneSearch-V1's generative retriever);
  ``cot``: + the CoT task (the model decodes the query's keywords);
  ``sd``: + reasoning-internalised self-distillation, joint mode (``sd_ema``: the EMA teacher instead);
  ``rdrop``: + R-Drop; ``fgm``: + FGM; ``focal``: + focal loss in place of the CE;
  ``grpo``: + RL from a ``focal`` run (``init_from.model.path``): plain GRPO on the item reward;
  ``tpma``: TPMA-GRPO instead (position-weighted prefix rewards, gates, no clipping);
  ``full``: TPMA + the normalised item reward (order/click, CTR from a frozen ranker ``rl.ranker``,
    relevance from a frozen relevance model ``rl.relevance``, format).
The world: the synthetic KuaiSearch world of ``configs/onemall.py`` (400 users x 16,000 sessions, 800 items),
its ``keywords.jsonl``; a 2 + 2-layer 64-wide T5. CPU, minutes per row.
"""

import ml_collections

from configs.common import KUAISEARCH_SYNTHETIC, base_config, init_from_entry
from configs.gr import t5_model

LADDER = ("v1", "cot", "sd", "rdrop", "fgm", "focal")
RL = ("grpo", "tpma", "full")
VARIANTS = ("tiny", *LADDER, "sd_ema", *RL)


def get_config(arg: str = "v1") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise KeyError(arg)
    arg = "v1" if arg == "tiny" else arg
    rl = arg in RL
    rung = len(LADDER) if rl else LADDER.index("sd") + 1 if arg == "sd_ema" else LADDER.index(arg) + 1
    c = base_config()
    c.task = "gr_onesearch_rl" if rl else "gr_onesearch"
    c.model = t5_model(tiny=True)

    c.data.root = ""
    c.data.synthetic = ml_collections.ConfigDict({**KUAISEARCH_SYNTHETIC, "num_users": 400, "num_sessions": 16000})
    c.data.tokenizer = ""
    c.data.tokenizer_vocab_size = 2000
    c.data.tokenizer_model_type = "char"
    c.data.sid_table = ""
    c.data.keywords = ""            # a keywords JSONL (data_pipelines/kuaisearch/reasoning.py); empty: ROOT/keywords.jsonl
    c.data.profile = True           # the user's gender and age bucket after the query
    c.data.query_len = 24           # student input: <s> query </s> profile </s>
    c.data.keyword_len = 24         # the keyword span the teacher input adds (and the CoT target)
    c.data.item_len = 48            # `ecomax gr sids`: the item texts the SIDs are fitted on
    c.data.index_repeats = 1
    c.sids = ml_collections.ConfigDict({"tokenizer": "configs/sid.py:onesearch_tiny", "dim": 32})

    # OneSearch-V2 Sec. 3.2 (the paper's values)
    c.onesearch = ml_collections.ConfigDict({
        "cot_weight": 1.0 if rung >= 2 else 0.0,   # x the CoT task's CE (query -> keywords)
        "distill": ("ema" if arg == "sd_ema" else "joint") if rung >= 3 else "none",   # none | joint | ema
        "w_teacher": 1.0,               # w_T
        "w_kl": 0.1,                    # w_KL
        "tau": 1.0,
        "ema_decay": 0.9,
        "r_drop": 0.5 if rung >= 4 else 0.0,   # alpha (0: off)
        "dropout": 0.1,                 # R-Drop's dropout rate (input embeddings and encoder output)
        "fgm": 0.6 if rung >= 5 else 0.0,      # epsilon (0: off)
        "focal": rung >= 6,
        "focal_alpha": 2.0,
        "focal_gamma": 3.0,
    })
    # TPMA-GRPO (Sec. 3.3, Eqs. 12-18) and plain GRPO
    c.rl = ml_collections.ConfigDict({
        "mode": "grpo" if arg == "grpo" else "tpma",   # grpo | tpma
        "group": 8,                     # G: SIDs sampled per query
        "temperature": 1.0,
        "clip": 0.2,                    # plain GRPO's epsilon (TPMA: no clipping)
        "kl": 0.04,                     # plain GRPO's beta (TPMA: none)
        "delta": 1e-4,                  # TPMA's std floor
        "item_weight": 1.0 if arg == "full" else 0.0,   # w_item x the group-normalised R_item (TPMA)
        "sft_weight": 1.0,              # x the SFT loss on the query's own item, beside the policy gradient
        "ranker": "",                   # R_CTR: a KuaiSearch ranking run (workdir or params export); empty: 0
        "relevance": "",                # R_rel: a KuaiSearch relevance run; empty: 0
        "scorer_batch": 1024,
    })

    c.eval.split = "test"
    c.eval.ks = (10, 50)
    c.eval.beams = 50
    c.eval.batch_size = 128
    c.eval.max_examples = 0
    c.eval.teacher = not rl          # also evaluate the teacher input (keywords given)

    c.train.batch_size = 64
    c.train.steps = 2000
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 0.01
    c.train.grad_clip_norm = 1.0
    c.sharding.rules.relpos = ""
    if rl:
        c.init_from.model = init_from_entry("", format="ecomax")   # path: the SFT run
        c.train.batch_size = 16         # queries per step (x group = 128 samples)
        c.train.steps = 200
        c.train.log_every = 25
        c.train.checkpoint_every = 100
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 10
        c.optimizer.schedule = "constant"
    return c
