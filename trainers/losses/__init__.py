"""Losses, one module per method family; each loss a short function citing the equation it implements.

* ``contrastive``: ``info_nce``, ``symmetric_info_nce`` (CLIP), ``dpr_loss`` (DPR);
* ``tigerfg``: ``q2i_loss``, ``v2t_loss``, ``i2v_loss``, ``srd_loss``, ``sdd_loss`` (TIGER-FG);
* ``ranking``: ``sigmoid_cross_entropy`` (the CTR objective);
* ``relevance``: ``binary_relevance_loss`` (query–item match classification);
* ``grpo``: ``group_advantages``, ``grpo_loss`` (GRPO, for policies trained on their own rollouts);
* ``generative``: ``dsi_loss``, ``ltrgr_rank_loss``, ``ltrgr_pair_loss``, ``ranker_reward`` (generative retrieval, OneMall's RL reward);
* ``onesearch``: ``self_distillation_loss``, ``r_drop_loss``, ``fgm_perturbation``, ``focal_loss`` and TPMA-GRPO's
  ``tpma_prefix_rewards``, ``tpma_advantages``, ``tpma_gates``, ``tpma_grpo_loss``, ``onesearch_item_reward`` (OneSearch-V2);
* ``semantic_ids``: ``reconstruction_loss``, ``rq_loss``, ``rq_vae_loss`` (RQ-VAE semantic-ID tokenizers).
"""

from trainers.losses.contrastive import dpr_loss, info_nce, symmetric_info_nce
from trainers.losses.generative import dsi_loss, ltrgr_pair_loss, ltrgr_rank_loss, ranker_reward
from trainers.losses.grpo import group_advantages, grpo_loss
from trainers.losses.ranking import sigmoid_cross_entropy
from trainers.losses.relevance import binary_relevance_loss
from trainers.losses.tigerfg import i2v_loss, q2i_loss, sdd_loss, srd_loss, v2t_loss

__all__ = ["binary_relevance_loss", "dpr_loss", "dsi_loss", "group_advantages", "grpo_loss", "i2v_loss",
           "info_nce", "ltrgr_pair_loss", "ltrgr_rank_loss", "q2i_loss", "ranker_reward", "sdd_loss", "sigmoid_cross_entropy", "srd_loss",
           "symmetric_info_nce", "v2t_loss"]
