"""The data subcommands through the CLI: synthesise, convert, tokenise."""

import json

from launch.cli import main


def test_kuaisearch_synth_prepare_and_tokenizer_through_the_cli(tmp_path, capsys):
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    assert main(["data", "synth", "kuaisearch", "--out", str(raw), "--users", "20", "--items", "60",
                 "--sessions", "40", "--seed", "1"]) == 0
    assert sorted(p.name for p in raw.glob("*.jsonl")) == ["items.jsonl", "keywords.jsonl", "rank.jsonl",
                                                            "recall.jsonl", "relevance.jsonl", "users.jsonl"]
    assert main(["data", "prepare", "kuaisearch", "--src", str(raw), "--out", str(prepared),
                 "--workers", "1"]) == 0
    summary = json.loads((prepared / "kuaisearch_prepare_summary.json").read_text())
    assert "items" in json.dumps(summary) and (prepared / "kuaisearch_items").is_dir()
    model = tmp_path / "spm.model"
    assert main(["data", "tokenizer", "--corpus", str(raw), "--out", str(model), "--vocab-size", "100"]) == 2
    assert "Vocabulary size is smaller than required_chars" in capsys.readouterr().err
    assert main(["data", "tokenizer", "--corpus", str(raw), "--out", str(model), "--vocab-size", "1500"]) == 0
    assert model.stat().st_size > 0


def test_ecom_rf_immr_synth_and_build_through_the_cli(tmp_path):
    raw, built = tmp_path / "raw", tmp_path / "built"
    assert main(["data", "synth", "ecom_rf_immr", "--out", str(raw), "--items", "6", "--queries-per-item", "1",
                 "--image-size", "32"]) == 0
    assert main(["data", "build", "ecom_rf_immr", "--manifest", str(raw / "manifest.jsonl"), "--out", str(built),
                 "--workers", "1"]) == 0
    assert (built / "ecom_rf_immr" / "1.0.0").is_dir()
