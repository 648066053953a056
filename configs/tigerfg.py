"""TIGER-FG (text-guided implicit fine-grained grounding) on ECom-RF-IMMR, and its baselines.

    ecomax train --config configs/tigerfg.py:tiny --workdir runs/tigerfg
    ecomax train --config configs/tigerfg.py:small --workdir runs/clip --set model.name=clip
    ecomax train --config configs/tigerfg.py:small --workdir runs/nodistill --set loss.srd=0. --set loss.sdd=0.

Arguments: ``tiny`` (CPU, well under a minute), ``demo`` (the ``make demo`` runs), ``small`` (CPU demo scale: a few minutes), ``base`` (the
paper's scale: ViT-B/16 query and item towers at 224 px, a BERT-base text tower, 256-d, global batch
4096, bf16, parameters sharded FSDP over all devices; 10M pairs x 10 epochs).
``model.name``: ``tigerfg`` | ``clip`` | ``late_fusion``. ``loss.<term>=0`` switches a term off.

Two-stage distillation recipe (any size; ``SIZE_teacher`` is stage 1):

    ecomax train --config configs/tigerfg.py:demo_teacher --workdir runs/teacher
    ecomax train --config configs/tigerfg.py:demo --workdir runs/tigerfg --set init_from.teacher.path=runs/teacher

Stage 1 trains the teacher the distillation terms need: one image encoder shared by the query crop and the
item's *boxed target* (the item image cropped to its target box), contrastively, for twice the student's
steps: the CLIP-style model with ``model.share_image_encoder`` and ``loss.item_view="box_crop"``. That is
what the paper's teachers give (a strong frozen encoder that sees the boxed target, whose query->target
similarities L_SDD distils and whose patch relations L_SRD distils), learned from the same catalogue since
no pretrained checkpoint is reachable offline. Stage 2 takes its encoder (``item_vit``: where a shared
encoder's parameters live) as the frozen ``teacher`` subtree. A Hugging Face ViT works too:
``--set init_from.teacher.format=hf --set init_from.teacher.source= --set init_from.teacher.path=DIR``.
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
    if arg.endswith("_teacher"):
        return teacher_config(arg.removesuffix("_teacher"))
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
    # region: what the teacher compares the query with in L_SDD, "crop" (it embeds the target box cropped from
    # the item image: the paper's teacher sees the boxed target) or "patches" (the mean of its patch tokens in
    # the box: one teacher pass less, but a CLS-trained encoder's mean patch is not its image embedding).
    c.teacher = ml_collections.ConfigDict({"seed": 1234, "hidden": width, "depth": depth, "heads": heads,
                                           "mlp_dim": 4 * width, "in_params": False, "region": "crop"})
    # stage 2 of the recipe: --set init_from.teacher.path=<the SIZE_teacher run> (see the module docstring)
    c.init_from.teacher = init_from_entry("teacher", format="ecomax", source="item_vit")
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
    c.loss.item_view = "image"    # "box_crop": the item tower sees the target box cropped (training a teacher)

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
    # Item images and canvases as real catalogues store them (JPEG) at base; the smaller sizes keep the PNG
    # catalogue and host-side normalisation their README tables were measured with (bit-reproducible).
    c.data.synth_image_format = "jpeg" if base else "png"
    # "device": uint8 pixels + jitter factors leave the pipeline and the step normalises them (a quarter of
    # the bytes, no float work on the host); "host": float32, normalised by the pipeline
    c.data.photometric = "device" if base else "host"
    c.data.vocab_size = c.model.text.vocab_size

    if base:
        # Paper scale: parameters FSDP-sharded over every device, the batch over every device.
        c.mesh.data = 1
        c.mesh.fsdp = -1
        c.sharding.rules.embed = "fsdp"   # (the batch rule stays the default "fsdp,data")
        c.data.worker_count = -1     # one decoding process per host core
    return c


def teacher_config(size: str) -> ml_collections.ConfigDict:
    """Stage 1 of the distillation recipe at ``size``: the teacher's image encoder (see the module docstring)."""
    c = get_config(size)
    c.model.name = "clip"
    c.model.share_image_encoder = True
    c.loss.item_view = "box_crop"
    c.loss.srd = c.loss.sdd = 0.0  # (v2t and i2v need text: the CLIP-style model skips them)
    c.train.steps *= 2
    c.train.checkpoint_every = c.train.steps
    c.optimizer.warmup_steps *= 2
    return c
