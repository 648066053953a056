"""``ecomax sid build`` end to end, its errors on bad input, and a killed tokenizer run resuming bitwise."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from data_pipelines.sid.embeddings import synthetic_embeddings
from data_pipelines.sid.table import load_table
from data_pipelines.sid.trie import accepts, load_trie
from trainers.evaluators.sid_metrics import sid_metrics


def _cli(*args, devices=2):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _build(src, out, *sets, variant="tiny"):
    proc = _cli("sid", "build", "--config", f"{REPO}/configs/sid.py:{variant}", "--embeddings", src, "--out", out,
                *[a for s in sets for a in ("--set", s)])
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def test_sid_build_writes_table_trie_and_metrics(tmp_path):
    x = synthetic_embeddings(700, 32, 24, seed=5)
    np.save(tmp_path / "items.npy", x)
    np.save(tmp_path / "items.ids.npy", np.arange(700, dtype=np.int64) * 7 + 3)
    code, output = _build(tmp_path / "items.npy", tmp_path / "out", "train.batch_size=256", "mesh.data=2")
    assert code == 0, output
    assert "assign" in output and "700 items" in output  # the progress bar and the summary
    table, ids, meta = load_table(tmp_path / "out")
    assert table.shape == (700, 4) and meta["dedup"] and meta["sizes"][:3] == [16, 16, 16]
    np.testing.assert_array_equal(ids, np.arange(700) * 7 + 3)
    assert len({tuple(r) for r in table.tolist()}) == 700  # the dedup digit makes every SID unique
    # the table is the greedy residual assignment against the written codebooks
    codebooks = np.load(tmp_path / "out" / "codebooks.npy")
    r = x.astype(np.float64)
    for level, c in enumerate(codebooks):
        code_l = ((r[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        assert (code_l == table[:, level]).mean() > 0.999  # float ties aside
        r = r - c[table[:, level]]
    trie = load_trie(tmp_path / "out" / "trie")
    assert np.asarray(jax.jit(accepts)(trie, table)).all()
    other = table.copy()
    other[:, -1] += meta["sizes"][-1]  # dedup digits past the largest: none exists
    assert not np.asarray(accepts(trie, other)).any()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == pytest.approx({"items": 700, **sid_metrics(table[:, :3], [16] * 3),
                                     "dedup_size": meta["sizes"][-1]})
    assert metrics["dedup_size"] == metrics["largest_group"]


def test_sid_build_with_an_rq_vae(tmp_path):
    np.save(tmp_path / "items.npy", synthetic_embeddings(600, 32, 24, seed=2))
    code, output = _build(tmp_path / "items.npy", tmp_path / "out", "train.steps=40", "mesh.data=2",
                          variant="rqvae_tiny")
    assert code == 0, output
    table, ids, meta = load_table(tmp_path / "out")
    assert table.shape == (600, 4) and len({tuple(r) for r in table.tolist()}) == 600
    assert np.load(tmp_path / "out" / "codebooks.npy").shape == (3, 16, 8)  # latent space
    assert np.asarray(accepts(load_trie(tmp_path / "out" / "trie"), table)).all()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == pytest.approx({"items": 600, **sid_metrics(table[:, :3], [16] * 3),
                                     "dedup_size": meta["sizes"][-1]})


@pytest.mark.parametrize("problem,message", [
    ("nan", "items.npy: row 3 is not finite"),
    ("dim", "dimension 16 differs from the config's model.dim 32"),
    ("ids", "id 4 appears at rows 4 and 9"),
])
def test_sid_build_bad_input_names_the_row(tmp_path, problem, message):
    x = synthetic_embeddings(50, 16 if problem == "dim" else 32, 4, seed=0)
    if problem == "nan":
        x[3, 5] = np.inf
    np.save(tmp_path / "items.npy", x)
    if problem == "ids":
        ids = np.arange(50)
        ids[9] = 4
        np.save(tmp_path / "items.ids.npy", ids)
    code, output = _build(tmp_path / "items.npy", tmp_path / "out")
    assert code == 2, output
    assert message in output and "Traceback" not in output


# --- kill -9 of a tokenizer run -------------------------------------------------------------------------

def _train(workdir, *sets):
    return _cli("train", "--workdir", workdir, "--config", f"{REPO}/configs/sid.py:tiny", "--set", "mesh.data=2",
                *[a for s in sets for a in ("--set", s)])


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    drop = ("examples_per_sec", "step_time", "time")
    return {(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train"):
            {k: v for k, v in r.items() if k not in drop} for r in map(json.loads, lines)}
