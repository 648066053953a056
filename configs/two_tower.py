"""Image–text two-tower contrastive model on procedural shapes (the first task, and the loop's test bed).

    ecomax train --config configs/two_tower.py:tiny --workdir runs/tt
Arguments: ``tiny`` (CPU, well under a minute), ``demo`` (the ``make demo`` run), ``small`` (CPU, a few
minutes), ``base`` (accelerators).
"""

import ml_collections

from configs.common import base_config

SIZES = {
    #        steps batch width depth embed num_train
    "tiny": (60, 64, 32, 1, 32, 4096),
    "demo": (500, 128, 64, 2, 64, 16_384),
    "small": (600, 128, 96, 2, 64, 50_000),
    "base": (20_000, 4096, 512, 6, 256, 2_000_000),
}


def get_config(arg: str = "tiny"):
    steps, batch, width, depth, embed, num_train = SIZES[arg]
    c = base_config()
    c.task = "two_tower"
    c.train.steps = steps
    c.train.batch_size = batch
    c.train.log_every = max(1, steps // 20)
    c.train.checkpoint_every = max(1, steps // 3)
    c.optimizer.learning_rate = 3e-3 if arg != "base" else 1e-3
    c.optimizer.warmup_steps = max(1, steps // 10)

    c.model = ml_collections.ConfigDict()
    c.model.patch_size = 8
    c.model.width = width
    c.model.depth = depth
    c.model.mlp_ratio = 4
    c.model.embed_dim = embed

    c.data.image_size = 32
    c.data.max_words = 8
    c.data.num_train = num_train
    c.data.in_memory = arg in ("tiny", "demo")  # render small sets once: an example costs more than a step
    c.data.num_eval = 512 if arg == "tiny" else 2048
    c.eval.batch_size = 256
    return c
