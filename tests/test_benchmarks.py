"""The benchmark harness runs end to end on a tiny configuration (correctness only, never timing)."""

import importlib.util
import json

from conftest import REPO


def test_mlm_benchmark_runs_both_recipes_and_their_losses_agree(tiny_mlm_dir, corpus_file, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_mlm", REPO / "benchmarks" / "bench_mlm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "mlm.json"
    result = bench.main(["--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "32", "--batch", "4",
                         "--steps", "2", "--warmup", "1", "--repeats", "2", "--tokenizer", str(tiny_mlm_dir),
                         "--corpus", str(corpus_file), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert set(saved["tokens_per_s_median"]) == {"stock", "tlnlp"} and saved["speedup"] > 0
    assert len(saved["runs"]["stock"]) == len(saved["runs"]["tlnlp"]) == 2
    # Same weights, data and masks: the sparse head must give the stock loss.
    assert abs(result["mean_loss"]["stock"] - result["mean_loss"]["tlnlp"]) < 1e-4
