"""TIGER-FG losses: query->item contrast with hard negatives, region–text and item–region alignment,
and the dual distillation (spatial relation, similarity distribution).

Conventions: embeddings are L2-normalised, ``scale`` is an inverse temperature (``exp(logit_scale)``),
every loss returns a scalar mean over its valid anchors. Masks are bool (True = valid / attend).

``q2i_loss`` is written for large global batches: under the trainer's ``activation_rules`` (a mesh
in context) it runs as a ``jax.shard_map`` over the batch axes (``trainers.mesh.BATCH_AXES``): each device
all-gathers the item embeddings and builds only its own ``[b_local, B]`` logits, then the loss is a
``psum``. Memory per device grows with ``b_local * B``, never with ``B * B``. Outside a mesh (plain
calls, tests) it runs the same maths densely.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models import partitioning
from trainers.mesh import BATCH_AXES  # the batch split of every input ("fsdp", "data"), in that order
_NEG = -1e9


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _q2i_rows(q, item, hard, q_ids, item_ids, hard_ids, row_offset, scale):
    """Loss rows of local queries against all (gathered) items and hard negatives.

    q [b, D], item / hard [B, D], q_ids [b], item_ids / hard_ids [B] (item index; equal ids are the
    same product, so they are masked as false negatives except on the diagonal), row_offset: global
    index of local row 0 -> per-row loss [b].
    """
    b = q.shape[0]
    cols = jnp.arange(item.shape[0])
    rows = row_offset + jnp.arange(b)
    logits = scale * jnp.einsum("qd,kd->qk", _f32(q), _f32(item))                    # [b, B]
    positive = cols[None, :] == rows[:, None]
    same = q_ids[:, None] == item_ids[None, :]
    logits = jnp.where(same & ~positive, _NEG, logits)
    pos = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1)
    if hard is not None:
        h = scale * jnp.einsum("qd,kd->qk", _f32(q), _f32(hard))                     # [b, B]
        h = jnp.where((q_ids[:, None] == hard_ids[None, :]) | same, _NEG, h)
        logits = jnp.concatenate([logits, h], axis=-1)                               # [b, 2B]
    return jax.nn.logsumexp(logits, axis=-1) - pos


def q2i_loss(q: jax.Array, item: jax.Array, scale: jax.Array | float, *, item_index: jax.Array,
             hard: jax.Array | None = None, hard_index: jax.Array | None = None, mesh=None) -> jax.Array:
    """Query -> item InfoNCE with in-batch negatives plus image–text-mismatch hard negatives (TIGER-FG's
    retrieval loss; InfoNCE as in van den Oord et al. 2018, Eq. 4).

    ``q [B, D]`` query embeddings, ``item [B, D]`` their items (row i is the positive of query i),
    ``item_index [B]`` product ids (other rows of the same product are not negatives),
    ``hard [B, D]`` optional item embeddings of an image fused with *another* item's text (text
    product ``hard_index [B]``): every row is an extra negative for every query, except those whose
    text is the query's own product. Returns the scalar ``mean_i [logsumexp_j l_ij - l_ii]``.

    With a mesh (argument, or the trainer's context) the batch is split over ``BATCH_AXES`` and the
    loss is computed per device on ``[B_local, B]`` (or ``[B_local, 2B]``) logits, then ``psum``-ed.
    """
    scale = jnp.asarray(scale, jnp.float32)
    mesh = mesh if mesh is not None else partitioning.active_mesh()
    has_hard = hard is not None
    if hard_index is None:
        hard_index = item_index
    if mesh is None or all(mesh.shape.get(a, 1) == 1 for a in BATCH_AXES):
        return jnp.mean(_q2i_rows(q, item, hard, item_index, item_index, hard_index, 0, scale))

    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    total = q.shape[0]

    def local(q, item, hard, ids, hard_ids, scale):
        gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
        shard = jax.lax.axis_index(axes)
        rows = _q2i_rows(q, gather(item), gather(hard) if has_hard else None, ids, gather(ids),
                         gather(hard_ids), shard * q.shape[0], scale)
        return jax.lax.psum(jnp.sum(rows), axes) / total

    row = P(axes)
    hard_arg = hard if has_hard else jnp.zeros((total, 1), q.dtype)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(row, row, row, row, row, P()), out_specs=P())
    return fn(q, item, hard_arg, item_index, hard_index, scale)


def _masked_info_nce(anchor: jax.Array, keys: jax.Array, scale, valid: jax.Array,
                     extra: jax.Array | None = None) -> jax.Array:
    """InfoNCE over valid rows: anchor / keys [b, D], valid [b]; invalid rows are neither anchors nor
    negatives. ``extra [b, D]``: one more negative per anchor (``anchor_i . extra_i``)."""
    valid = valid.astype(bool)
    logits = scale * jnp.einsum("qd,kd->qk", _f32(anchor), _f32(keys))
    logits = jnp.where(valid[None, :], logits, _NEG)
    pos = scale * jnp.sum(_f32(anchor) * _f32(keys), axis=-1)
    if extra is not None:
        logits = jnp.concatenate([logits, scale * jnp.sum(_f32(anchor) * _f32(extra), -1)[:, None]], axis=-1)
    per_row = jax.nn.logsumexp(logits, axis=-1) - pos
    w = valid.astype(jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def v2t_loss(region: jax.Array, text: jax.Array, scale, valid: jax.Array) -> jax.Array:
    """Region–text alignment (TIGER-FG's visual-to-text grounding): symmetric InfoNCE between the
    target-region embedding (student patches pooled in the box) and the item-text embedding.

    ``region [b, D]``, ``text [b, D]``, ``valid [b]`` (has a box) -> scalar.
    """
    return 0.5 * (_masked_info_nce(region, text, scale, valid) + _masked_info_nce(text, region, scale, valid))


def i2v_loss(item: jax.Array, region: jax.Array, scale, valid: jax.Array,
             hard: jax.Array | None = None) -> jax.Array:
    """Fused item -> target region alignment (TIGER-FG's implicit grounding): the region embedding
    must pick its fused item embedding among the batch, and beat its own image fused with a
    cross-category text (``hard``, the extra negative: same pixels, wrong product named).

    ``item [b, D]``, ``region [b, D]``, ``valid [b]``, ``hard [b, D]`` or None -> scalar.
    """
    return _masked_info_nce(region, item, scale, valid, extra=hard)


def patch_similarity(patches: jax.Array) -> jax.Array:
    """Cosine similarity between patches: [b, n, H] -> [b, n, n]."""
    x = _f32(patches)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    return jnp.einsum("bnh,bmh->bnm", x, x)


def srd_loss(student: jax.Array, teacher: jax.Array, box_mask: jax.Array, valid: jax.Array) -> jax.Array:
    """Spatial relation distillation: inside the target box, the student's patch-to-patch cosine
    similarity matrix matches the frozen teacher's (masked MSE over patch pairs).

    ``student [b, n, Hs]``, ``teacher [b, n, Ht]`` (stop-gradient), ``box_mask [b, n]`` (patch in the
    box), ``valid [b]`` (has a box; boxes exist in training only) ->
    ``sum_b sum_ij m_bij (S_s - S_t)^2 / sum m`` with ``m_bij = valid_b box_bi box_bj``.
    """
    s, t = patch_similarity(student), jax.lax.stop_gradient(patch_similarity(teacher))
    m = _f32(box_mask) * _f32(valid)[:, None]
    pair = m[:, :, None] * m[:, None, :]
    return jnp.sum(pair * (s - t) ** 2) / jnp.maximum(jnp.sum(pair), 1.0)


def sdd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, student_temp: float, teacher_temp: float,
             valid: jax.Array | None = None) -> jax.Array:
    """Similarity distribution distillation: ``KL(p_t || p_s)`` between the in-batch
    query->candidate similarity distributions of the teacher and the student.

    ``student_logits [b, c]`` and ``teacher_logits [b, c]`` are cosine similarities,
    ``p = softmax(sim / temp)`` per row; ``valid [b]`` rows to average (default all) -> scalar.
    """
    t = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(teacher_logits)) / teacher_temp, axis=-1)
    s = jax.nn.log_softmax(_f32(student_logits) / student_temp, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if valid is None:
        return jnp.mean(kl)
    w = _f32(valid)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)
