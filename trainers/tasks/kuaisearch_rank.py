"""KuaiSearch ranking: CTR prediction (label = clicked or purchased) with DNN, Wide&Deep, DCN, DCNv2 or DIN.

    ecomax train --config configs/kuaisearch_rank.py:tiny --workdir runs/rank --set model.name=din

Data (``data_pipelines/kuaisearch/worlds.py:RankWorld``): ``data.root`` empty -> a synthetic world
(``data.synthetic``) generated, prepared and cached on first use; otherwise a KuaiSearch folder (the
released Lite layout ``rank_lite/ users_lite/ items_lite/ ...``, the demo layout, or a prepared TFDS
folder). Rows are featurized by ``rank_features.RankFeaturizer`` (joined with the users / items tables).

Evaluation (``evaluate``): on the test split, ``logloss`` and ``roc_auc`` of the model, and the constant
predictor alongside: ``constant/logloss`` = log loss of always predicting the train positive rate,
``constant/roc_auc`` = 0.5; ``logloss_gain`` = constant minus model (positive = better than constant);
plus the test size, positive rates and the join misses of the test rows; ``eval.max_examples`` (0: all)
evenly spaced test rows, in batches of ``eval.batch_size``. Loss: ``trainers/losses/ranking.py``.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch import rank_features as rf
from data_pipelines.kuaisearch.transforms import stack
from data_pipelines.kuaisearch.worlds import RankWorld
from data_pipelines.loader import eval_batches
from models.ranking import RankingConfig, build_model
from trainers.evaluators import metrics
from trainers.losses import sigmoid_cross_entropy
from trainers.tasks import Batch, EvalContext, Metrics, Task, register


def click_probability(model: nnx.Module, *arrays: jax.Array) -> jax.Array:
    """Click probability ``[b]`` from the model inputs in ``rank_features.MODEL_INPUTS`` order."""
    return jax.nn.sigmoid(model(dict(zip(rf.MODEL_INPUTS, arrays))).astype(jnp.float32))


def ranker_featurizer(ranker, root) -> rf.RankFeaturizer:
    """The featurizer of a frozen ranking run (``trainers.frozen.Frozen``) over the ``users`` and ``items`` of the
    KuaiSearch folder ``root``."""
    users, items = rf.UserTable.from_rows(ex.read_rows(root, "users")), rf.ItemTable.from_rows(ex.read_rows(root, "items"))
    return rf.RankFeaturizer(ranker.task.feature_config(), users, items)


def candidate_click_probabilities(ranker, featurize: rf.RankFeaturizer, rows: rf.CandidateRows,
                                  contexts: list[dict], items: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """A frozen ranker's click probability of ``items [n, k]`` (item ids, -1: none) proposed in the sessions of
    ``contexts`` (one per row: ``session_id`` and the fallback context of ``CandidateRows.row``: ``user_id``,
    ``query``, ``recently_clicked_item_ids``) -> ``[n, k]`` float32, NaN where there is no item."""
    where = np.argwhere(items >= 0)
    feats = [featurize(rows.row(contexts[i]["session_id"], items[i, j],
                                {k: v for k, v in contexts[i].items() if k != "session_id"})) for i, j in where]
    out = np.full(items.shape, np.nan, np.float32)
    if feats:
        batch = stack(feats)
        out[where[:, 0], where[:, 1]] = ranker.apply(click_probability, *(batch[k] for k in rf.MODEL_INPUTS),
                                                     batch_size=batch_size)
    return out


def _padded(rows: int, multiple: int = 8) -> int:
    """Small tables get spare rows so that their vocab axis splits evenly over the mesh."""
    return -(-rows // multiple) * multiple


@register("kuaisearch_rank")
class KuaiSearchRankTask(Task):
    # --- configuration --------------------------------------------------------------------------------

    def feature_config(self) -> rf.FeatureConfig:
        b, d = self.config.model.id_buckets, self.config.data
        return rf.FeatureConfig(
            user_buckets=b.user, item_buckets=b.item,
            category_buckets=(b.category1, b.category2, b.category3), text_buckets=b.text,
            query_len=d.query_len, title_len=d.title_len, history_len=d.history_len,
            text=d.text, ngrams=tuple(d.ngrams), tokenizer=d.tokenizer)

    def model_config(self) -> RankingConfig:
        m, b = self.config.model, self.config.model.id_buckets
        return RankingConfig(
            name=m.name, embed_dim=m.embed_dim, mlp=tuple(m.mlp), cross_layers=m.cross_layers,
            dcn_structure=m.dcn_structure, attention_mlp=tuple(m.attention_mlp), num_dense=rf.NUM_DENSE,
            user_buckets=b.user, item_buckets=b.item, category_buckets=(b.category1, b.category2, b.category3),
            text_buckets=b.text, gender_buckets=_padded(rf.vocab_size(rf.GENDERS)),
            age_buckets=_padded(rf.vocab_size(rf.AGE_BUCKETS)), entrance_buckets=_padded(rf.vocab_size(rf.ENTRANCES)),
            wide_cross_buckets=b.wide_cross)

    # --- model and loss -------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.model_config(), rngs)

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        logits = model(batch)
        loss = sigmoid_cross_entropy(logits, batch["label"])
        return loss, {"positive_rate": jnp.mean(batch["label"].astype(jnp.float32)),
                      "mean_prediction": jnp.mean(jax.nn.sigmoid(logits.astype(jnp.float32)))}

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """From the config alone (no data needed): paper-scale configs compile without their dataset."""
        return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in self.feature_config().spec().items()}

    # --- data -----------------------------------------------------------------------------------------

    @property
    def progress(self) -> bool:
        return bool(self.config.data.get("progress", True)) and sys.stderr.isatty()

    @functools.cached_property
    def world(self) -> RankWorld:
        return RankWorld.load(self.config.data, self.progress)

    def train_source(self):
        """Rank rows + the featurizer; with ``data.materialize`` (small worlds) the split is featurized
        once into arrays and batches are views of them."""
        if self.config.data.materialize:
            return self.featurized("train")[0], None
        return self.world.train, self.world.featurizer(self.feature_config())

    def featurized(self, split: str) -> tuple[rf.FeaturizedSource, rf.JoinStats]:
        """A split ("train" | "test") featurized once into stacked arrays, and its join misses."""
        return self.world.featurized(split, self.feature_config(), self.config.eval.max_examples, self.progress)

    # --- evaluation -----------------------------------------------------------------------------------

    @functools.cached_property
    def train_positive_rate(self) -> tuple[float, int]:
        """(positive rate of the train split, rows it was counted on): every row up to
        ``data.base_rate_rows``, else that many evenly spaced rows."""
        if self.config.data.materialize:
            labels = self.featurized("train")[0].arrays["label"]
            return float(np.mean(labels)), len(labels)
        return self.world.train_positive_rate(self.config.data.base_rate_rows)

    def predict(self, ctx: EvalContext) -> tuple[np.ndarray, np.ndarray, rf.JoinStats]:
        """(labels, probabilities, join stats) over the evaluated test rows."""
        size = self.config.eval.batch_size
        if self.config.data.materialize:
            source, stats = self.featurized("test")
            batches = source.batches(size)
        else:
            featurize = self.world.featurizer(self.feature_config())
            test = self.world.test_examples(self.config.eval.max_examples)[0]
            batches, stats = eval_batches(test, size, lambda r: featurize(r)), featurize.stats
        labels, probs = [], []
        for batch in batches:
            probs.append(ctx.apply(click_probability, *(batch[k] for k in rf.MODEL_INPUTS), batch_size=size))  # one program
            labels.append(batch["label"])
        return np.concatenate(labels), np.concatenate(probs), stats

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        labels, probs, stats = self.predict(ctx)
        rate, counted = self.train_positive_rate
        out = {
            "logloss": metrics.logloss(labels, probs),
            "roc_auc": metrics.roc_auc(labels, probs),
            "constant/logloss": metrics.logloss(labels, np.full(len(labels), rate)),
            "constant/roc_auc": 0.5,
            "num_examples": float(len(labels)),
            "positive_rate": float(np.mean(labels)),
            "train_positive_rate": rate,
            "train_positive_rate_rows": float(counted),
            "split_by_time_index": float(self.world.rule == "time_index"),
        }
        out["logloss_gain"] = out["constant/logloss"] - out["logloss"]
        out.update({f"join/{k}": float(v) for k, v in stats.as_dict().items()})
        return out
