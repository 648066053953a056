"""KuaiSearch ranking: CTR prediction (label = clicked or purchased) with DNN, Wide&Deep, DCN, DCNv2 or DIN.

    ecomax train --config configs/kuaisearch_rank.py:tiny --workdir runs/rank --set model.name=din

Data (``config.data``): ``root`` empty -> a synthetic world (``data.synthetic``) generated, prepared and
cached on first use (``data_pipelines/cache.py``); otherwise ``root`` is a KuaiSearch folder (the
released Lite layout ``rank_lite/ users_lite/ items_lite/ ...``, the demo layout, or an already prepared
TFDS folder). Rank rows are read from the prepared ArrayRecord dataset (prepared once into
``data.prepared_dir`` or the cache); the users / items tables (``rank_features.UserTable``/``ItemTable``)
are built once from the JSONL files and cached as ``.npy``. The train / test split follows
``rank_features.assign_split`` (the ``split`` field when it separates rows, else the last 10% by
``time_index``); a time-based split is computed once and cached.

Evaluation (``evaluate``): on the test split, ``logloss`` and ``roc_auc`` of the model, and the constant
predictor alongside: ``constant/logloss`` = log loss of always predicting the train positive rate,
``constant/roc_auc`` = 0.5; ``logloss_gain`` = constant minus model (positive = better than constant);
plus the test size, positive rates and the join misses of the test rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.cache import cached_dataset
from data_pipelines.kuaisearch import records, schema
from data_pipelines.kuaisearch import rank_features as rf
from data_pipelines.loader import eval_batches
from models.ranking import RankingConfig, build_model
from trainers.evaluators import metrics
from trainers.losses import sigmoid_cross_entropy
from trainers.tasks import Batch, EvalContext, Metrics, Task, register

TABLES_VERSION = 1


def _predict(model: nnx.Module, *arrays: jax.Array) -> jax.Array:
    """Click probability ``[b]`` from the model inputs in ``rank_features.MODEL_INPUTS`` order."""
    return jax.nn.sigmoid(model(dict(zip(rf.MODEL_INPUTS, arrays))).astype(jnp.float32))


def _padded(rows: int, multiple: int = 8) -> int:
    """Small tables get spare rows so that their vocab axis splits evenly over the mesh."""
    return -(-rows // multiple) * multiple


def _is_prepared(root: pathlib.Path, kind: str) -> bool:
    return (root / records.dataset_name(kind) / records.VERSION / "dataset_info.json").is_file()


def _fingerprint(root: pathlib.Path, kinds: tuple[str, ...]) -> list:
    """Names, sizes and mtimes of the source files (a cache key that changes when the data does)."""
    out = []
    for kind in kinds:
        if _is_prepared(root, kind):
            info = root / records.dataset_name(kind) / records.VERSION / "dataset_info.json"
            out.append([kind, str(info), info.stat().st_size, info.stat().st_mtime_ns])
            continue
        for p in schema.find_source_files(root, kind):
            st = p.stat()
            out.append([kind, str(p), st.st_size, st.st_mtime_ns])
    return out


def _table_rows(root: pathlib.Path, prepared: pathlib.Path, kind: str):
    """Validated rows of users / items: the JSONL files when present, else the prepared dataset."""
    try:
        schema.find_source_files(root, kind)
    except FileNotFoundError:
        from data_pipelines.kuaisearch.reader import open_split  # noqa: PLC0415

        yield from iter(open_split(prepared, kind, None))
        return
    yield from rf.iter_jsonl(root, kind)


def _build_tables(root: pathlib.Path, prepared: pathlib.Path, out: pathlib.Path, progress: bool) -> None:
    rf.UserTable.from_rows(_table_rows(root, prepared, "users"), progress=progress).save(out / "users")
    rf.ItemTable.from_rows(_table_rows(root, prepared, "items"), progress=progress).save(out / "items")


def _prepare_rank(root: pathlib.Path, out: pathlib.Path, workers: int, progress: bool) -> None:
    from data_pipelines.kuaisearch.prepare import prepare  # noqa: PLC0415

    prepare(root, out, kinds=["rank"], workers=workers, progress=progress, verbose=False)


@dataclasses.dataclass
class RankWorld:
    """Everything the task reads: the train / test sources, the tables, the split rule."""

    root: pathlib.Path
    prepared: pathlib.Path
    tables: pathlib.Path
    train: Any
    test: Any
    rule: str

    def featurizer(self, cfg: rf.FeatureConfig) -> rf.RankFeaturizer:
        return rf.RankFeaturizer(cfg, rf.UserTable.load(self.tables / "users"),
                                 rf.ItemTable.load(self.tables / "items"))


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

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """From the config alone (no data needed): paper-scale configs compile without their dataset."""
        return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
                for k, (shape, dtype) in self.feature_config().spec().items()}

    # --- data -----------------------------------------------------------------------------------------

    @functools.cached_property
    def world(self) -> RankWorld:
        d = self.config.data
        progress = bool(d.get("progress", True)) and sys.stderr.isatty()
        if not d.root:
            return self._synthetic_world(progress)
        root = pathlib.Path(d.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} is not a folder: point it at the KuaiSearch "
                                    "release (rank_lite/ users_lite/ items_lite/ ...) or a prepared folder")
        if _is_prepared(root, "rank"):
            prepared = root
        elif d.prepared_dir:
            prepared = pathlib.Path(d.prepared_dir).expanduser()
            if not _is_prepared(prepared, "rank"):
                _prepare_rank(root, prepared, d.prepare_workers or os.cpu_count() or 1, progress)
        else:
            prepared = cached_dataset("kuaisearch_rank_prepared",
                                      {"root": str(root.resolve()), "files": _fingerprint(root, ("rank",))},
                                      lambda out: _prepare_rank(root, out, d.prepare_workers or os.cpu_count() or 1,
                                                                progress))
        tables = cached_dataset("kuaisearch_rank_tables",
                                {"version": TABLES_VERSION, "root": str(root.resolve()),
                                 "files": _fingerprint(root, ("users", "items"))},
                                lambda out: _build_tables(root, prepared, out, progress))
        return self._split_world(root, prepared, tables, progress)

    def _synthetic_world(self, progress: bool) -> RankWorld:
        s = self.config.data.synthetic
        params = {"num_users": s.num_users, "num_items": s.num_items, "num_sessions": s.num_sessions,
                  "seed": s.seed, "test_fraction": s.test_fraction, "tables": TABLES_VERSION}

        def build(out: pathlib.Path) -> None:
            from data_pipelines.kuaisearch.synthetic import synthesize  # noqa: PLC0415

            synthesize(out / "raw", num_users=s.num_users, num_items=s.num_items, num_sessions=s.num_sessions,
                       seed=s.seed, test_fraction=s.test_fraction)
            _prepare_rank(out / "raw", out / "prepared", 1, False)
            _build_tables(out / "raw", out / "prepared", out / "tables", False)

        folder = cached_dataset("kuaisearch_rank_synth", params, build)
        return self._split_world(folder / "raw", folder / "prepared", folder / "tables", progress)

    def _split_world(self, root: pathlib.Path, prepared: pathlib.Path, tables: pathlib.Path,
                     progress: bool) -> RankWorld:
        from data_pipelines.kuaisearch.reader import available_splits, open_split  # noqa: PLC0415

        fraction = self.config.data.test_fraction
        splits = available_splits(prepared, "rank")
        if splits.get("train", 0) > 0 and splits.get("test", 0) > 0:
            return RankWorld(root, prepared, tables, open_split(prepared, "rank", "train"),
                             open_split(prepared, "rank", "test"), "split_field")
        every = open_split(prepared, "rank", None)

        def build(out: pathlib.Path) -> None:
            cols = rf.scan_fields(every, ("split", "time_index"), progress=progress)
            split = rf.assign_split(cols["split"], cols["time_index"], fraction)
            np.save(out / "train.npy", split.train, allow_pickle=False)
            np.save(out / "test.npy", split.test, allow_pickle=False)
            (out / "rule.txt").write_text(split.rule)

        folder = cached_dataset("kuaisearch_rank_split", {"prepared": str(prepared.resolve()), "rows": len(every),
                                                          "splits": splits, "test_fraction": fraction}, build)
        train, test = (np.load(folder / f"{s}.npy", allow_pickle=False) for s in ("train", "test"))
        return RankWorld(root, prepared, tables, rf.IndexedSource(every, train), rf.IndexedSource(every, test),
                         (folder / "rule.txt").read_text())

    def train_source(self):
        """Rank rows + the featurizer; with ``data.materialize`` (small worlds) the split is featurized
        once into arrays and batches are views of them."""
        if self.config.data.materialize:
            return self.featurized("train")[0], None
        return self.world.train, self.world.featurizer(self.feature_config())

    @functools.cached_property
    def _featurized(self) -> dict:
        return {}

    def featurized(self, split: str) -> tuple[rf.FeaturizedSource, rf.JoinStats]:
        """A split ("train" | "test") featurized once into stacked arrays, and the join misses counted
        while doing it."""
        if split in self._featurized:
            return self._featurized[split]
        source = self.world.train if split == "train" else self.test_examples()[0]
        featurize = self.world.featurizer(self.feature_config())
        progress = bool(self.config.data.get("progress", True)) and sys.stderr.isatty()
        self._featurized[split] = rf.FeaturizedSource(source, featurize, progress=progress), featurize.stats
        return self._featurized[split]

    # --- evaluation -----------------------------------------------------------------------------------

    @functools.cached_property
    def train_positive_rate(self) -> tuple[float, int]:
        """(positive rate of the train split, rows it was counted on): every row up to
        ``data.base_rate_rows``, else that many evenly spaced rows."""
        if self.config.data.materialize:
            labels = self.featurized("train")[0].arrays["label"]
            return float(np.mean(labels)), len(labels)
        train = self.world.train
        n, cap = len(train), self.config.data.base_rate_rows
        idx = np.arange(n) if not cap or n <= cap else np.linspace(0, n - 1, cap).astype(np.int64)
        labels = []
        for s in range(0, len(idx), 4096):
            labels += [rf.label_of(r) for r in train.__getitems__(idx[s:s + 4096].tolist())]
        return float(np.mean(labels)), len(labels)

    def test_examples(self) -> tuple[Any, np.ndarray]:
        """The (capped) test rows and their indices in the test split."""
        test = self.world.test
        n, cap = len(test), self.config.data.max_eval_examples
        idx = np.arange(n) if not cap or n <= cap else np.linspace(0, n - 1, cap).astype(np.int64)
        return rf.IndexedSource(test, idx), idx

    def predict(self, ctx: EvalContext) -> tuple[np.ndarray, np.ndarray, rf.JoinStats]:
        """(labels, probabilities, join stats) over the evaluated test rows."""
        size = self.config.data.eval_batch_size
        if self.config.data.materialize:
            source, stats = self.featurized("test")
            batches = source.batches(size)
        else:
            featurize = self.world.featurizer(self.feature_config())
            batches, stats = eval_batches(self.test_examples()[0], size, lambda r: featurize(r)), featurize.stats
        labels, probs = [], []
        for batch in batches:
            probs.append(ctx.apply(_predict, *(batch[k] for k in rf.MODEL_INPUTS)))
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
