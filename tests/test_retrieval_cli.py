"""``ecomax retrieval bench``: table, JSON, exit codes."""

import json

import numpy as np

from launch.cli import main
from trainers.evaluators import retrieval as R


def _write(tmp_path, n=3000, q=200, d=16, noise=0.7, seed=0):
    rng = np.random.default_rng(seed)
    centres = R.l2_normalize(rng.standard_normal((60, d)).astype(np.float32))

    def cl(m):
        lab = rng.integers(0, 60, m)
        return centres[lab] + noise * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)

    np.save(tmp_path / "g.npy", cl(n))
    np.save(tmp_path / "q.npy", cl(q))
    return str(tmp_path / "g.npy"), str(tmp_path / "q.npy")


def test_retrieval_bench_cli(tmp_path, capsys):
    g, q = _write(tmp_path)
    out = tmp_path / "bench.json"
    rc = main(["retrieval", "bench", "--gallery", g, "--queries", q, "--k", "10", "--ann", "scann",
               "--target-recall", "0.99", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert r["num_gallery"] == 3000 and r["num_queries"] == 200 and r["k"] == 10
    assert r["scann/target_met"] is True and r["scann_tuned/recall_vs_exact@10"] >= 0.99
    assert r["exact/ids_equal_fraction"] > 0.999 and r["exact/jax_qps"] > 0 and r["exact/numpy_qps"] > 0
    assert r["scann/build_s"] > 0 and r["scann_tuned/qps"] > 0 and "scann_rule/qps" in r
    assert r["exact/matmul_peak_gflops"] > 0 and 0 < r["exact/jax_fraction_of_peak"] < 2
    assert r["machine"]["cpu_count"] >= 1 and "load_average" in r["machine"]
    for needle in ("exact, JAX", "exact, numpy", "ScaNN tuned", "JAX / numpy QPS", "ScaNN tuned: recall@10",
                   "of the 2048² f32 matmul peak"):
        assert needle in text, needle


def test_retrieval_bench_cli_refuses_and_bad_input(tmp_path, capsys):
    g, q = _write(tmp_path, noise=1.5)
    rc = main(["retrieval", "bench", "--gallery", g, "--queries", q, "--ann", "scann", "--target-recall", "0.9999",
               "--max-leaves-to-search", "1", "--max-reorder", "10", "--no-numpy-exact"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "NOT FINAL" in cap.out and "did NOT reach the target" in cap.out
    assert "use the exact numbers" in cap.err
    np.save(tmp_path / "bad.npy", np.zeros((5, 3), np.float32))
    assert main(["retrieval", "bench", "--gallery", g, "--queries", str(tmp_path / "bad.npy")]) == 2
    assert "dim" in capsys.readouterr().err
    assert main(["retrieval", "bench", "--gallery", str(tmp_path / "missing.npy"), "--queries", q]) == 2
