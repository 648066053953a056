"""The shared JSONL -> ArrayRecord converter: reader, range planning, the one max_bad_fraction rule."""

from __future__ import annotations

import json

import pytest

from data_pipelines import jsonl_convert
from data_pipelines.ecom_rf_immr import builder as ecom_builder
from data_pipelines.kuaisearch import prepare as ks_prepare


def test_reader_bom_crlf_blank_and_no_final_newline(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(jsonl_convert.BOM + b'{"a": 1}\r\n\r\n{"a": 2}\n  \n{"a": 3}')
    assert list(jsonl_convert.iter_file_lines(p)) == [(1, b'{"a": 1}'), (3, b'{"a": 2}'), (5, b'{"a": 3}')]
    assert sum(n for _, n, _ in jsonl_convert.iter_lines(p)) == p.stat().st_size


def test_ranges_start_at_line_starts_and_number_lines_of_the_file(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"".join(json.dumps({"i": i, "pad": "x" * (i % 7)}).encode() + b"\n" for i in range(50)))
    data = p.read_bytes()
    ranges = jsonl_convert.plan_ranges(p, 6)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) == 6
    seen = []
    for start, end in ranges:
        assert start == 0 or data[start - 1:start] == b"\n"
        numbers = jsonl_convert.LineNumbers(str(p), start)
        seen += [(numbers(local), json.loads(line)["i"]) for local, _, line in jsonl_convert.iter_lines(p, start, end)]
    assert seen == [(i + 1, i) for i in range(50)]


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_max_bad_fraction_rule_is_one_for_both_datasets(tmp_path, value):
    with pytest.raises(ValueError, match=r"max_bad_fraction must be"):
        jsonl_convert.check_max_bad_fraction(value)
    with pytest.raises(ValueError, match=r"max_bad_fraction must be in \[0, 1\)"):
        ks_prepare.prepare(tmp_path, tmp_path / "out", max_bad_fraction=1.0, progress=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("{}\n")
    with pytest.raises(ValueError, match=r"max_bad_fraction must be in \[0, 1\)"):
        ecom_builder.build(manifest, tmp_path / "out", max_bad_fraction=1.0, progress=False)


def test_valid_fractions():
    assert jsonl_convert.check_max_bad_fraction(0) == 0.0
    assert jsonl_convert.check_max_bad_fraction("0.25") == 0.25
    assert jsonl_convert.check_max_bad_fraction(0.999) == 0.999


def test_ecom_manifest_with_a_bom_builds(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 16), (200, 40, 40)).save(tmp_path / "q.png")
    Image.new("RGB", (30, 24), (20, 40, 40)).save(tmp_path / "i.png")
    rows = [{"query_image": "q.png", "item_id": f"sku{i}", "item_images": ["i.png"], "title": f"t{i}",
             "category": "a > b", "split": "train"} for i in range(3)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(jsonl_convert.BOM + b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n")
    summary = ecom_builder.build(manifest, tmp_path / "out", workers=0, progress=False)
    assert summary.records == {"train": 3} and summary.num_skipped == 0
    assert [r["item_id"] for r in ecom_builder.open_split(tmp_path / "out", "train")] == ["sku0", "sku1", "sku2"]
