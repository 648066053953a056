"""TIGER-FG (text-guided implicit fine-grained grounding) on ECom-RF-IMMR, and its baselines.

    ecomax train --config configs/tigerfg.py:tiny --workdir runs/tigerfg
    ecomax train --config configs/tigerfg.py:small --workdir runs/clip --set model.name=clip
    ecomax train --config configs/tigerfg.py:small --workdir runs/nodistill --set loss.srd=0. --set loss.sdd=0.

Arguments: ``tiny`` (CPU, well under a minute), ``demo`` (the ``make demo`` runs), ``small`` (CPU demo scale: a few minutes), ``base`` (the
paper's scale: ViT-B/16 query and item towers at 224 px, a BERT-base text tower, 256-d, global batch
4096, bf16, parameters sharded FSDP over all devices; 10M pairs x 10 epochs).
``model.name``: ``tigerfg`` | ``clip`` | ``late_fusion``. ``loss.<term>=0`` switches a term off.
"""

import ml_collections

from configs.common import base_config, init_from_entry


def _vit(patch: int, hidden: int, depth: int, heads: int, mlp: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"patch_size": patch, "hidden": hidden, "depth": depth, "heads": heads,
                                      "mlp_dim": mlp})


# image, patch, width, depth, heads, text width, text depth, slots, embed, batch, steps, items, queries/item
SIZES = {
    "tiny": (32, 8, 64, 2, 4, 64, 1, 4, 32, 32, 30, 120, 2),
    "demo": (32, 8, 64, 2, 4, 64, 1, 4, 32, 32, 300, 400, 2),
    "small": (48, 8, 96, 3, 4, 64, 2, 4, 64, 64, 500, 600, 4),
    "base": (224, 16, 768, 12, 12, 768, 12, 8, 256, 4096, 24_414, 0, 0),
}


def get_config(arg: str = "tiny"):
    (image, patch, width, depth, heads, t_width, t_depth, slots, embed, batch, steps, items,
     queries) = SIZES[arg]
    base = arg == "base"
    c = base_config()
    c.task = "tigerfg"
    c.train.steps = steps
    c.train.batch_size = batch
    c.train.log_every = max(1, min(100, steps // 20))
    c.train.checkpoint_every = 2000 if base else steps
    c.train.compute_dtype = "bfloat16" if base else "float32"
    c.optimizer.learning_rate = 5e-4 if base else 1e-3
    c.optimizer.warmup_steps = 2000 if base else max(1, steps // 10)
    c.optimizer.no_decay = "pos|logit_scale|embedding|cls_token|slots|gate"

    c.model = ml_collections.ConfigDict()
    c.model.name = "tigerfg"
    c.model.embed_dim = embed
    c.model.proj_bias = True
    c.model.query_vit = _vit(patch, width, depth, heads, 4 * width)
    c.model.item_vit = _vit(patch, width, depth, heads, 4 * width)
    c.model.share_image_encoder = False
    c.model.text = ml_collections.ConfigDict({
        "vocab_size": 32_000 if base else 1024, "hidden": t_width, "depth": t_depth, "heads": 12 if base else 4,
        "mlp_dim": 4 * t_width, "max_len": 512 if base else 64})
    c.model.num_slots = slots
    c.model.fusion_heads = heads

    # The frozen distillation teacher (not a parameter: rebuilt from the seed inside the step).
    # With init_from.teacher.path (a Hugging Face ViT folder; sizes below must match it) or in_params=True,
    # the teacher is instead a frozen `teacher` subtree of the parameters.
    c.teacher = ml_collections.ConfigDict({"seed": 1234, "hidden": width, "depth": depth, "heads": heads,
                                           "mlp_dim": 4 * width, "in_params": False})
    c.init_from.teacher = init_from_entry("teacher")
    c.optimizer.frozen = "^teacher/"

    c.loss = ml_collections.ConfigDict()
    c.loss.q2i = 1.0
    c.loss.v2t = 0.5
    c.loss.i2v = 0.5
    c.loss.srd = 1.0
    c.loss.sdd = 0.5
    c.loss.hard_negatives = True
    c.loss.sdd_student_temp = 0.05
    c.loss.sdd_teacher_temp = 0.05

    c.data.image_size = image
    c.data.max_text_len = 64 if base else 32
    c.data.query_crop_scale = (0.6, 1.0)
    c.data.mosaic_training = True      # keep the mosaic-canvas training pairs ("w/o Mosaic": False)
    c.data.mosaic_grouping = True      # negative text from another target of the same canvas
    c.data.mosaic_batches = False      # put the items of one canvas in the same global batch (no index shuffle)
    c.data.eval_split = "test"
    c.eval.batch_size = 256 if base else 128
    # Synthetic ECom-RF-IMMR (built once into the ecomax cache); root/tokenizer name a built dataset instead.
    c.data.root = ""
    c.data.tokenizer = ""
    c.data.num_items = items or 20_000
    c.data.queries_per_item = queries or 4
    c.data.synth_seed = 0
    c.data.synth_image_size = 256 if base else 64
    c.data.vocab_size = c.model.text.vocab_size

    if base:
        # Paper scale: parameters FSDP-sharded over every device, the batch over every device.
        c.mesh.data = 1
        c.mesh.fsdp = -1
        c.sharding.rules.embed = "fsdp"   # (the batch rule stays the default "fsdp,data")
        c.data.worker_count = 8
    return c
