"""A cache of generated datasets, so a ``tiny`` config can synthesise its data on first use.

``cached_dataset("kuaisearch_synth", {"seed": 0, "items": 500}, build)`` returns
``$ECOMAX_CACHE/kuaisearch_synth-<hash of params>/`` (default ``~/.cache/ecomax``), calling
``build(tmp_dir)`` once to fill it. The folder appears atomically (built under a temporary name,
then renamed), so concurrent processes and interrupted builds never see half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ECOMAX_CACHE", pathlib.Path.home() / ".cache" / "ecomax"))


def cached_dataset(name: str, params: Mapping[str, Any], build: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    """The folder of dataset ``name`` generated with ``params``, built by ``build(folder)`` if missing."""
    digest = hashlib.sha256(json.dumps(dict(params), sort_keys=True, default=str).encode()).hexdigest()[:12]
    final = cache_root() / f"{name}-{digest}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / "params.json").write_text(json.dumps(dict(params), sort_keys=True, default=str, indent=2))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
