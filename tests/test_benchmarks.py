"""The benchmark harness runs end to end on a tiny configuration (correctness only, never timing)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
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


def test_finetune_benchmark_runs_every_variant(tiny_mlm_dir, labeled_files, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_finetune", REPO / "benchmarks" / "bench_finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "finetune.json"
    bench.main(["--model", str(tiny_mlm_dir), "--train_file", str(labeled_files["train"]),
                "--validation_file", str(labeled_files["validation"]), "--test_file", str(labeled_files["test"]),
                "--labels", "0", "--max_seq_length", "32", "--learning_rate", "5e-3", "--epochs", "5",
                "--frozen_epochs", "5", "--freeze_layers", "1", "--repeats", "1", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert set(saved["examples_per_s_median"]) == set(bench.VARIANTS)
    assert set(saved["speedup"]) == {"tlnlp / stock", "tlnlp-cached / stock-frozen", "tlnlp-cached / stock"}
    for variant, runs in saved["runs"].items():
        assert len(runs) == 1 and runs[0]["examples_per_s"] > 0, variant
        assert 0.4 < runs[0]["test_accuracy"] <= 1, (variant, runs[0])  # above chance (1/3): every recipe learns
    assert saved["runs"]["tlnlp-cached"][0]["feature_cache_s"] > 0


def test_finetune_benchmark_runs_tlnlp_default_precision_under_accelerate_launch(tiny_mlm_dir, labeled_files,
                                                                                  tmp_path):
    from tlnlp.core.precision import cpu_has_fast_bf16

    bench = load_benchmark("bench_finetune")
    output = tmp_path / "finetune.json"
    bench.main(["--model", str(tiny_mlm_dir), "--train_file", str(labeled_files["train"]),
                "--validation_file", str(labeled_files["validation"]), "--test_file", str(labeled_files["test"]),
                "--labels", "0", "--max_seq_length", "32", "--learning_rate", "5e-3", "--epochs", "2",
                "--repeats", "1", "--variants", "stock,tlnlp@auto", "--launcher", "accelerate",
                "--output", str(output)])
    saved = json.loads(output.read_text())
    # What `auto` chose inside the launched run, as the run itself reports it.
    assert saved["config"]["precision"] == {"stock": "no", "tlnlp@auto": "bf16" if cpu_has_fast_bf16() else "no"}
    assert set(saved["speedup"]) == {"tlnlp@auto / stock"}


@pytest.mark.heavy
def test_streaming_memory_harness_drains_the_whole_corpus(tmp_path):
    spec = importlib.util.spec_from_file_location("streaming_memory", REPO / "benchmarks" / "streaming_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "memory.json"
    bench.main(["--sizes_gb", "0.0005,0.001", "--train_steps", "2", "--seq", "32", "--batch", "4",
                "--workdir", str(tmp_path), "--output", str(output)])
    runs = json.loads(output.read_text())["runs"]
    assert [round(r["corpus_gb"], 4) for r in runs] == [0.0005, 0.001]
    # Every block of the corpus went through the pipeline: twice the text, about twice the tokens.
    assert 1.8 < runs[1]["tokens_streamed"] / runs[0]["tokens_streamed"] < 2.2
    assert all(r["data_peak_rss_mb"] > 50 and r["train_peak_rss_mb"] > 50 for r in runs)

    # Two ranks, as a 2-process run splits the stream: each drains its own half, and together the whole file.
    bench.main(["--sizes_gb", "0.001", "--ranks", "2", "--train_steps", "2", "--seq", "32", "--batch", "4",
                "--workdir", str(tmp_path), "--output", str(output)])
    [two] = json.loads(output.read_text())["runs"]
    assert two["ranks"] == 2 and len(two["data_peak_rss_mb_per_rank"]) == 2
    halves = two["tokens_per_rank"]
    assert min(halves) > 0.45 * sum(halves)
    # Block boundaries move with the split, so the totals agree to within a few special tokens per block.
    assert abs(sum(halves) - runs[1]["tokens_streamed"]) < 0.01 * runs[1]["tokens_streamed"]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_pipeline_benchmark_measures_both_paths(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = load_benchmark("input_pipeline")
    output = tmp_path / "pipeline.json"
    report = bench.main(["--megabytes", "0.3", "--tokens", "20000", "--max_cores", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert set(report["stream"]) == {"1 core(s)"}
    assert {"tokenize, 1 core(s)", "read, 1 core(s)"} <= set(report["preprocessed"])
    for entry in [*report["stream"].values(), *report["preprocessed"].values()]:
        assert entry["tokens_per_s"] > 0 and entry["bert_base_gpus_fed"] > 0
    assert 300_000 < report["bert_base_gpu_tokens_per_s_at_40pct_mfu"] < 2_000_000


@pytest.mark.heavy
def test_input_pipeline_streams_over_two_rank_processes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("input_pipeline")  # by name: the spawned ranks unpickle its functions by name
    corpus = tmp_path / "corpus.txt"
    bench.write_corpus(corpus, 0.3)
    # Two spawned processes, each draining its own share of the stream at the same time.
    assert bench.stream_over_ranks(corpus, 2, 20_000) > 0


def gpu_check(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHON": sys.executable})


def test_gpu_check_plan_fits_seven_minutes_and_reads_the_peak_and_the_log():
    done = gpu_check("--plan")
    assert done.returncode == 0, done.stderr
    total = float(done.stdout.splitlines()[-1].split()[1])
    assert total <= 7 * 60 and len(done.stdout.splitlines()) == 7  # six stages and the total
    check = load_benchmark("gpu_check")
    assert check.peak_flops("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert check.peak_flops("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert check.peak_flops("NVIDIA H200") == ("H200", 989e12) and check.peak_flops("cpu") == (None, None)
    log = ("12:00:01 INFO tlnlp.core.loop: step 20: loss 10.2011, lr 1.000e-04, 51234 tokens/s, waited 0.5% for data\n"
           "12:00:02 INFO tlnlp.core.loop: step 40: loss 9.5, lr 9.000e-05, 61234 tokens/s, waited 1.5% for data\n")
    assert check.log_windows(log) == [
        {"step": 20, "loss": 10.2011, "tokens_per_s": 51234.0, "data_wait_pct": 0.5},
        {"step": 40, "loss": 9.5, "tokens_per_s": 61234.0, "data_wait_pct": 1.5}]


@pytest.mark.heavy
def test_gpu_check_keeps_every_stage_when_one_fails_and_one_stalls(tmp_path):
    done = gpu_check("--dry", "--output", str(tmp_path), "--stages", "smoke,step_vs_stock,stage1_tlnlp,stage1_stock",
                     "--fail_stage", "step_vs_stock", "--limits", "stage1_stock=4")
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["smoke", "step_vs_stock", "stage1_tlnlp", "stage1_stock"]
    assert stages["smoke"]["status"] == "ok" and stages["smoke"]["gemm_ceiling_flops"] > 0
    assert stages["smoke"]["eager_steps_with_loader_workers"]["steps"] == 20
    assert stages["step_vs_stock"]["status"] == "failed"
    assert "failed on purpose" in stages["step_vs_stock"]["error"] and stages["step_vs_stock"]["log_tail"]
    run = stages["stage1_tlnlp"]  # the stage after the failure ran, and its figures are all there
    assert run["status"] == "ok" and run["tokens_per_s_median_window"] > 0 and run["steps"] == 6
    assert [step for step, _ in run["loss_curve"]] == [2, 4, 6] and 0 < run["mfu_measured_ceiling"] < 1
    assert run["time_to_first_step_s"] > 0 and 0 <= run["data_wait_share"] < 1
    assert stages["stage1_stock"]["status"] == "timeout" and "time limit of 4 s" in stages["stage1_stock"]["error"]
    assert report["summary"]["stages_not_ok"] == ["step_vs_stock", "stage1_stock"]
    assert (tmp_path / "logs" / "stage1_tlnlp.log").read_text()


@pytest.mark.heavy
def test_gpu_check_stops_at_once_when_the_smoke_stage_fails(tmp_path):
    done = gpu_check("--dry", "--output", str(tmp_path), "--fail_stage", "smoke")
    assert done.returncode == 1 and "the smoke stage failed" in done.stderr
    report = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert list(report["stages"]) == ["smoke"] and report["stages"]["smoke"]["status"] == "failed"


@pytest.mark.heavy
def test_accuracy_benchmark_runs_the_stock_recipe_and_tlnlp_side_by_side(tmp_path):
    bench = load_benchmark("bench_accuracy")
    output = tmp_path / "accuracy.json"
    report = bench.main(["--sets", "wiki-topics", "--recipes", "stock,tlnlp", "--seeds", "42", "--labels", "44",
                         "--max_seq_length", "16", "--tlnlp_args=--min_train_steps 0", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    table = report["sets"]["wiki-topics"]
    for recipe in ("stock", "tlnlp"):
        assert 0 < table[recipe]["mean"] <= 1 and table[recipe]["wall_time_s_per_seed"] > 0, (recipe, table)
    assert "| stock |" in bench.markdown(report) and "| tlnlp |" in bench.markdown(report)


def test_accuracy_benchmark_refuses_a_recipe_that_needs_unlabeled_text_the_set_lacks(tmp_path, capsys):
    bench = load_benchmark("bench_accuracy")
    with pytest.raises(SystemExit):
        bench.main(["--sets", "email-spam,brown-genres", "--recipes", "tlnlp,tlnlp-self", "--output",
                    str(tmp_path / "accuracy.json")])
    error = capsys.readouterr().err
    assert "tlnlp-self on email-spam" in error and "on brown-genres" not in error  # brown-passages is its corpus
    assert not (tmp_path / "accuracy.json").exists()


@pytest.mark.heavy
@pytest.mark.usefixtures("one_thread_subprocesses")
def test_accuracy_benchmark_keeps_the_search_it_ran(tmp_path):
    bench = load_benchmark("bench_accuracy")
    report = bench.main(["--sets", "movie-sentences", "--recipes", "tlnlp-search", "--seeds", "42", "--labels", "40",
                         "--max_seq_length", "16", "--search_trials", "2", "--keep_runs", str(tmp_path / "runs"),
                         "--tlnlp_args=--min_train_steps 0", "--output", str(tmp_path / "accuracy.json")])
    assert 0 < report["sets"]["movie-sentences"]["tlnlp-search"]["mean"] <= 1
    kept = tmp_path / "runs" / "movie-sentences" / "tlnlp-search" / "seed42"
    trials = (kept / "search" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2 and (kept / "search" / "best_config.yaml").is_file()
    results = json.loads((kept / "all_results.json").read_text())
    assert results["test_accuracy"] == report["sets"]["movie-sentences"]["tlnlp-search"]["mean"]
    assert "min_train_steps: 0" in (kept / "training_config.yaml").read_text()  # --tlnlp_args reached the run


def test_accuracy_parts_merge_into_one_report_where_a_rerun_supersedes(tmp_path):
    bench = load_benchmark("bench_accuracy")

    def part(name, seeds, sets):
        path = tmp_path / name
        path.write_text(json.dumps({"command": f"run {name}", "seeds": seeds, "sets": {
            dataset: {recipe: {"per_seed": scores, "wall_time_s_per_seed": wall} for recipe, (scores, wall) in table.items()}
            for dataset, table in sets.items()}}))
        return path

    first = part("first.json", [42, 43], {"a": {"stock": ([0.80, 0.70], 10.0), "tlnlp": ([0.60, 0.90], 20.0)}})
    rerun = part("rerun.json", [43], {"a": {"tlnlp": ([0.70], 40.0)}})
    more = part("more.json", [44], {"a": {"tlnlp": ([0.8015], 30.0)}, "b": {"stock": ([0.5], 5.0)}})
    output = tmp_path / "merged.json"
    report = bench.main(["--merge", str(first), str(rerun), str(more), "--output", str(output)])

    tlnlp = report["sets"]["a"]["tlnlp"]
    assert tlnlp["seeds"] == [42, 43, 44] and tlnlp["per_seed"] == [0.60, 0.70, 0.8015]
    assert tlnlp["parts"] == ["first.json", "rerun.json", "more.json"]
    assert tlnlp["mean"] == pytest.approx(0.7005) and tlnlp["wall_time_s_per_seed"] == pytest.approx(30.0)
    assert report["superseded"] == [{"set": "a", "recipe": "tlnlp", "seed": 43, "accuracy": 0.90,
                                     "part": "first.json", "by": "rerun.json"}]
    assert [p["command"] for p in report["parts"]] == ["run first.json", "run rerun.json", "run more.json"]
    assert json.loads(output.read_text()) == report and output.with_suffix(".png").stat().st_size > 0
    table = bench.markdown(report)
    assert "| tlnlp | 0.701 ± 0.101 | – | 30 s (30) |" in table  # 0.7005 rounds up, as the seed 0.8015 does
    assert "| | 0.600 / 0.700 / 0.802 | – | |" in table
    assert not output.with_name("merged_stage1.png").exists()  # no recipe with a stage 1

    # A recipe with continued pretraining keeps each seed's stage-1 record through a merge, and gets the plot of
    # its gain over the defaults against stage 1's minutes.
    adaptation = {"minutes": 4.5, "kept": "adapted", "probe_difference": 0.01, "reused_from_cache": False}
    tapt = part("tapt.json", [42, 43], {"a": {"tlnlp-tapt": ([0.62, 0.74], 300.0)}})
    written = json.loads(tapt.read_text())
    written["sets"]["a"]["tlnlp-tapt"]["stage1"] = [adaptation, {**adaptation, "reused_from_cache": True}]
    tapt.write_text(json.dumps(written))
    report = bench.main(["--merge", str(first), str(tapt), "--output", str(output)])
    assert report["sets"]["a"]["tlnlp-tapt"]["stage1"][1]["reused_from_cache"] is True
    assert "stage1" not in report["sets"]["a"]["tlnlp"]
    assert output.with_name("merged_stage1.png").stat().st_size > 0

    # --sets and --recipes cut a merged report to what was asked, in the order given.
    report = bench.main(["--merge", str(first), str(more), "--sets", "b,a", "--recipes", "stock",
                         "--output", str(output)])
    assert list(report["sets"]) == ["b", "a"] and all(list(t) == ["stock"] for t in report["sets"].values())
    with pytest.raises(SystemExit, match="--sets c: no part ran it"):
        bench.main(["--merge", str(first), "--sets", "a,c", "--output", str(output)])

    # A part given twice is refused before anything is written: it would only supersede itself.
    output.unlink()
    with pytest.raises(SystemExit, match=r"first.json given more than once"):
        bench.main(["--merge", str(first), str(more), str(tmp_path / ".." / tmp_path.name / "first.json"),
                    "--output", str(output)])
    assert not output.exists()


def test_a_variant_names_the_recipe_so_its_runs_merge_beside_the_plain_ones(tmp_path, monkeypatch):
    bench = load_benchmark("bench_accuracy")
    calls = []

    # The report's naming is tested here, not training: the run itself is replaced.
    def run(recipe, dataset, labels, seed, length, trials, folds, keep_runs=None, tlnlp_args=()):
        calls.append((recipe, seed, tlnlp_args))
        return {"accuracy": 0.5 + len(tlnlp_args) / 100 + seed / 1000,
                "stage1": {"minutes": 2.0 + len(tlnlp_args), "kept": "adapted", "reused_from_cache": False}}

    monkeypatch.setattr(bench, "run", run)
    plain = bench.main(["--sets", "speech-eras", "--recipes", "tlnlp,tlnlp-tapt", "--seeds", "42",
                        "--output", str(tmp_path / "plain.json")])
    longer = bench.main(["--sets", "speech-eras", "--recipes", "tlnlp-tapt", "--seeds", "42", "--variant", "1200steps",
                         "--tlnlp_args=--continued_pretraining_steps 1200", "--output", str(tmp_path / "longer.json")])
    assert list(longer["sets"]["speech-eras"]) == ["tlnlp-tapt:1200steps"]
    assert calls[-1] == ("tlnlp-tapt", 42, ("--continued_pretraining_steps", "1200"))  # the recipe itself ran

    merged = bench.main(["--merge", str(tmp_path / "plain.json"), str(tmp_path / "longer.json"),
                         "--output", str(tmp_path / "merged.json")])
    table = merged["sets"]["speech-eras"]
    assert table["tlnlp-tapt"]["per_seed"] == plain["sets"]["speech-eras"]["tlnlp-tapt"]["per_seed"] == [0.542]
    assert table["tlnlp-tapt:1200steps"]["per_seed"] == [0.562] and merged["superseded"] == []
    assert bench.ordered_recipes(merged) == ["tlnlp", "tlnlp-tapt", "tlnlp-tapt:1200steps"]
    assert (tmp_path / "merged_stage1.png").stat().st_size > 0

    with pytest.raises(SystemExit):
        bench.main(["--sets", "speech-eras", "--recipes", "tlnlp", "--variant", "a,b", "--output",
                    str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists() and len(calls) == 3
    with pytest.raises(SystemExit):  # a merge keeps its parts' names
        bench.main(["--merge", str(tmp_path / "plain.json"), "--variant", "x", "--output", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_a_tlnlp_runs_record_keeps_what_stage_1_cost_and_the_gates_decision():
    bench = load_benchmark("bench_accuracy")
    assert bench.run_record({"test_accuracy": 0.8}) == {"accuracy": 0.8}
    results = {"test_accuracy": 0.81, "continued_pretraining": {
        "stage1_minutes": 13.4, "minutes": 0.1, "kept": "original", "probe_difference": 0.012,
        "probe_difference_standard_error": 0.006, "reused_from_cache": True, "perplexity": 40.0}}
    assert bench.run_record(results) == {"accuracy": 0.81, "stage1": {
        "minutes": 13.4, "kept": "original", "probe_difference": 0.012, "probe_difference_standard_error": 0.006,
        "reused_from_cache": True}}
    gated = {"gate": "finetune", "difference": -0.06, "difference_standard_error": 0.025, "validation_original": 0.82,
             "validation_adapted": 0.76, "test_original": 0.77, "test_adapted": 0.74}
    results["continued_pretraining"] = {**results["continued_pretraining"], **gated, "gate_examples": 250}
    assert bench.run_record(results)["stage1"] == {"minutes": 13.4, "kept": "original", "reused_from_cache": True,
                                                   **gated}


def gated_part(folder, name, seeds, rows):
    """A bench_accuracy.py output with one set's runs gated by fine-tuning: rows of (test accuracy of the
    original's fine-tuning, of the adapted's, validation difference, its standard error)."""
    stage1, per_seed = [], []
    for original, adapted, difference, spread in rows:
        kept = "adapted" if difference >= -spread else "original"
        per_seed.append(adapted if kept == "adapted" else original)
        stage1.append({"minutes": 1.0, "kept": kept, "reused_from_cache": True, "gate": "finetune",
                       "difference": difference, "difference_standard_error": spread, "test_original": original,
                       "test_adapted": adapted})
    part = {"seeds": seeds, "sets": {name: {"tlnlp-tapt": {"per_seed": per_seed, "wall_time_s_per_seed": 100.0,
                                                           "stage1": stage1}}}}
    path = folder / f"{name}_{seeds[0]}.json"
    path.write_text(json.dumps(part))
    return path


def test_the_gate_report_sets_the_gated_runs_beside_the_defaults_and_the_adapted_encoder(tmp_path):
    report = load_benchmark("gate_report")
    a = gated_part(tmp_path, "a", [43, 44], [(0.80, 0.82, 0.01, 0.02), (0.80, 0.70, -0.08, 0.02)])
    b = gated_part(tmp_path, "a", [42], [(0.70, 0.74, 0.03, 0.02)])
    probe = tmp_path / "probe.json"  # a probe-gated part has nothing to report
    probe.write_text(json.dumps({"seeds": [42], "sets": {"c": {"tlnlp-tapt": {
        "per_seed": [0.9], "wall_time_s_per_seed": 1.0, "stage1": [{"kept": "adapted", "probe_difference": 0.0}]}}}}))
    output = tmp_path / "gate.json"
    groups = report.main(["--runs", "TAPT", str(a), str(b), str(probe), "--output", str(output)])
    runs = groups["TAPT"]["sets"]["a"]
    assert [r["seed"] for r in runs["runs"]] == [42, 43, 44] and list(groups["TAPT"]["sets"]) == ["a"]
    assert runs["kept_adapted"] == 2
    assert runs["mean"]["gated"] == pytest.approx((0.74 + 0.82 + 0.80) / 3)
    assert runs["gain_always"] == pytest.approx(100 * ((0.74 + 0.82 + 0.70) - (0.70 + 0.80 + 0.80)) / 3)
    assert runs["gain_gated"] == pytest.approx(100 * (0.06 / 3))
    assert json.loads(output.read_text())["command"].startswith("python benchmarks/gate_report.py --runs TAPT")
    assert "| TAPT | `a` | 3 |" in output.with_suffix(".md").read_text()
    c = gated_part(tmp_path, "c", [42], [(0.70, 0.74, 0.03, 0.02)])
    ordered = report.main(["--runs", "TAPT", str(a), str(c), "--sets", "c,a", "--output", str(output)])
    assert list(ordered["TAPT"]["sets"]) == ["c", "a"]
    with pytest.raises(SystemExit):
        report.main(["--runs", "probe only", str(probe), "--output", str(output)])


def tiny_set(folder, seed: int):
    """A labeled set as bench_defaults reads a folder: train.jsonl and test.jsonl."""
    from conftest import make_documents, write_labeled

    rows = [{"text": text, "label": topic} for topic, text in make_documents(240, seed=seed)]
    folder.mkdir(parents=True)
    write_labeled(folder / "train.jsonl", rows[:180])
    write_labeled(folder / "test.jsonl", rows[180:])
    return folder


def test_defaults_benchmark_runs_every_arm_on_each_set_and_writes_json_and_table(tiny_mlm_dir, tmp_path):
    bench = load_benchmark("bench_defaults")
    sets = [tiny_set(tmp_path / "set-a", 1), tiny_set(tmp_path / "set-b", 2)]
    output = tmp_path / "defaults.json"
    # The defaults' arm pinned by --default_options (a floor of 50 steps in place of 100): that arm alone.
    report = bench.main(["--candidate", "--min_train_steps 0", "--sets", ",".join(map(str, sets)), "--seeds", "42",
                         "--labels", "60", "--max_seq_length", "32", "--model", str(tiny_mlm_dir),
                         "--default_options", "--min_train_steps 50", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["verdict"] == json.loads(json.dumps(report["verdict"]))
    assert {(r["set"], r["arm"]) for r in saved["runs"]} == {
        (s, arm) for s in ("set-a", "set-b") for arm in ("default", "candidate", "stock")}
    assert all(0 <= r["accuracy"] <= 1 and r["wall_time_s"] > 0 for r in saved["runs"])
    # No floor against the default's 100 steps (60 labels are 21 steps in 3 epochs): a shorter run, which the
    # report must show.
    default, candidate = ([r for r in saved["runs"] if r["arm"] == arm and r["set"] == "set-a"][0]
                          for arm in ("default", "candidate"))
    assert candidate["optimizer_steps"] < default["optimizer_steps"] < 100
    assert saved["default_options"] == "--min_train_steps 50"
    table = output.with_suffix(".md").read_text()
    assert "| `set-a` |" in table and "| `set-b` |" in table and "Adoptable:" in table
    # Run again, it continues: every run is done, so nothing is trained and the report is the same.
    again = bench.main(["--candidate", "--min_train_steps 0", "--sets", ",".join(map(str, sets)), "--seeds", "42",
                        "--labels", "60", "--max_seq_length", "32", "--model", str(tiny_mlm_dir),
                        "--default_options", "--min_train_steps 50", "--output", str(output)])
    assert again["runs"] == saved["runs"]
    assert bench.markdown(bench.main(["--candidate", "-", "--output", str(output), "--table_only"])) == table.split(
        "\n\n", 1)[1].rstrip("\n")


def test_a_candidate_that_loses_on_one_set_is_not_adoptable():
    bench = load_benchmark("bench_defaults")
    gains = {"a": {"default": [0.80, 0.81, 0.79], "candidate": [0.83, 0.84, 0.82]},
             "b": {"default": [0.70, 0.72, 0.71], "candidate": [0.72, 0.73, 0.73]}}
    assert bench.verdict(gains)["adoptable"]
    # Set c loses 5 points against a seed spread of 1: the mean still gains, the candidate is refused.
    losing = {**gains, "c": {"default": [0.60, 0.61, 0.62], "candidate": [0.55, 0.56, 0.57]},
              "d": {"default": [0.5, 0.5, 0.5], "candidate": [0.6, 0.6, 0.6]}}
    decision = bench.verdict(losing)
    assert decision["mean_difference"] > 0 and decision["worst_set"] == "c"
    assert not decision["per_set"]["c"]["within_spread"] and not decision["adoptable"]
    # A gain carried by one set alone fails leave-one-set-out.
    carried = {"a": {"default": [0.5, 0.5], "candidate": [0.6, 0.6]},
               "b": {"default": [0.70, 0.72], "candidate": [0.695, 0.715]},
               "c": {"default": [0.70, 0.72], "candidate": [0.695, 0.715]}}
    decision = bench.verdict(carried)
    assert decision["mean_difference"] > 0 and decision["holds_without"]["a"] is False
    assert not decision["adoptable"]


def test_defaults_reused_from_an_earlier_report_are_checked_on_the_first_set_first(tiny_mlm_dir, tmp_path):
    bench = load_benchmark("bench_defaults")
    sets = ",".join(str(tiny_set(tmp_path / name, seed)) for name, seed in (("set-a", 1), ("set-b", 2)))
    common = ["--sets", sets, "--seeds", "42", "--labels", "60", "--max_seq_length", "32", "--model",
              str(tiny_mlm_dir), "--no_stock"]
    # An earlier benchmark whose candidate has since become the default (here: the default's own value).
    earlier = tmp_path / "earlier.json"
    bench.main(["--candidate", "--min_train_steps 100", *common, "--output", str(earlier)])
    later = bench.main(["--candidate", "--min_train_steps 0", *common, "--default_scores", str(earlier),
                        "--output", str(tmp_path / "later.json")])
    defaults = {r["set"]: r for r in later["runs"] if r["arm"] == "default"}
    assert defaults["set-a"]["matches"] == str(earlier) and defaults["set-a"]["wall_time_s"] > 0  # run here
    assert "from" not in defaults["set-a"] and defaults["set-b"]["from"].startswith(str(earlier))  # not rerun
    reused = [r for r in json.loads(earlier.read_text())["runs"] if r["arm"] == "candidate"]
    assert [defaults[r["set"]]["accuracy"] for r in reused] == [r["accuracy"] for r in reused]
    # A report whose defaults no longer match what the first set scores stops the benchmark before more runs.
    changed = json.loads(earlier.read_text())
    for run in changed["runs"]:
        run["accuracy"] = round(1.0 - run["accuracy"] / 2, 4) if run["arm"] == "candidate" else run["accuracy"]
    earlier.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="the defaults have changed since that report"):
        bench.main(["--candidate", "--min_train_steps 0", *common, "--default_scores", str(earlier),
                    "--output", str(tmp_path / "refused.json")])
    assert not (tmp_path / "refused.json").with_suffix(".md").exists()
