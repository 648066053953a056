"""Search-agent data: QA benchmarks, the wiki-18 passage corpus, a synthetic multi-hop QA world.

* ``qa``: ``read_qa(path) -> list[QARecord]`` for the QA JSONL of the seven Search-R1 benchmarks (NQ,
  TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle, as FlashRAG / Search-R1 ship them) and of the
  synthetic world.
* ``metrics``: the SQuAD / Search-R1 answer normalisation, ``exact_match`` and token ``f1`` (max over golds).
* ``corpus``: ``iter_passages(path)`` over a wiki-18 style passage JSONL -> ``Passage(id, title, text)``.
* ``synthetic``: ``make_world(seed, ...)`` / ``write_world(out, ...)``, a generated world of entities and
  relations, its passages and its 1-, 2- and 3-hop questions, in the two formats above.
* ``records``: the shared JSONL line reader with the ``max_bad_fraction`` rule (``data_pipelines.jsonl_convert``).

Nothing here imports ``trainers/`` or ``launch/``; the retriever over these passages is
``trainers/evaluators/passage_retriever.py``.
"""
