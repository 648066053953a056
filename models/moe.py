"""Sparse Mixture-of-Experts feed-forward layer: top-k token-choice routing with an expert capacity (GShard,
Switch) or dropless (grouped matmuls, MegaBlocks-style), the Switch load-balancing loss and the ST-MoE
router z-loss.

Parameter layout (float32; logical axis names in parentheses)::

    router     [embed, experts]          ("embed", None)        replicated over the expert axis
    wi_0, wi_1 [experts, embed, mlp]     ("expert", "embed", "mlp")   gated-GELU experts (T5 v1.1 / mT5 MLP)
    wo         [experts, mlp, embed]     ("expert", "mlp", "embed")

Tokens are routed in groups of ``group_size`` consecutive tokens (rows flattened; 0: each batch row a group),
so groups shard like the batch, and the expert capacity is per group: ``C = ceil(capacity_factor * top_k *
S / E)``. A decoding step (one token per row) always routes each row alone: ``C >= 1`` and the top-k experts
are distinct, so serving never drops and a row's result never depends on the other rows of its batch. The capacity path
(``capacity_factor > 0``) dispatches with one-hot einsums (``[G, S, E, C]``). Under the trainer's mesh with
the logical ``expert`` axis mapped to a mesh axis of size > 1 (rule ``expert: expert``), the experts are
split over that axis and the dispatched tokens ``[E, G, C, embed]`` travel by an explicit all-to-all inside
``jax.shard_map`` (each device sends every peer the slots of that peer's experts, runs its own experts,
and sends the results back): left to itself, XLA's partitioner all-gathers every token to every expert
shard instead. Assignments past an expert's capacity are dropped (the token keeps its residual) and
counted. ``capacity_factor = 0`` is the
dropless path: assignments sorted by expert and ``jax.lax.ragged_dot`` grouped matmuls, nothing dropped
(experts replicated or FSDP-sharded there; the expert axis is the capacity path's).

Each layer records its auxiliary terms with ``sow`` (``nnx.Intermediate`` ``moe``) when the caller captures
them: ``out, aux = capture_aux(fn, model, *args)`` runs ``fn(model, *args)`` under ``nnx.capture`` and sums up
the load-balancing and z losses to add to the task loss, the dropped fraction and the per-expert load to
log. Uncaptured calls (decoding, serving) record nothing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.partitioning import active, constrain, logical_to_spec
from models.transformer import activation, param

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25   # C = ceil(cf * top_k * S / E) per group; 0: dropless (grouped matmuls)
    d_ff: int = 256                 # each expert's hidden width
    act: str = "gelu_tanh"          # gated: wo(act(wi_0 x) * wi_1 x)
    normalize_gates: bool = True    # renormalise the top-k router probabilities to sum to 1 (Mixtral, GShard)
    group_size: int = 0             # tokens per routing group for sequences (s > 1); 0: one group per row

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.capacity_factor < 0:
            raise ValueError(f"moe capacity_factor {self.capacity_factor} must be >= 0 (0: dropless)")
        activation(self.act)

    def capacity(self, tokens_per_group: int) -> int:
        return max(1, math.ceil(self.capacity_factor * self.top_k * tokens_per_group / self.num_experts))


@dataclasses.dataclass(frozen=True)
class Route:
    """Top-k choices of every token: ``experts``, ``gates`` ``[G, S, k]`` and the router's ``probs [G, S, E]``."""

    experts: Array
    gates: Array
    probs: Array


def top_k_route(logits: Array, top_k: int, normalize: bool = True) -> Route:
    """Router ``logits [G, S, E]`` -> each token's ``top_k`` experts (distinct, best first) and gate weights."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return Route(experts, gates, probs)


def capacity_dispatch(route: Route, capacity: int, mask: Array | None = None) -> tuple[Array, Array, Array]:
    """GShard's dispatch with a capacity: -> ``dispatch [G, S, E, C]`` (bool), ``combine [G, S, E, C]``
    (gate weights) and ``kept [G, S, k]``. Buffer slots are filled choice-major: every token's first choice
    before any second choice, tokens in sequence order within a choice (GShard Alg. 1); a choice that
    finds its expert full is dropped. ``mask [G, S]`` (False = padding) takes no slot."""
    g, s, k = route.experts.shape
    e = route.probs.shape[-1]
    onehot = jax.nn.one_hot(route.experts, e, dtype=jnp.int32)                       # [G, S, k, E]
    if mask is not None:
        onehot = onehot * mask[:, :, None, None].astype(jnp.int32)
    order = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, e)                         # choice-major
    slot = (jnp.cumsum(order, axis=1) - 1).reshape(g, k, s, e).transpose(0, 2, 1, 3)  # [G, S, k, E]
    slot = jnp.sum(slot * onehot, axis=-1)                                            # [G, S, k]
    kept = (slot < capacity) & (jnp.sum(onehot, axis=-1) > 0)
    place = (onehot[..., None] * jax.nn.one_hot(slot, capacity, dtype=jnp.int32)[..., None, :]
             * kept[..., None, None])                                                 # [G, S, k, E, C]
    dispatch = jnp.sum(place, axis=2) > 0
    combine = jnp.sum(place * route.gates[..., None, None], axis=2)
    return dispatch, combine, kept


def switch_balance_loss(probs: Array, experts: Array, mask: Array | None = None) -> Array:
    """Switch Transformer load-balancing loss (Fedus et al. 2022, Eq. 4): ``E * sum_e f_e * P_e``, ``f_e`` the
    fraction of routing assignments (all top-k choices, before capacity) that go to expert e and ``P_e`` the
    mean router probability of e, over the real tokens. ``probs [G, S, E]``, ``experts [G, S, k]`` -> scalar;
    1 when routing is uniform. (For k = 1 ``f_e`` is Switch's fraction of tokens.)"""
    e = probs.shape[-1]
    w = jnp.ones(probs.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    assigned = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=2)          # [G, S, E]
    f = jnp.einsum("gse,gs->e", assigned, w) / (n * experts.shape[-1])
    p = jnp.einsum("gse,gs->e", probs, w) / n
    return e * jnp.sum(f * p)


def router_z_loss(logits: Array, mask: Array | None = None) -> Array:
    """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): ``mean over tokens of logsumexp(logits)^2``, keeping
    router logits small so the softmax stays in float32's comfortable range. ``logits [G, S, E]`` -> scalar."""
    z = jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
    if mask is None:
        return jnp.mean(z)
    w = mask.astype(jnp.float32)
    return jnp.sum(z * w) / jnp.maximum(jnp.sum(w), 1.0)


class MoE(nnx.Module):
    """A sparse gated-GELU feed-forward layer: ``[b, s, embed] -> [b, s, embed]``; see the module docstring."""

    def __init__(self, d_model: int, cfg: MoEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        e, d, f = cfg.num_experts, d_model, cfg.d_ff
        normal = lambda std: nnx.initializers.normal(std)  # noqa: E731  (T5's init: N(0, fan_in^-1/2))
        self.router = param(rngs, normal(d ** -0.5), (d, e), ("embed", None))
        self.wi_0 = param(rngs, normal(d ** -0.5), (e, d, f), ("expert", "embed", "mlp"))
        self.wi_1 = param(rngs, normal(d ** -0.5), (e, d, f), ("expert", "embed", "mlp"))
        self.wo = param(rngs, normal(f ** -0.5), (e, f, d), ("expert", "mlp", "embed"))

    def experts(self, x: Array) -> Array:
        """The capacity path's expert MLPs: ``[E, G, C, embed] -> [E, G, C, embed]``, over the ``expert`` mesh
        axis when there is one (``expert_parallel``)."""
        weights = (self.wi_0[...].astype(self.dtype), self.wi_1[...].astype(self.dtype), self.wo[...].astype(self.dtype))
        ctx = active()
        if ctx is not None:
            mesh, rules = ctx
            axes = [a for a in rules.get("expert", ()) if mesh.shape.get(a, 1) > 1]
            batch = logical_to_spec(("batch",), rules)[0]
            shards = math.prod(mesh.shape[a] for a in (batch if isinstance(batch, tuple) else (batch,)) if a)
            if axes and x.shape[1] % shards == 0:  # else (groups fewer than batch shards) XLA's own partitioning
                return expert_parallel(x, weights, mesh, axes[0], batch, self.cfg.act)
        return expert_mlp(x, weights, self.cfg.act)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x [b, s, embed], mask [b, s] (False = padding: routed nowhere, counted nowhere) -> [b, s, embed]."""
        cfg, dt = self.cfg, self.dtype
        shape = x.shape
        if cfg.group_size and shape[1] > 1 and (shape[0] * shape[1]) % cfg.group_size == 0:
            x = x.reshape(-1, cfg.group_size, shape[-1])
            mask = None if mask is None else mask.reshape(x.shape[:2])
        x = x.astype(dt)
        logits = jnp.einsum("gsd,de->gse", x, self.router[...].astype(dt), preferred_element_type=jnp.float32)
        route = top_k_route(logits, cfg.top_k, cfg.normalize_gates)
        if cfg.capacity_factor > 0:
            dispatch, combine, kept = capacity_dispatch(route, cfg.capacity(x.shape[1]), mask)
            routed = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dt), x)
            y = jnp.einsum("gsec,egcd->gsd", combine.astype(dt), self.experts(routed))
        else:
            y, kept = self.dropless(x, route, mask)
        if hasattr(self, "__captures__"):  # inside nnx.capture (capture_aux): record the auxiliary terms
            self.record(logits, route, kept, mask)
        return constrain(y.astype(dt).reshape(shape), ("batch", "seq", "embed"))

    def record(self, logits: Array, route: Route, kept: Array, mask: Array | None) -> None:
        cfg = self.cfg
        real = jnp.ones(logits.shape[:2], bool) if mask is None else mask.astype(bool)
        assigned = jnp.sum(real) * cfg.top_k
        load = jnp.sum(jax.nn.one_hot(route.experts, cfg.num_experts) * real[..., None, None], axis=(0, 1, 2))
        self.sow(nnx.Intermediate, "moe", {
            "balance_loss": switch_balance_loss(route.probs, route.experts, mask),
            "z_loss": router_z_loss(logits, mask),
            "dropped": assigned - jnp.sum(kept & real[..., None]),
            "assigned": assigned.astype(jnp.float32),
            "load": load / jnp.maximum(assigned, 1),
        })

    def dropless(self, x: Array, route: Route, mask: Array | None) -> tuple[Array, Array]:
        """Every assignment computed: tokens sorted by expert, ``ragged_dot`` over the experts' groups.
        ``x [G, S, d]`` -> (``[G, S, d]``, kept ``[G, S, k]`` all True)."""
        cfg, dt = self.cfg, self.dtype
        g, s, d = x.shape
        k, e = cfg.top_k, cfg.num_experts
        experts = route.experts.reshape(-1)                                              # [G S k]
        gates = route.gates.reshape(-1)
        if mask is not None:  # padding: its assignments are computed, with weight 0
            gates = gates * jnp.repeat(mask.reshape(-1).astype(gates.dtype), k)
        order = jnp.argsort(experts, stable=True)
        tokens = jnp.repeat(x.reshape(g * s, d), k, axis=0)[order]                       # [G S k, d]
        sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
        act = activation(cfg.act)
        h = act(jax.lax.ragged_dot(tokens, self.wi_0[...].astype(dt), sizes)) * jax.lax.ragged_dot(
            tokens, self.wi_1[...].astype(dt), sizes)
        out = jax.lax.ragged_dot(h, self.wo[...].astype(dt), sizes)                      # [G S k, d]
        out = jnp.zeros_like(out).at[order].set(out) * gates[:, None].astype(dt)
        return jnp.sum(out.reshape(g, s, k, d), axis=2), jnp.ones((g, s, k), bool)


def expert_mlp(x: Array, weights: tuple[Array, Array, Array], act: str) -> Array:
    """Gated expert MLPs ``wo(act(wi_0 x) * wi_1 x)``: ``x [E, G, C, d]``, ``wi_* [E, d, f]``, ``wo [E, f, d]``."""
    wi_0, wi_1, wo = weights
    h = activation(act)(jnp.einsum("egcd,edf->egcf", x, wi_0)) * jnp.einsum("egcd,edf->egcf", x, wi_1)
    return jnp.einsum("egcf,efd->egcd", h, wo)


def expert_parallel(x: Array, weights: tuple[Array, Array, Array], mesh, axis: str, batch_axes, act: str) -> Array:
    """``expert_mlp`` with the experts split over mesh axis ``axis`` and the groups over ``batch_axes``:
    ``x [E, G, C, d]`` -> ``[E, G, C, d]``. Per device: ``[E, G_local, C, d]`` -all_to_all-> ``[E_local,
    n G_local, C, d]`` (its experts' slots from every peer), the local experts, and the way back."""
    groups = jax.P(None, batch_axes)

    def local(x, wi_0, wi_1, wo):
        x = jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=1, tiled=True)
        y = expert_mlp(x, (wi_0, wi_1, wo), act)
        return jax.lax.all_to_all(y, axis, split_axis=1, concat_axis=0, tiled=True)

    experts = jax.P(axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(groups, experts, experts, experts), out_specs=groups)(x, *weights)


def capture_aux(fn, model: nnx.Module, *args):
    """``fn(model, *args)`` -> ``(its output, aux)``: every MoE layer's terms of that call, ``balance_loss``,
    ``z_loss`` (means over the layers), ``dropped_fraction`` and ``expert_load [E]`` (the mean share of
    assignments per expert; 1/E each when balanced). ``aux`` is empty when the model has no MoE layer."""
    out, sown = nnx.capture(fn, nnx.Intermediate)(model, *args)
    terms = [t for t in jax.tree.leaves(sown, is_leaf=lambda x: isinstance(x, dict) and "z_loss" in x)
             if isinstance(t, dict)]
    if not terms:
        return out, {}
    mean = lambda key: sum(t[key] for t in terms) / len(terms)  # noqa: E731
    return out, {"balance_loss": mean("balance_loss"), "z_loss": mean("z_loss"), "expert_load": mean("load"),
                 "dropped_fraction": sum(t["dropped"] for t in terms) / jnp.maximum(sum(t["assigned"] for t in terms), 1)}
