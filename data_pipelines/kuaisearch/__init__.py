"""KuaiSearch (Kuaishou e-commerce search) data layer: schemas, JSONL -> TFDS ArrayRecord, readers,
TFDS builders and a synthetic joinable world in the same schema.

    from data_pipelines import kuaisearch
    from data_pipelines.kuaisearch.prepare import prepare
    summary = prepare(src_dir, out_dir, workers=4, max_bad_fraction=0.0)
    src = kuaisearch.open_split(out_dir, "rank", split="train")   # len + __getitem__ -> dict
    paths = kuaisearch.synthesize(out_dir, num_users=1000, num_items=5000, num_sessions=8000, seed=0)

Submodules: ``schema`` (fields, ``validate``), ``records`` (TFDS features, fast tf.Example codec),
``prepare`` (parallel converter), ``reader`` (``open_split``), ``builders`` (TFDS
GeneratorBasedBuilders, also for Apache Beam; import it to register the names), ``synthetic``
(``synthesize``); for the tasks: ``examples`` (recall and relevance examples), ``rank_features``,
``worlds`` (what each task reads, prepared, cached and joined once) and ``transforms``. TensorFlow-datasets itself is imported only when a function needs it.

``kuaisearch.prepare`` is the submodule; the converter function is ``kuaisearch.prepare.prepare``
(also exported as ``kuaisearch.prepare_kuaisearch``).
"""

from data_pipelines.kuaisearch import prepare  # the submodule
from data_pipelines.kuaisearch.prepare import PrepareSummary, TooManyBadLinesError
from data_pipelines.kuaisearch.prepare import prepare as prepare_kuaisearch
from data_pipelines.kuaisearch.reader import KuaiSearchSource, open_split
from data_pipelines.kuaisearch.schema import (
    KINDS,
    SCHEMAS,
    KuaiSearchFormatError,
    find_source_files,
    parse_line,
    validate,
)
from data_pipelines.kuaisearch.synthetic import synthesize

__all__ = [
    "KINDS",
    "SCHEMAS",
    "KuaiSearchFormatError",
    "KuaiSearchSource",
    "PrepareSummary",
    "TooManyBadLinesError",
    "find_source_files",
    "open_split",
    "parse_line",
    "prepare",
    "prepare_kuaisearch",
    "synthesize",
    "validate",
]
