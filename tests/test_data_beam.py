"""The Apache Beam route (DirectRunner) writes the same records as the local converter, for both
datasets and every split. Skipped when apache-beam is not installed."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from data_pipelines.ecom_rf_immr import builder as ecom_builder  # noqa: E402
from data_pipelines.ecom_rf_immr import synthetic as ecom_synthetic  # noqa: E402
from data_pipelines.kuaisearch import records  # noqa: E402
from data_pipelines.kuaisearch.prepare import prepare  # noqa: E402
from data_pipelines.kuaisearch.reader import available_splits, open_split  # noqa: E402
from data_pipelines.kuaisearch.schema import KINDS, KuaiSearchFormatError  # noqa: E402
from data_pipelines.kuaisearch.synthetic import synthesize  # noqa: E402
from launch import cli  # noqa: E402

DIRECT = ["--runner=DirectRunner", "--direct_num_workers=1"]


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).hex()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _key(record) -> str:
    """A record as canonical JSON (bytes as hex, arrays as lists): equal keys = equal records."""
    return json.dumps(_plain(record), sort_keys=True, ensure_ascii=False)


@pytest.fixture(scope="module")
def ks_src(tmp_path_factory) -> pathlib.Path:
    """A small synthetic world: a dozen rows per kind, both splits where the kind has a split field."""
    world = synthesize(tmp_path_factory.mktemp("ks_world"), num_users=20, num_items=40, num_sessions=12, seed=1)
    src = tmp_path_factory.mktemp("ks_src")
    for kind, path in world.items():
        lines = path.read_bytes().splitlines()
        keep = lines if len(lines) <= 24 else lines[:12] + lines[-12:]
        (src / path.name).write_bytes(b"\n".join(keep) + b"\n")
    return src


def test_kuaisearch_beam_matches_local(ks_src, tmp_path):
    local = prepare(ks_src, tmp_path / "local", workers=1, progress=False, verbose=False)
    beamed = prepare(ks_src, tmp_path / "beam", runner="beam", beam_options=DIRECT, verbose=False)
    for kind in KINDS:
        splits = available_splits(tmp_path / "local", kind)
        assert available_splits(tmp_path / "beam", kind) == splits == local.kinds[kind].rows
        assert beamed.kinds[kind].rows == splits
        for split in splits:
            mine = [records.to_json_row(r) for r in open_split(tmp_path / "local", kind, split)]
            theirs = [records.to_json_row(r) for r in open_split(tmp_path / "beam", kind, split)]
            assert sorted(map(_key, theirs)) == sorted(map(_key, mine)), (kind, split)
    assert set(available_splits(tmp_path / "beam", "rank")) == {"train", "test"}


def test_kuaisearch_beam_bad_line_names_file_and_line(ks_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = (ks_src / "users.jsonl").read_bytes().splitlines()
    lines[4] = b'{"user_id": "x"}'
    (src / "users.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(Exception, match=r"users\.jsonl:5: .*'user_id': expected int") as ei:
        prepare(src, tmp_path / "out", kinds=["users"], runner="beam", beam_options=DIRECT, verbose=False)
    assert isinstance(ei.value, KuaiSearchFormatError) or "KuaiSearchFormatError" in repr(ei.value)


def test_ecom_rf_immr_beam_matches_local(tmp_path):
    manifest = ecom_synthetic.synthesize(tmp_path / "synth", items=12, queries_per_item=2, seed=0, image_size=32)
    local = ecom_builder.build(manifest, tmp_path / "local", workers=0, progress=False)
    assert cli.main(["data", "build", "ecom_rf_immr", "--manifest", os.fspath(manifest), "--out",
                     os.fspath(tmp_path / "beam"), "--runner", "beam", "--shards", "3",
                     "--beam-options=" + " ".join(DIRECT)]) == 0
    assert set(local.records) == {"train", "test"}
    for split in local.records:
        mine = ecom_builder.open_split(tmp_path / "local", split)
        theirs = ecom_builder.open_split(tmp_path / "beam", split)
        assert len(theirs) == len(mine) == local.records[split]
        assert sorted(_key(r) for r in theirs) == sorted(_key(r) for r in mine), split
