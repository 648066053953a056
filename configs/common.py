"""Defaults shared by every experiment config: train loop, optimizer, mesh and sharding rules."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000               # the schedule's length
    c.train.stop_after = 0            # >0: save and stop at this step (the schedule still spans train.steps)
    c.train.batch_size = 256          # global, across all processes and devices
    c.train.microbatches = 1          # gradient accumulation: batch_size / microbatches per pass
    c.train.compute_dtype = "float32"  # params stay float32; "bfloat16" on accelerators
    c.train.grad_clip_norm = 1.0      # 0 disables clipping
    c.train.log_every = 50
    c.train.eval_every = 0            # 0: evaluate only at the end
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.restore_step = 0           # >0: resume from exactly this checkpoint (newer ones are set aside)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"   # cosine | linear | constant (after linear warmup)
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.05
    c.optimizer.no_decay = "pos|logit_scale|embedding"  # regex over param paths; ndim<2 never decays
    c.optimizer.frozen = ""            # regex over param paths: no update, no optimizer state (e.g. "^teacher/")
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.expert = 1                 # expert parallelism (sparse MoE layers); carries batch elsewhere
    c.mesh.tensor = 1

    # Logical axis name -> mesh axes ("a,b"; "" replicates). Parameters and activations use the same rules.
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ml_collections.ConfigDict({
        "batch": "fsdp,data,expert", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv": "",
        "expert": "expert",   # sparse MoE: experts over the `expert` mesh axis (models/moe.py)
        "vocab": "tensor", "seq": "", "patch": "", "channels": "", "classes": "",
    })

    # Pretrained towers: name -> init_from_entry(target); an empty path = not used (trainers/init_from.py).
    c.init_from = ml_collections.ConfigDict()

    # Evaluation: every config's evaluator reads its batch (``eval.batch_size``) and, where it caps the
    # evaluated examples, ``eval.max_examples`` (0: all) from here.
    c.eval = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.read_threads = 4
    c.data.prefetch = 16
    c.data.worker_count = 0           # >0: decode in that many prefetch processes; -1: one per core
    return c


def init_from_entry(target: str, *, path: str = "", skip: str = "", family: str = "", format: str = "hf",
                    source: str = "") -> ml_collections.ConfigDict:
    """A pretrained-tower entry for ``c.init_from.NAME``, placed at ``target`` (``trainers/init_from.py``).

    ``target`` is a ``/`` path into the model's parameters (e.g. ``query/vit``); set ``path`` (also with
    ``--set init_from.NAME.path=...``) to use it. ``format``: ``hf`` (a Hugging Face folder; ``skip``:
    comma-separated regexes of tensors to ignore; ``family``: vit | clip | siglip | bert | xlmr, default
    from config.json), ``ecomax`` (another run's workdir or a params export: ``source`` the subtree to
    take, ``step`` the checkpoint, 0 = the newest) or ``tunix`` (a Qwen2 / Llama folder).
    """
    return ml_collections.ConfigDict({"format": format, "path": path, "target": target, "skip": skip,
                                      "family": family, "source": source, "step": 0})


# The synthetic KuaiSearch world of the recall and relevance `tiny` configs (one cached world, one
# tokenizer). Character tokens, as bert-base-chinese.
KUAISEARCH_SYNTHETIC = {"num_users": 200, "num_items": 800, "num_sessions": 3000, "num_relevance": 12000,
                        "seed": 0, "vocab_size": 2000, "model_type": "char"}


def kuaisearch_text_model(tiny: bool, *, name: str, max_positions: int) -> ml_collections.ConfigDict:
    """The text encoder of the KuaiSearch recall and relevance configs: tiny, or BERT-base (``lite``)."""
    return ml_collections.ConfigDict({
        "name": name,
        "vocab_size": 0 if tiny else 21128,  # 0: the tokenizer's size; 21128 = bert-base-chinese
        "hidden": 64 if tiny else 768,
        "depth": 2 if tiny else 12,
        "heads": 4 if tiny else 12,
        "mlp_dim": 256 if tiny else 3072,
        "max_positions": max_positions if tiny else 512,
    })
