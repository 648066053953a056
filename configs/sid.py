"""Semantic-ID tokenizers: RQ-KMeans fitted level by level on item embeddings.

    ecomax train --config configs/sid.py:tiny --workdir runs/sid
    ecomax sid build --config configs/sid.py:lite --embeddings items.npy --out sids/
Arguments: ``tiny`` (synthetic items, CPU, seconds), ``lite`` (OneSearch: 3 levels x 1024 codes),
``lite_tiger`` (TIGER: 3 x 256 + a dedup digit), ``lite_kuaisearch`` (the KuaiSearch paper's generative
retrieval rows: 3 x 512 + a dedup digit), ``lite_onesearch`` (OneSearch-V2: 3 x 1024 + 2 OPQ sub-codes x 256 of
the final residual; ``onesearch_tiny``: 3 x 16 + 2 x 16), all at KuaiSearch-Lite's 6.6M items and 768-d embeddings;
``rqvae_tiny`` and ``rqvae_lite`` (TIGER's RQ-VAE: 768 -> 512 -> 256 -> 128 -> 32, 3 x 256, beta 0.25);
``quasid_tiny``/``quasid_lite`` and ``adasid_tiny``/``adasid_lite``: that RQ-VAE with QuaSID's or AdaSID's
collision regulation, trained on co-engaged item pairs (``data.pairs``).
"""

import math

import ml_collections

from configs.common import base_config

VARIANTS = {
    #              levels codes dim  iterations batch   num_items  eval.batch
    "tiny":       (3,     16,   32,  5,         512,    2048,      1024),
    "lite":       (3,     1024, 768, 20,        65_536, 6_600_000, 65_536),
    "lite_tiger": (3,     256,  768, 20,        65_536, 6_600_000, 65_536),
    "lite_kuaisearch": (3, 512, 768, 20,        65_536, 6_600_000, 65_536),  # the KuaiSearch GR rows' SIDs
    "onesearch_tiny": (3, 16,   32,  5,         512,    2048,      1024),  # + 2 OPQ sub-codes x 16
    "lite_onesearch": (3, 1024, 768, 20,        65_536, 6_600_000, 65_536),  # OneSearch-V2: + 2 OPQ sub-codes x 256
}


def fit_steps(levels: int, iterations: int, num_items: int, batch_size: int) -> int:
    """Steps of a level-by-level fit: ``iterations`` passes over the items per level."""
    return levels * iterations * math.ceil(num_items / batch_size)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg.startswith(("rqvae_", "quasid_", "adasid_")):
        return rq_vae_config(arg)
    levels, codes, dim, iterations, batch, num_items, eval_batch = VARIANTS[arg]
    opq = arg in ("onesearch_tiny", "lite_onesearch")
    c = base_config()
    c.task = "sid_rq_kmeans"
    c.model = ml_collections.ConfigDict({
        "levels": levels, "codes": codes, "dim": dim,
        "iterations": iterations,       # Lloyd passes over every item, per level
        "init": "kmeans++",             # kmeans++ | first (the first batch's first rows)
        "dead_code_reset": True,        # re-seed a code no item chose at the pass's farthest point
        "dedup": not opq,               # append TIGER's dedup digit to colliding SIDs (OneSearch-V2: the OPQ codes)
        "chunk_rows": -1 if arg == "tiny" else 0,  # rows scored at a time (-1: 2^19 / codes, for CPU; 0: all)
        "init_rows": 16_384,            # k-means++ seeds on at most this many rows of the first batch (0: all)
        "balanced": False,              # OneRec's balanced k-means: each code takes B / K rows of every batch
        "fsq_levels": [],               # OneMall: FSQ levels per dim of the final residual, one more SID level
        # OneSearch-V2: OPQ of the final residual, `opq_subspaces` more SID levels of `opq_codes` codes each
        # (`ecomax sid build` fits it after the k-means levels; models/semantic_ids.py:opq_fit)
        "opq_subspaces": 2 if opq else 0,
        "opq_codes": 16 if arg == "onesearch_tiny" else 256,
        "opq_iterations": 20,           # OPQ's alternations (Lloyd steps + Procrustes rotation)
        "opq_fit_rows": 65_536,         # residuals the OPQ is fitted on (evenly spaced rows; all are encoded)
    })
    c.data.embeddings = ""              # a [N, d] float32 .npy (ids: NAME.ids.npy beside it)
    c.data.synthetic = arg == "tiny"    # without data.embeddings: generated items (tiny only)
    c.data.num_items = num_items        # 0: the rows of data.embeddings
    c.data.clusters = 24                # synthetic items only
    c.eval = ml_collections.ConfigDict({"batch_size": eval_batch, "max_examples": 0})  # 0: all items
    # dense [prefixes, K] tables for the first levels (root, then <= K prefixes: 4 MB at K = 1024), CSR below
    c.trie = ml_collections.ConfigDict({"dense_levels": 2})
    c.train.batch_size = batch
    passes = math.ceil(num_items / batch)
    c.train.steps = fit_steps(levels, iterations, num_items, batch)
    c.train.checkpoint_every = passes * (1 if arg == "tiny" else 5)
    c.train.log_every = passes
    c.train.async_checkpoints = True
    c.sharding.rules.levels = ""
    c.sharding.rules.codes = ""         # codebooks replicated (3 x 1024 x 768 f32 is 9 MB)
    return c


def rq_vae_config(arg: str) -> ml_collections.ConfigDict:
    """TIGER's RQ-VAE (Rajput et al. 2023, Sec. 4): 768-d item embeddings, encoder 512 -> 256 -> 128 -> 32,
    3 levels x 256 codes, beta 0.25, batch 1024. (TIGER trains with Adagrad at lr 0.4 for 20k epochs;
    ecomax's optimizers are AdamW and SGD: AdamW at 1e-3 here.)"""
    method, _, size = arg.partition("_")
    if method not in ("rqvae", "quasid", "adasid") or size not in ("tiny", "lite"):
        raise KeyError(arg)
    tiny = size == "tiny"
    c = base_config()
    c.task = "sid_rq_vae"
    c.model = ml_collections.ConfigDict({
        "dedup": True,
        "dim": 32 if tiny else 768, "hidden": [64, 32] if tiny else [512, 256, 128], "latent": 8 if tiny else 32,
        "levels": 3, "codes": 16 if tiny else 256, "beta": 0.25,
        "init_iterations": 10,          # Lloyd steps of the first-batch k-means that seeds the codebooks
        "reset_every": 50 if tiny else 1000,  # re-seed codes unused over this many batches (0: never)
        "rotation_trick": False,        # Fifty et al. 2024 instead of the straight-through estimator
        "collision": "none" if method == "rqvae" else method,  # none | quasid | adasid
    })
    # QuaSID (Hu et al. 2026, arXiv 2603.00632; offline values: R = 1, margins 0.8 / 0.5, weights 0.2 / 0.1)
    c.quasid = ml_collections.ConfigDict({
        "radius": 1, "m_full": 0.8, "m_partial": 0.5, "lam_full": 0.2, "lam_partial": 0.1,
        "temperature": 0.07, "lam_cl": 0.1,  # the dual-tower InfoNCE (the paper's tau and weight: unpublished)
    })
    # AdaSID (Pan et al. 2026, arXiv 2604.23522). The paper names these without publishing values; ecomax's:
    # margins by overlap depth o = 1..L (QuaSID's 0.5 / 0.8 at o = L - 1, L), relaxation thresholds eta_o on
    # cos(z_i, z_j), the load weight from 1 to 2 over 0..64 pairs of one signature, the schedule over
    # [0.2, 0.8] of training.
    c.adasid = ml_collections.ConfigDict({
        "similarity": "latent",         # relaxation on cos(z_i, z_j) (latent) or on the input embeddings (input)
        "eta": [0.9, 0.95, 0.98], "margins": [0.3, 0.5, 0.8],
        "f_min": 1.0, "f_max": 2.0, "d_max": 64.0, "alpha": 0.5,
        "t_start": 0.2, "t_end": 0.8,   # fractions of train.steps
        "lam_col_min": 0.2, "lam_cf_max": 0.1, "temperature": 0.07,
    })
    c.data.embeddings = ""
    c.data.synthetic = tiny
    c.data.num_items = 2048 if tiny else 6_600_000
    c.data.clusters = 24
    c.data.pairs = ""                   # co-engaged pairs, [P, 2] item ids .npy (collision regulation); none: no pairs
    c.data.pairs_per_item = 4           # synthetic items: partners drawn per item, within its category
    c.data.pair_rounds = 4              # copies of the items per pass, each with its next partner
    c.eval = ml_collections.ConfigDict({"batch_size": 1024 if tiny else 65_536, "max_examples": 0})
    c.trie = ml_collections.ConfigDict({"dense_levels": 2})
    c.train.batch_size = 256 if tiny else 1024
    c.train.steps = 300 if tiny else 200_000
    c.train.log_every = 50 if tiny else 1000
    c.train.checkpoint_every = 100 if tiny else 10_000
    c.optimizer.learning_rate = 3e-3 if tiny else 1e-3
    c.optimizer.warmup_steps = 10 if tiny else 1000
    c.optimizer.weight_decay = 0.0
    c.sharding.rules.levels = ""
    c.sharding.rules.codes = ""
    return c
