"""KuaiSearch recall: a DPR dual encoder (``model.name=dpr_sde`` shared encoder, ``dpr_ade`` one per side).

    ecomax train --config configs/kuaisearch_recall.py:tiny --workdir runs/ks_recall
    ecomax train --config configs/kuaisearch_recall.py:lite --workdir W --set data.root=DIR [--set model.name=dpr_ade]

Arguments:
  ``tiny``: a small synthetic KuaiSearch world (synthesised and tokenised once, cached under
    ``$ECOMAX_CACHE``), a 2-layer 64-wide encoder; CPU, well under a minute.
  ``lite``: KuaiSearch-Lite read from ``data.root`` (the raw ``*_lite/train.jsonl`` folders or the
    output of ``ecomax data prepare kuaisearch``) at the paper's settings (official
    ``recall/dpr/config/train_dpr_nq.yaml``): BERT-base (768 wide, 12 layers, 12 heads, vocab 21128
    like bert-base-chinese), CLS embeddings, dot product, batch 64, lr 2e-5 with 1237 warm-up steps
    then linear decay, max length 64, grad-norm clip 2.0, no weight decay, float32. The tokenizer is
    ``data.tokenizer``, else ``data.root/spm.model``, else a sentencepiece model trained once on the
    data's texts and cached (``char`` type: one piece per Chinese character, as bert-base-chinese,
    at most 21128 pieces). Training
    starts from random weights (no bert-base-chinese import here). ``train.steps`` is a placeholder:
    the paper trains up to 40 epochs of ``#train sessions / 64`` steps with early stopping.
"""

import ml_collections

from configs.common import KUAISEARCH_SYNTHETIC, base_config, kuaisearch_text_model


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "lite"):
        raise KeyError(arg)
    tiny = arg == "tiny"
    c = base_config()
    c.task = "kuaisearch_recall"

    c.model = kuaisearch_text_model(tiny, name="dpr_sde", max_positions=64)  # dpr_sde | dpr_ade
    c.model.pooling = "mean" if tiny else "cls"       # cls (DPR) | mean | pooler
    c.model.similarity = "cosine" if tiny else "dot"  # dot (DPR) | cosine
    c.model.scale = 20.0 if tiny else 1.0             # logits = scale * similarity

    c.data.root = ""                    # empty: the synthetic world below
    c.data.synthetic = ml_collections.ConfigDict(KUAISEARCH_SYNTHETIC)
    c.data.tokenizer = ""               # a sentencepiece .model; empty: root/spm.model or trained once
    c.data.tokenizer_vocab_size = 2000 if tiny else 21128
    c.data.tokenizer_model_type = "char"   # when a tokenizer is trained here: char | unigram | bpe
    c.data.query_len = 16 if tiny else 64
    c.data.item_len = 48 if tiny else 64

    c.eval.split = "test"
    c.eval.ks = (10, 20, 50)
    c.eval.ann = "auto"                 # auto: ScaNN above ~20k items | scann | exact
    c.eval.batch_size = 256 if tiny else 1024
    c.eval.max_examples = 0             # 0: every test session
    c.eval.bm25 = True

    c.train.batch_size = 64
    c.train.steps = 300 if tiny else 50_000
    c.train.log_every = 50 if tiny else 100
    c.train.checkpoint_every = 300 if tiny else 2000
    c.optimizer.learning_rate = 1e-3 if tiny else 2e-5
    c.optimizer.warmup_steps = 30 if tiny else 1237
    c.optimizer.schedule = "cosine" if tiny else "linear"
    c.optimizer.weight_decay = 0.01 if tiny else 0.0
    c.train.grad_clip_norm = 1.0 if tiny else 2.0
    return c
