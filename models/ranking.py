"""CTR ranking models for KuaiSearch: DNN, Wide&Deep, DCN, DCNv2 and DIN over one shared embedding layer.

Inputs are the feature dict of ``data_pipelines/kuaisearch/rank_features.py`` (batch first)::

    user_id, user_gender, user_age, entrance, item_id  [b] int32     item_cats [b, 3] int32
    hist_ids [b, H] int32   hist_cats [b, H, 3] int32   hist_mask [b, H] bool
    query_tokens [b, Lq] int32   title_tokens [b, Lt] int32 (0 = padding)   dense [b, 10] float32 (log1p)

Every model maps them to one logit per example, ``[b]``; the loss is sigmoid cross-entropy.

``Embeddings`` (shared by all five): one table per id feature (user id, gender, age, entrance, item id,
category level 1/2/3) and one text table shared by query and title tokens, each ``[buckets, d]`` with
logical axes ``("vocab", "embed")`` so large tables shard over the tensor / fsdp mesh axes. An item
(target or history) is ``[id ⊕ cat1 ⊕ cat2 ⊕ cat3]`` (``4d``); query and title are mean-pooled token
embeddings; the 10 dense features pass through a learnable per-feature affine (initialised to ×0.1,
putting ``log1p`` counts of 0..~15 on the embedding scale). The input of the deep and cross parts is

    x0 = [user ⊕ gender ⊕ age ⊕ entrance ⊕ item(4d) ⊕ history(4d) ⊕ query ⊕ title ⊕ dense]   (14d + 10)

with ``history`` the masked mean of the 20 history items (the "Embedding&MLP base model" of DIN), or
DIN's attention pooling. ``build_model(config)`` picks the class by ``config.name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import constrain

Array = jax.Array
Batch = Mapping[str, Array]

MODEL_NAMES = ("dnn", "wide_deep", "dcn", "dcnv2", "din")
NUM_FIELDS = 14  # embedding slots of x0: 4 user/context + 4 item + 4 history + query + title

EMBED_INIT = nnx.initializers.normal(0.05)
DENSE_INIT = nnx.initializers.lecun_normal()
ZEROS = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    name: str = "dnn"
    embed_dim: int = 16
    mlp: tuple[int, ...] = (256, 128, 64)
    cross_layers: int = 3
    dcn_structure: str = "parallel"  # DCNv2: "stacked" (cross then deep) | "parallel" (side by side)
    attention_mlp: tuple[int, ...] = (64, 32)
    num_dense: int = 10
    # buckets (rows) of each table; bucket 0 is the data layer's "unknown"
    user_buckets: int = 1024
    item_buckets: int = 8192
    category_buckets: tuple[int, int, int] = (64, 256, 1024)
    text_buckets: int = 8192
    gender_buckets: int = 4
    age_buckets: int = 9
    entrance_buckets: int = 4
    wide_cross_buckets: int = 65536

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown ranking model {self.name!r}; expected one of {MODEL_NAMES}")
        if self.dcn_structure not in ("stacked", "parallel"):
            raise ValueError(f"dcn_structure must be 'stacked' or 'parallel', got {self.dcn_structure!r}")

    @property
    def input_dim(self) -> int:
        return NUM_FIELDS * self.embed_dim + self.num_dense


# ----------------------------------------------------------------------------- building blocks


def _embed(rows: int, dim: int, rngs: nnx.Rngs, init=EMBED_INIT) -> nnx.Embed:
    """A ``[rows, dim]`` table, ``("vocab", "embed")``; a one-column (wide) table is ``("vocab", None)``."""
    names = ("vocab", "embed") if dim > 1 else ("vocab", None)
    return nnx.Embed(rows, dim, rngs=rngs, embedding_init=nnx.with_partitioning(init, names))


def _linear(d_in: int, d_out: int, names: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, rngs=rngs, kernel_init=nnx.with_partitioning(DENSE_INIT, names),
                      bias_init=nnx.with_partitioning(ZEROS, names[1:]))


class PReLU(nnx.Module):
    """``max(0, x) + a * min(0, x)`` with a learnable slope per unit (DIN's activation, without Dice's
    batch statistics: models here hold parameters only)."""

    def __init__(self, units: int, rngs: nnx.Rngs):
        self.alpha = nnx.Param(jnp.full((units,), 0.25, jnp.float32), out_sharding=("mlp",))

    def __call__(self, x: Array) -> Array:
        return jnp.where(x >= 0, x, self.alpha[...].astype(x.dtype) * x)


class MLP(nnx.Module):
    """``[..., d_in] -> [..., hidden[-1]]``: Linear + activation per layer (ReLU or PReLU)."""

    def __init__(self, d_in: int, hidden: Sequence[int], rngs: nnx.Rngs, prelu: bool = False):
        dims = (d_in, *hidden)
        self.layers = nnx.List([_linear(a, b, (None, "mlp"), rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.acts = nnx.List([PReLU(b, rngs) for b in hidden]) if prelu else None
        self.out_dim = dims[-1]

    def __call__(self, x: Array) -> Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = self.acts[i](x) if self.acts is not None else jax.nn.relu(x)
        return x


def masked_mean(x: Array, mask: Array) -> Array:
    """``[b, n, d], [b, n] -> [b, d]``: mean over the true positions (0 when there are none)."""
    w = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


@dataclasses.dataclass
class Fields:
    """The embedded example: what every model head starts from."""

    user: Array  # [b, 4d]: user id, gender, age, entrance
    item: Array  # [b, 4d]: target item id + 3 categories
    history: Array  # [b, H, 4d]
    history_mask: Array  # [b, H] bool
    query: Array  # [b, d]
    title: Array  # [b, d]
    dense: Array  # [b, num_dense]

    def x0(self, history: Array) -> Array:
        """``[b, 14d + num_dense]``: the concatenated input of the deep and cross parts."""
        return jnp.concatenate([self.user, self.item, history, self.query, self.title, self.dense], axis=-1)


class Embeddings(nnx.Module):
    """Feature dict -> ``Fields`` (the shared embedding layer, see the module docstring)."""

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.user = _embed(cfg.user_buckets, d, rngs)
        self.gender = _embed(cfg.gender_buckets, d, rngs)
        self.age = _embed(cfg.age_buckets, d, rngs)
        self.entrance = _embed(cfg.entrance_buckets, d, rngs)
        self.item = _embed(cfg.item_buckets, d, rngs)
        self.cats = nnx.List([_embed(b, d, rngs) for b in cfg.category_buckets])
        self.text = _embed(cfg.text_buckets, d, rngs)
        self.dense_scale = nnx.Param(jnp.full((cfg.num_dense,), 0.1, jnp.float32), out_sharding=(None,))
        self.dense_bias = nnx.Param(jnp.zeros((cfg.num_dense,), jnp.float32), out_sharding=(None,))

    def items(self, ids: Array, cats: Array) -> Array:
        """``[...] ids, [..., 3] categories -> [..., 4d]``."""
        return jnp.concatenate([self.item(ids), *(emb(cats[..., j]) for j, emb in enumerate(self.cats))], -1)

    def text_pool(self, tokens: Array) -> Array:
        """``[b, L]`` token ids (0 = padding) -> ``[b, d]`` mean of the token embeddings."""
        return masked_mean(self.text(tokens), tokens > 0)

    def __call__(self, batch: Batch) -> Fields:
        user = jnp.concatenate([self.user(batch["user_id"]), self.gender(batch["user_gender"]),
                                self.age(batch["user_age"]), self.entrance(batch["entrance"])], -1)
        history = constrain(self.items(batch["hist_ids"], batch["hist_cats"]), ("batch", None, None))
        dense = batch["dense"] * self.dense_scale[...] + self.dense_bias[...]
        return Fields(user=constrain(user, ("batch", None)), item=self.items(batch["item_id"], batch["item_cats"]),
                      history=history, history_mask=batch["hist_mask"],
                      query=self.text_pool(batch["query_tokens"]), title=self.text_pool(batch["title_tokens"]),
                      dense=dense.astype(user.dtype))


def _head(d_in: int, rngs: nnx.Rngs) -> nnx.Linear:
    return _linear(d_in, 1, (None, None), rngs)


# ----------------------------------------------------------------------------- the five models


class DNN(nnx.Module):
    """Embedding & MLP (the "base model" of Zhou et al. 2018 and the deep part of Cheng et al. 2016):
    ``logit = w^T MLP(x0) + b`` with the history mean-pooled."""

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.mlp = MLP(cfg.input_dim, cfg.mlp, rngs)
        self.out = _head(self.mlp.out_dim, rngs)

    def __call__(self, batch: Batch) -> Array:
        f = self.embed(batch)
        x0 = f.x0(masked_mean(f.history, f.history_mask))
        return self.out(self.mlp(x0))[:, 0]


def _mix(*parts: Array, salt: int) -> Array:
    """Hash of integer arrays (broadcast together) as uint32: a cross feature's id before the modulo."""
    h = jnp.full(jnp.broadcast_shapes(*(p.shape for p in parts)), salt * 0x9E3779B1 & 0xFFFFFFFF, jnp.uint32)
    for p in parts:
        h = (h ^ p.astype(jnp.uint32)) * jnp.uint32(0x01000193)  # FNV-1a step
        h = h ^ (h >> 15)
    return h


class WideDeep(nnx.Module):
    """Wide & Deep (Cheng et al. 2016, Eq. 3): ``P(y=1|x) = σ(w_wide^T [x, φ(x)] + w_deep^T a^(lf) + b)``.

    Wide part: a linear model over the sparse features ``x`` (one scalar weight per id bucket: user, gender,
    age, entrance, item, categories, and the mean weight of the query and title tokens), the dense
    features, and cross-product transformations ``φ(x)`` hashed into ``wide_cross_buckets``: gender×age×cat1,
    age×cat2, entrance×cat1, user×cat1, user×cat2, item×gender, and query-token×cat3 (averaged over the
    query's tokens). Deep part: the ``DNN`` MLP. Both are trained jointly on the summed logit (one optimizer
    here; the paper used FTRL+L1 for the wide part and AdaGrad for the deep part).
    """

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.mlp = MLP(cfg.input_dim, cfg.mlp, rngs)
        self.out = _head(self.mlp.out_dim, rngs)
        one = lambda rows: _embed(rows, 1, rngs, ZEROS)  # noqa: E731
        self.w_user, self.w_gender, self.w_age = one(cfg.user_buckets), one(cfg.gender_buckets), one(cfg.age_buckets)
        self.w_entrance, self.w_item = one(cfg.entrance_buckets), one(cfg.item_buckets)
        self.w_cats = nnx.List([one(b) for b in cfg.category_buckets])
        self.w_text = one(cfg.text_buckets)
        self.w_cross = one(cfg.wide_cross_buckets)
        self.w_dense = nnx.Param(jnp.zeros((cfg.num_dense,), jnp.float32), out_sharding=(None,))
        self.cross_buckets = cfg.wide_cross_buckets

    def crosses(self, batch: Batch) -> tuple[Array, Array]:
        """Hashed cross-feature ids: ``[b, 6]`` single crosses and ``[b, Lq]`` query-token × cat3."""
        g, a, e, u, i = (batch[k] for k in ("user_gender", "user_age", "entrance", "user_id", "item_id"))
        c1, c2, c3 = (batch["item_cats"][:, j] for j in range(3))
        single = jnp.stack([_mix(g, a, c1, salt=1), _mix(a, c2, salt=2), _mix(e, c1, salt=3),
                            _mix(u, c1, salt=4), _mix(u, c2, salt=5), _mix(i, g, salt=6)], axis=-1)
        q = batch["query_tokens"]
        query_cat = _mix(q, c3[:, None], salt=7)
        mod = jnp.uint32(self.cross_buckets)
        return (single % mod).astype(jnp.int32), (query_cat % mod).astype(jnp.int32)

    def wide(self, batch: Batch, dense: Array) -> Array:
        """``[b]`` logit of the linear part."""
        terms = [self.w_user(batch["user_id"]), self.w_gender(batch["user_gender"]), self.w_age(batch["user_age"]),
                 self.w_entrance(batch["entrance"]), self.w_item(batch["item_id"]),
                 *(w(batch["item_cats"][:, j]) for j, w in enumerate(self.w_cats)),
                 masked_mean(self.w_text(batch["query_tokens"]), batch["query_tokens"] > 0),
                 masked_mean(self.w_text(batch["title_tokens"]), batch["title_tokens"] > 0)]
        single, query_cat = self.crosses(batch)
        cross = jnp.sum(self.w_cross(single)[..., 0], -1) + masked_mean(self.w_cross(query_cat),
                                                                         batch["query_tokens"] > 0)[:, 0]
        return sum(t[:, 0] for t in terms) + cross + dense @ self.w_dense[...].astype(dense.dtype)

    def __call__(self, batch: Batch) -> Array:
        f = self.embed(batch)
        x0 = f.x0(masked_mean(f.history, f.history_mask))
        return self.out(self.mlp(x0))[:, 0] + self.wide(batch, f.dense)


class CrossNetV1(nnx.Module):
    """DCN's cross network (Wang et al. 2017, Eq. 3): ``x_{l+1} = x0 (x_l^T w_l) + b_l + x_l``.

    ``[b, d0] -> [b, d0]``; each layer adds ``2 d0`` parameters (a rank-one cross of x0 with x_l).
    """

    def __init__(self, dim: int, layers: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(dim ** -0.5)
        self.w = nnx.Param(init(rngs.params(), (layers, dim), jnp.float32), out_sharding=("layers", None))
        self.b = nnx.Param(jnp.zeros((layers, dim), jnp.float32), out_sharding=("layers", None))

    def __call__(self, x0: Array) -> Array:
        x = x0
        for layer in range(self.w.shape[0]):
            w, b = self.w[layer].astype(x.dtype), self.b[layer].astype(x.dtype)
            x = x0 * (x @ w)[:, None] + b + x
        return x


class DCN(nnx.Module):
    """Deep & Cross Network (Wang et al. 2017): the cross network (Eq. 3) in parallel with the deep MLP,
    combined by ``p = σ(w_logits^T [x_L1 ⊕ h_L2] + b_logits)`` (Eq. 5)."""

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.cross = CrossNetV1(cfg.input_dim, cfg.cross_layers, rngs)
        self.mlp = MLP(cfg.input_dim, cfg.mlp, rngs)
        self.out = _head(cfg.input_dim + self.mlp.out_dim, rngs)

    def __call__(self, batch: Batch) -> Array:
        f = self.embed(batch)
        x0 = f.x0(masked_mean(f.history, f.history_mask))
        return self.out(jnp.concatenate([self.cross(x0), self.mlp(x0)], -1))[:, 0]


class CrossNetV2(nnx.Module):
    """DCN-V2's cross layers (Wang et al. 2021, Eq. 1): ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l``, full-rank
    ``W_l`` of ``[d0, d0]``. ``[b, d0] -> [b, d0]``."""

    def __init__(self, dim: int, layers: int, rngs: nnx.Rngs):
        self.layers = nnx.List([_linear(dim, dim, (None, None), rngs) for _ in range(layers)])

    def __call__(self, x0: Array) -> Array:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(nnx.Module):
    """DCN-V2 (Wang et al. 2021, Fig. 1): the cross network of Eq. 1 and the deep MLP either *stacked*
    (``logit = w^T MLP(Cross(x0))``) or in *parallel* (``logit = w^T [Cross(x0) ⊕ MLP(x0)]``)."""

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.structure = cfg.dcn_structure
        self.cross = CrossNetV2(cfg.input_dim, cfg.cross_layers, rngs)
        self.mlp = MLP(cfg.input_dim, cfg.mlp, rngs)
        head_in = self.mlp.out_dim + (cfg.input_dim if self.structure == "parallel" else 0)
        self.out = _head(head_in, rngs)

    def __call__(self, batch: Batch) -> Array:
        f = self.embed(batch)
        x0 = f.x0(masked_mean(f.history, f.history_mask))
        if self.structure == "stacked":
            return self.out(self.mlp(self.cross(x0)))[:, 0]
        return self.out(jnp.concatenate([self.cross(x0), self.mlp(x0)], -1))[:, 0]


class AttentionUnit(nnx.Module):
    """DIN's local activation unit (Zhou et al. 2018, Fig. 2 and Eq. 3):

        v_U(A) = Σ_j a(e_j, v_A) e_j,   a(e_j, v_A) = MLP([e_j, v_A, e_j − v_A, e_j ⊙ v_A])

    over the history items ``e_j`` given the target ``v_A``; the weights are *not* softmax-normalised (the
    paper keeps the intensity of the user's interest), and padded slots get weight 0.
    ``[b, H, D], [b, D], [b, H] -> [b, D]`` (and the weights ``[b, H]``).
    """

    def __init__(self, dim: int, hidden: Sequence[int], rngs: nnx.Rngs):
        self.mlp = MLP(4 * dim, hidden, rngs, prelu=True)
        self.out = _head(self.mlp.out_dim, rngs)

    def __call__(self, history: Array, target: Array, mask: Array) -> tuple[Array, Array]:
        t = jnp.broadcast_to(target[:, None, :], history.shape)
        weights = self.out(self.mlp(jnp.concatenate([history, t, history - t, history * t], -1)))[..., 0]
        weights = jnp.where(mask, weights, 0.0)
        return jnp.einsum("bh,bhd->bd", weights, history), weights


class DIN(nnx.Module):
    """Deep Interest Network (Zhou et al. 2018): the history is pooled by the target-aware activation unit
    (``AttentionUnit``) instead of a mean; the rest is the Embedding&MLP model with PReLU activations."""

    def __init__(self, cfg: RankingConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.attention = AttentionUnit(4 * cfg.embed_dim, cfg.attention_mlp, rngs)
        self.mlp = MLP(cfg.input_dim, cfg.mlp, rngs, prelu=True)
        self.out = _head(self.mlp.out_dim, rngs)

    def __call__(self, batch: Batch) -> Array:
        f = self.embed(batch)
        interest, _ = self.attention(f.history, f.item, f.history_mask)
        return self.out(self.mlp(f.x0(interest)))[:, 0]


MODELS: dict[str, Callable[[RankingConfig, nnx.Rngs], nnx.Module]] = {
    "dnn": DNN, "wide_deep": WideDeep, "dcn": DCN, "dcnv2": DCNv2, "din": DIN,
}


def build_model(cfg: RankingConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The ranking model named by ``cfg.name``."""
    return MODELS[cfg.name](cfg, rngs)

