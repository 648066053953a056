"""OneSearch-V2's generative retriever on KuaiSearch, SFT with reasoning-internalised self-distillation: a T5 reads
the query and the user's profile and generates the SID of an item to click or order.

    ecomax gr sids --config configs/onesearch_v2.py:tiny --out runs/os_sids
    ecomax train --config configs/onesearch_v2.py:sd --workdir runs/os_sd --set data.sid_table=runs/os_sids

Data (``data_pipelines/kuaisearch/reasoning.py``): every train session with a clicked or ordered item -> the SID
of one of them (drawn per example), mixed with DSI's indexing examples (item text -> its SID); the student
input is ``query + profile``, the teacher input adds the query's keyword span (``data.keywords``). Loss, by
``onesearch.*`` (``trainers/losses/onesearch.py``; each term per SID position, averaged over the positions):

* ``distill = "none"``: the student's cross-entropy (V1); ``cot_weight`` > 0 adds the CoT task (the same
  model decodes the keyword span from the student input, text pieces, cross-entropy);
* ``"joint"``: ``self_distillation_loss`` with the teacher pass of the same model (its CE trains it, the KL's
  teacher side is a fixed target); ``"ema"``: the teacher pass under an EMA of the parameters
  (``ema_decay``; task state), its CE a constant;
* ``r_drop`` > 0: two student passes under independent dropout (``dropout`` on the input embeddings and the
  encoder output), their mean CE + ``r_drop_loss``; ``fgm`` > 0: the loss again on the input embeddings
  moved by ``fgm_perturbation`` of its gradient; ``focal``: ``focal_loss`` in place of every CE.

Evaluation on the test sessions (student input: no keywords at inference): ``click/hit_rate@k``,
``click/mrr@10`` (relevant = clicked ∪ ordered), ``order/hit_rate@k``, ``order/mrr@10`` (sessions with an
order; relevant = the ordered items), ``valid_sid_rate``; with ``eval.teacher`` the same for the teacher
input (``teacher/...``: what the keyword span is worth when it is given).
"""

from __future__ import annotations

import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch import reasoning as rs
from data_pipelines.kuaisearch.synthetic import KEYWORDS_FILE
from data_pipelines.kuaisearch.transforms import stack
from models.gr import code_log_probs
from models.seq2seq import Seq2Seq
from trainers.losses import onesearch as osl
from trainers.tasks import Batch, EvalContext, Metrics, register
from trainers.tasks.gr_dsi import DSITask, generate

log = logging.getLogger(__name__)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: each element zeroed with probability ``rate``, the rest scaled by ``1 / (1 - rate)``."""
    return jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0.0).astype(x.dtype)


def mean_over_levels(fn, targets: jax.Array, *level_lists: list[jax.Array]) -> tuple[jax.Array, Metrics]:
    """``fn(*[B, 1, K_l] logits, targets [B, 1]) -> loss or (loss, parts)`` at every SID position, averaged."""
    outs = [fn(*(lp[level][:, None] for lp in level_lists), targets[:, level, None]) for level in range(targets.shape[1])]
    outs = [o if isinstance(o, tuple) else (o, {}) for o in outs]
    return (sum(o[0] for o in outs) / len(outs),
            {k: sum(o[1][k] for o in outs) / len(outs) for k in outs[0][1]})


@register("gr_onesearch")
class OneSearchTask(DSITask):
    def __init__(self, config):
        super().__init__(config)
        o = config.onesearch
        if o.distill not in ("none", "joint", "ema"):
            raise ValueError(f"onesearch.distill {o.distill!r}: expected 'none', 'joint' or 'ema'")
        if config.model.arch != "encoder_decoder":
            raise ValueError("gr_onesearch: model.arch must be 'encoder_decoder' (FGM and dropout act on the encoder's "
                             "input embeddings)")

    # --- data ---------------------------------------------------------------------------------------------

    @functools.cached_property
    def sessions(self) -> dict[str, list[rs.SearchSession]]:
        w = self.world.recall
        return rs.search_sessions(ex.read_rows(w.root, "recall"), w.corpus)

    @functools.cached_property
    def keywords(self) -> dict[str, tuple[str, ...]]:
        path = self.config.data.keywords or pathlib.Path(self.world.recall.root) / KEYWORDS_FILE
        found = rs.read_keywords(path)
        queries = {s.query for split in self.sessions.values() for s in split}
        missing = len(queries - set(found))
        if missing:
            log.warning("%s: %d of %d session queries have no keywords (empty keyword span)", path, missing, len(queries))
        return found

    @functools.cached_property
    def profiles(self) -> dict[int, str]:
        return rs.user_profiles(ex.read_rows(self.world.recall.root, "users")) if self.config.data.profile else {}

    def example(self, s: rs.SearchSession) -> rs.ReasoningExample:
        return rs.ReasoningExample(s.query, self.profiles.get(s.user_id, ""), self.keywords.get(s.query, ()), s.clicked)

    @functools.cached_property
    def train_sessions(self) -> list[rs.SearchSession]:
        """The train sessions with a clicked or ordered item that has a SID."""
        has = self.world.item_codes[:, 0] >= 0
        out = [s for s in self.sessions.get("train", []) if any(has[r] for r in s.clicked)]
        if not out:
            raise ValueError(f"{self.world.recall.root}: no train session has a clicked item with a SID")
        return out

    @functools.cached_property
    def transform(self) -> rs.ReasoningTransform:
        d = self.config.data
        return rs.ReasoningTransform(self.world.recall.tokenizer, self.world.item_codes, d.query_len, d.keyword_len)

    def train_source(self):
        w, repeats = self.world, int(self.config.data.index_repeats)
        texts = w.recall.corpus.texts
        indexing = [rs.ReasoningExample(texts[r], "", (), (r,)) for r in np.flatnonzero(w.item_codes[:, 0] >= 0)]
        return [self.example(s) for s in self.train_sessions] + indexing * repeats, self.transform

    def inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        d, spec = self.config.data, {}
        for name, n in (("input", d.query_len), ("teacher", d.query_len + d.keyword_len), ("keyword", d.keyword_len)):
            spec |= {f"{name}_ids": jax.ShapeDtypeStruct((n,), np.int32), f"{name}_mask": jax.ShapeDtypeStruct((n,), np.bool_)}
        return {**spec, "codes": jax.ShapeDtypeStruct((self.vocab.depth,), np.int32)}

    # --- the objective ------------------------------------------------------------------------------------

    def init_extra(self, params, rng: jax.Array):
        return {"ema": params} if self.config.onesearch.distill == "ema" else None

    def logits(self, model: Seq2Seq, ids: jax.Array, mask: jax.Array, decoder_inputs: jax.Array,
               rng: jax.Array | None = None, delta: jax.Array | None = None) -> jax.Array:
        """``[B, T, V]`` teacher-forced logits; ``rng``: dropout (rate ``onesearch.dropout``; every training pass
        but the EMA teacher's) on the input embeddings and the encoder output; ``delta [B, S, E]``: added to the
        input embeddings (FGM)."""
        rate = self.config.onesearch.dropout
        x = model.embed(ids) if delta is None else model.embed(ids) + delta
        if rng is None or rate == 0:
            return model.decode(model.encode_embedded(x, mask), mask, decoder_inputs)
        k_in, k_out = jax.random.split(rng)
        enc = model.encode_embedded(dropout(x, rate, k_in), mask)
        return model.decode(dropout(enc, rate, k_out), mask, decoder_inputs)

    def code_levels(self, model, batch: Batch, prefix: str = "input", **kw) -> list[jax.Array]:
        """Per SID position ``[B, K_l]`` log-probs of the batch's SIDs given the ``prefix`` input."""
        logits = self.logits(model, batch[f"{prefix}_ids"], batch[f"{prefix}_mask"],
                             self.vocab.decoder_inputs(batch["codes"]), **kw)
        return code_log_probs(self.vocab, logits)

    def token_loss(self, logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        o = self.config.onesearch
        if o.focal:
            return osl.focal_loss(logits, targets, mask, alpha=o.focal_alpha, gamma=o.focal_gamma)
        return osl.cross_entropy(logits, targets, mask)

    def student_loss(self, model, batch: Batch, rng: jax.Array, teacher: list[jax.Array] | None,
                     delta: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
        """The SID objective of the student input (with SD, against ``teacher``'s per-position log-probs)."""
        o, codes = self.config.onesearch, batch["codes"]
        passes = 2 if o.r_drop > 0 else 1
        student = [self.code_levels(model, batch, rng=key, delta=delta) for key in jax.random.split(rng, passes)]
        if teacher is None:
            loss, parts = mean_over_levels(self.token_loss, codes, student[0])
        else:
            sd = functools.partial(osl.self_distillation_loss, w_teacher=o.w_teacher, w_kl=o.w_kl, tau=o.tau,
                                   token_loss=self.token_loss)
            loss, parts = mean_over_levels(sd, codes, student[0], teacher)
        if passes == 2:
            second, _ = mean_over_levels(self.token_loss, codes, student[1])
            rdrop, _ = mean_over_levels(lambda a, b, y: osl.r_drop_loss(a, b, alpha=o.r_drop), codes, *student)
            loss, parts = loss + second + rdrop, {**parts, "r_drop": rdrop}
        return loss, parts

    def loss_with(self, model, batch: Batch, rng: jax.Array, ema_teacher: list[jax.Array] | None
                  ) -> tuple[jax.Array, Metrics]:
        o = self.config.onesearch
        teacher = ema_teacher if o.distill == "ema" else (
            self.code_levels(model, batch, "teacher", rng=rng) if o.distill == "joint" else None)
        loss, metrics = self.student_loss(model, batch, rng, teacher)
        if o.fgm > 0:   # the loss again at the input embeddings moved along its own gradient
            shape = (*batch["input_ids"].shape, model.cfg.d_model)
            grad = jax.grad(lambda d: self.student_loss(model, batch, rng, teacher, d)[0])(jnp.zeros(shape))
            adv, _ = self.student_loss(model, batch, rng, teacher, jax.lax.stop_gradient(osl.fgm_perturbation(grad, o.fgm)))
            loss, metrics = loss + adv, {**metrics, "fgm_loss": adv}
        if o.cot_weight > 0:   # the CoT task: decode the keyword span (text pieces) from the student input
            span, mask = batch["keyword_ids"], batch["keyword_mask"]
            start = jnp.full_like(span[:, :1], self.vocab.start)
            logits = self.logits(model, batch["input_ids"], batch["input_mask"], jnp.concatenate([start, span[:, :-1]], 1))
            cot = self.token_loss(logits[..., :self.vocab.text], span, mask)
            loss, metrics = loss + o.cot_weight * cot, {**metrics, "cot_loss": cot}
        return loss, metrics

    def update(self, ctx, state, batch: Batch, rng: jax.Array):
        o = self.config.onesearch
        teacher = (jax.tree.map(jax.lax.stop_gradient, self.code_levels(ctx.model(state.extra["ema"]), batch, "teacher"))
                   if o.distill == "ema" else None)
        state, metrics = ctx.gradient_step(state, batch, rng, lambda m, b, r: self.loss_with(m, b, r, teacher))
        if o.distill == "ema":
            ema = jax.tree.map(lambda e, p: o.ema_decay * e + (1 - o.ema_decay) * p, state.extra["ema"], state.params)
            state = state.replace(extra={**state.extra, "ema": ema})
        return state, metrics

    # --- evaluation ---------------------------------------------------------------------------------------

    def inputs_of(self, sessions: list[rs.SearchSession], teacher: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The student (or teacher) input arrays ``[n, S]`` of ``sessions``."""
        d = self.config.data
        length = d.query_len + (d.keyword_len if teacher else 0)
        pieces = [self.transform.pieces(self.example(s)) for s in sessions]
        batch = stack([rs.padded("x", student + span if teacher else student, length) for student, span in pieces])
        return batch["x_ids"], batch["x_mask"]

    def beam_metrics(self, ctx: EvalContext, sessions: list[rs.SearchSession], teacher: bool = False) -> dict[str, float]:
        from data_pipelines.sid.trie import accepts  # noqa: PLC0415
        from trainers.evaluators import metrics  # noqa: PLC0415

        w, e = self.world, self.config.eval
        ks = tuple(int(k) for k in e.ks)
        ids, mask = self.inputs_of(sessions, teacher)
        beam = ctx.apply(functools.partial(generate, vocab=self.vocab, beams=e.beams), ids, mask,
                         batch_size=e.batch_size, replicated={"trie": w.trie})
        items = self.leaves_to_items(beam["leaves"], max(ks))
        corpus, out = w.recall.corpus.ids, {}
        for name, pick in (("click", lambda s: s.clicked), ("order", lambda s: s.ordered)):
            rows = [i for i, s in enumerate(sessions) if pick(s)]
            if not rows:
                continue
            relevant = [tuple(int(corpus[r]) for r in pick(sessions[i])) for i in rows]
            got = metrics.retrieval_metrics(items[rows], relevant, ks)
            top10 = metrics.retrieval_metrics(items[rows, :10], relevant, (10,))
            out |= {f"{name}/hit_rate@{k}": got[f"hit_rate@{k}"] for k in ks}
            out |= {f"{name}/recall@{k}": got[f"recall@{k}"] for k in ks}
            out |= {f"{name}/mrr@10": top10["mrr"], f"{name}/sessions": float(len(rows))}
        live = beam["leaves"] >= 0
        out["valid_sid_rate"] = float(np.asarray(accepts(w.trie, beam["codes"][live])).mean()) if live.any() else 0.0
        return out

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        e = self.config.eval
        tests = self.sessions.get(e.split, [])[:e.max_examples or None]
        if not tests:
            raise ValueError(f"{self.world.recall.root}: no {e.split!r} session with a clicked corpus item to evaluate")
        out = self.beam_metrics(ctx, tests)
        if e.teacher:
            out |= {f"teacher/{k}": v for k, v in self.beam_metrics(ctx, tests, teacher=True).items()
                    if k.endswith(("hit_rate@10", "mrr@10"))}
        return out
